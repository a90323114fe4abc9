"""The vision-feature cache: question-independent image features by upload hash."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.modeling import ImageFeatures


class CacheMiss(RuntimeError):
    """A request referred to cached features that are gone (retryable)."""


class VisionCache:
    """LRU of question-independent image features by upload hash, bounded in bytes.

    Entries are model.modeling.ImageFeatures (anything with `.nbytes`). The chat layer checks it
    (and pins the entry) before decoding an upload, so a repeated image skips decoding, slicing,
    CLIP and both adapters; only selection reruns. A pinned entry is not evicted for
    `PIN_SECONDS`, long enough for its request to reach the engine (while pinned entries fill
    the cache, a new entry is not kept).
    """

    PIN_SECONDS = 60.0

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._pinned: dict[str, float] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def pin(self, key: str) -> ImageFeatures | None:
        """Called from the chat layer: the entry, kept from eviction for a while, or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            self._pinned[key] = time.monotonic()
            return item

    def take(self, key: str) -> ImageFeatures | None:
        with self._lock:
            self._pinned.pop(key, None)
            return self._items.get(key)

    def peek(self, key: str) -> ImageFeatures | None:
        """The entry, if present (no pin, no counters): the vision stage's own reuse, e.g. the
        choices of an n>1 request, which share their images."""
        with self._lock:
            return self._items.get(key)

    def put(self, key: str, feats: ImageFeatures) -> None:
        size = feats.nbytes
        with self._lock:
            if size > self.max_bytes or key in self._items:
                return
            self._items[key] = feats
            self.bytes += size
            now = time.monotonic()
            for old in list(self._items):
                if self.bytes <= self.max_bytes:
                    break
                pinned = self._pinned.get(old)
                if pinned is not None and now - pinned < self.PIN_SECONDS and self.bytes <= 2 * self.max_bytes:
                    continue
                self.bytes -= self._items.pop(old).nbytes
                self._pinned.pop(old, None)



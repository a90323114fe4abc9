"""Which KV-cache blocks hold what (pure Python, no torch): a pool of fixed-size blocks with
reference counts, and a prefix cache of full blocks keyed by what was fed at their positions.

A full block's key chains the key of the block before it with what was fed at each of its
positions (a token id; for an image row, the image's digest, which of its local tokens the
question kept, and the row), so equal keys mean equal K/V: the whole prefix up to the block's
end is the same. Blocks nobody references stay cached until their memory is needed (LRU)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Hashable

from model.block_table import NULL_BLOCK  # pads tables; never handed out


# What was fed at one position: a token id, a hashable description of an image row, or None
# (nothing that identifies it: no block from there on is shared)
PositionKey = Hashable


def block_key(parent: bytes, keys: Sequence[PositionKey]) -> bytes | None:
    """The key of a full block: what was fed at its positions, chained onto the key of the block
    before it (b"" for the first). None if a position is unidentified."""
    if any(k is None for k in keys):
        return None
    return hashlib.blake2b(parent + repr(tuple(keys)).encode(), digest_size=16).digest()


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    """Blocks 1..num_blocks-1 (0 is the null block). A block is in use (ref > 0), cached (ref 0,
    keyed: reusable by a later prefix until evicted) or free."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the pool needs at least one block besides the null block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(b for b in range(num_blocks) if b != NULL_BLOCK)
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0 and keyed, least recently used first
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}

    @property
    def capacity(self) -> int:
        """Usable blocks."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, or cached and evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    @property
    def num_cached(self) -> int:
        """Keyed blocks (in use or not): what a later prefix can reuse."""
        return len(self._by_key)

    def allocate(self, n: int) -> list[int]:
        """`n` blocks for one sequence's new positions: free ones first, then the least recently
        used cached ones (forgetting what they held)."""
        if n > self.num_free:
            raise OutOfBlocks(f"{n} blocks asked, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._cached.popitem(last=False)
                del self._by_key[self._key_of.pop(block)]
            self._ref[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block (a sequence that finished or was preempted). Keyed
        blocks stay cached; the rest are free. Released last-block-first, so that under memory
        pressure a prefix's tail is evicted before its head."""
        for block in reversed(list(blocks)):
            if self._ref[block] <= 0:
                raise RuntimeError(f"block {block} released twice")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def forget(self, blocks: Iterable[int]) -> None:
        """Drop the keys of blocks (no later prefix will find them): a cached one is free now, one
        in use is free once released."""
        for block in blocks:
            key = self._key_of.pop(block, None)
            if key is not None:
                del self._by_key[key]
                if self._ref[block] == 0:
                    del self._cached[block]
                    self._free.append(block)

    def forget_keys(self, keys: Iterable[bytes]) -> None:
        """`forget` the blocks that hold these keys (those still cached)."""
        self.forget([self._by_key[k] for k in keys if k in self._by_key])

    def refs(self, block: int) -> int:
        return self._ref[block]

    def share(self, blocks: Iterable[int]) -> None:
        """One more reference to each block (in use): a forked sequence reads them too."""
        for block in blocks:
            if self._ref[block] <= 0:
                raise RuntimeError(f"block {block} is not in use: nothing to share")
            self._ref[block] += 1

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `keys` (block keys from `chain_keys`), each
        now referenced by the caller."""
        if not self.prefix_caching:
            return []
        out = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            if self._ref[block] == 0:
                del self._cached[block]
            self._ref[block] += 1
            out.append(block)
        return out

    def register(self, block: int, key: bytes) -> None:
        """`block` (in use, full) holds the positions `key` describes: later prefixes may reuse it.
        Where another block already holds them, that one stays the cached copy."""
        if not self.prefix_caching or key in self._by_key or block in self._key_of:
            return
        self._by_key[key] = block
        self._key_of[block] = key

"""The vision-feature cache: a byte-bounded LRU whose entries the chat layer pins until the engine
takes them; and what a request gets when its pinned entry is gone anyway (a retryable 503)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import sys
from types import SimpleNamespace

import httpx
import pytest

from server.engine.vision_cache import VisionCache
from server.settings import Settings

from tests.live import LiveServer, data_url, image_message


class Feats:
    """Stands in for ImageFeatures: all the cache reads is `nbytes`."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.grid = (2, 1)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """The cache module's `time`, under the test's control."""
    c = Clock()
    monkeypatch.setattr(sys.modules[VisionCache.__module__], "time", SimpleNamespace(monotonic=c.monotonic))
    return c


def stored(cache: VisionCache) -> list[str]:
    """Keys held, least recently used first."""
    return list(cache._items)


def test_least_recently_used_entries_go_first_and_the_bound_holds(clock):
    cache = VisionCache(100)
    for key in "abc":
        cache.put(key, Feats(40))
    assert stored(cache) == ["b", "c"] and cache.bytes == 80
    cache.put("d", Feats(20))
    assert stored(cache) == ["b", "c", "d"] and cache.bytes == 100  # exactly at the bound: kept
    cache.put("e", Feats(50))  # frees 40 (b), still 130 > 100: frees 40 (c)
    assert stored(cache) == ["d", "e"] and cache.bytes == 70


def test_a_pin_hit_makes_the_entry_most_recent(clock):
    cache = VisionCache(100)
    cache.put("a", Feats(40))
    cache.put("b", Feats(40))
    assert cache.pin("a") is not None
    assert cache.take("a") is not None  # the engine took it: no longer pinned, recency stays
    cache.put("c", Feats(40))
    assert stored(cache) == ["a", "c"]  # b, used longer ago, went


def test_a_pinned_entry_survives_eviction_for_pin_seconds_then_goes_first(clock):
    cache = VisionCache(100)
    cache.put("a", Feats(30))
    cache.pin("a")
    cache.put("b", Feats(30))
    cache.put("c", Feats(30))
    clock.now += VisionCache.PIN_SECONDS - 1
    cache.put("d", Feats(30))  # over the bound: a is the oldest but pinned, so b goes
    assert stored(cache) == ["a", "c", "d"] and cache.bytes == 90
    clock.now += 2  # the pin has run out
    cache.put("e", Feats(30))
    assert stored(cache) == ["c", "d", "e"] and cache.bytes == 90


def test_taking_an_entry_ends_its_pin(clock):
    cache = VisionCache(100)
    cache.put("a", Feats(60))
    cache.pin("a")
    assert cache.take("a") is not None
    cache.put("b", Feats(60))
    assert stored(cache) == ["b"]


def test_an_item_larger_than_the_bound_is_not_stored_and_evicts_nothing(clock):
    cache = VisionCache(100)
    cache.put("a", Feats(60))
    cache.put("big", Feats(101))
    assert stored(cache) == ["a"] and cache.bytes == 60
    assert cache.pin("big") is None
    cache.put("fits", Feats(40))
    assert stored(cache) == ["a", "fits"] and cache.bytes == 100


def test_a_key_stored_twice_counts_once(clock):
    cache = VisionCache(100)
    first = Feats(30)
    cache.put("a", first)
    cache.put("a", Feats(30))
    assert cache.bytes == 30 and cache.take("a") is first


def test_hits_and_misses_count_pin_lookups(clock):
    cache = VisionCache(100)
    assert cache.pin("a") is None
    feats = Feats(10)
    cache.put("a", feats)
    assert cache.pin("a") is feats and cache.pin("a") is feats and cache.pin("b") is None
    assert cache.take("a") is feats and cache.take("b") is None  # the engine's take is no lookup
    assert (cache.hits, cache.misses) == (2, 2)


def test_random_use_keeps_the_byte_count_and_the_bound(clock):
    """Whatever the sequence of puts, pins, takes and waits: `bytes` is the sum of what is held; it
    stays within max_bytes unless entries pinned right now hold it above, and never above twice
    that; an entry pinned less than PIN_SECONDS ago is never evicted (each item is at most
    max_bytes, so keeping the pinned ones never needs more than twice the bound)."""
    rng = random.Random(5)
    cache = VisionCache(1000)
    pinned_at: dict[str, float] = {}
    evicted = 0
    for _ in range(3000):
        op = rng.random()
        key = f"k{rng.randrange(16)}"
        before = set(stored(cache))
        live = {k for k, t in pinned_at.items() if clock.now - t < VisionCache.PIN_SECONDS}
        if op < 0.5:
            cache.put(key, Feats(rng.choice([1, 20, 50, 120, 300, 999, 1000, 1001])))
        elif op < 0.75:
            if cache.pin(key) is not None:
                pinned_at[key] = clock.now
        elif op < 0.85:
            cache.take(key)
            pinned_at.pop(key, None)
        else:
            clock.now += rng.choice([1.0, 10.0, VisionCache.PIN_SECONDS / 2])
        held = stored(cache)
        assert cache.bytes == sum(cache._items[k].nbytes for k in held)
        assert cache.bytes <= 2 * cache.max_bytes
        if cache.bytes > cache.max_bytes:
            assert live & set(held), "over the bound with nothing pinned"
        gone = before - set(held)
        assert not gone & live, "a pinned entry was evicted within PIN_SECONDS"
        evicted += len(gone)
        for k in gone:
            pinned_at.pop(k, None)
    assert evicted > 500 and cache.hits > 100 and cache.misses > 100


# -- through the server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cache_server(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_batch_size=4, vision_cache_mb=1)) as s:
        yield s


def _ask(srv, url: str, **extra) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
        "model": srv.state.settings.model_id, "messages": [image_message("What is here?", url)], "max_tokens": 4,
        "temperature": 0, **extra})


def test_the_small_cache_holds_features_within_its_bytes(small_cache_server, ironing, waterview):
    srv = small_cache_server
    cache = srv.state.engine.runner.vision_cache
    assert cache.max_bytes == 2**20
    for i in range(6):  # distinct uploads, more than fit
        image = (ironing if i % 2 else waterview).resize((300 + 20 * i, 200 + 10 * i))
        assert _ask(srv, data_url(image)).status_code == 200
        assert 0 < cache.bytes <= cache.max_bytes
    assert 1 <= len(stored(cache)) < 6


def test_an_entry_evicted_between_pin_and_take_ends_the_request_with_a_retryable_503(small_cache_server, ironing,
                                                                                   monkeypatch):
    srv = small_cache_server
    cache = srv.state.engine.runner.vision_cache
    url = data_url(ironing.resize((420, 280)), "JPEG")
    first = _ask(srv, url)
    assert first.status_code == 200
    real_pin = cache.pin
    lost = []

    def pin_then_lose(key):
        """The pin as the chat layer gets it; then, before the engine takes the entry, it is
        evicted (the pin ran out while the request waited, and new uploads filled the cache)."""
        item = real_pin(key)
        if item is not None and lose:
            cache.PIN_SECONDS = 0.0
            cache.put("filler", Feats(cache.max_bytes))
            del cache.PIN_SECONDS
            assert key not in stored(cache)
            lost.append(key)
        return item

    monkeypatch.setattr(cache, "pin", pin_then_lose)
    try:
        errors = srv.metric("slime_requests_total", 'status="error"')
    except KeyError:
        errors = 0.0
    lose = True
    r = _ask(srv, url)
    assert lost == [digest(url)], "the request did not hit the cache"
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    err = r.json()["error"]
    assert err["type"] == "unavailable" and "evicted" in err["message"] and "retry" in err["message"]
    assert srv.metric("slime_requests_total", 'status="error"') == errors + 1
    # retried: the entry is gone, so the upload is decoded again, to the same answer as the first time
    lose = False
    again = _ask(srv, url)
    assert again.status_code == 200
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    assert digest(url) in stored(cache)
    # streamed, the error is the stream's last event
    lose = True
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=120, json={
            "model": srv.state.settings.model_id, "messages": [image_message("What is here?", url)],
            "max_tokens": 4, "temperature": 0, "stream": True}) as s:
        assert s.status_code == 200
        lines = [line for line in s.iter_lines() if line]
    assert len(lost) == 2 and lines[-1] == "data: [DONE]"
    event = json.loads(lines[-2].removeprefix("data: "))
    assert event["error"]["type"] == "unavailable" and "retry" in event["error"]["message"]


def digest(url: str) -> str:
    """The cache key the chat layer uses for an upload: blake2b-128 of its bytes."""
    data = base64.b64decode(url.split(",", 1)[1])
    return hashlib.blake2b(data, digest_size=16).hexdigest()

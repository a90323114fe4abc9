"""Fixtures: a real uvicorn server on 127.0.0.1 (random port) serving the tiny checkpoint, and
OpenAI clients for it. The helpers behind them live in tests/live.py."""

from __future__ import annotations

import pytest

from server.settings import Settings
from tests.live import LiveServer


@pytest.fixture(scope="session")
def server(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_batch_size=16, max_waiting_requests=64)) as s:
        yield s


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def aclient(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def small(tiny_dir):
    """A server with tight request limits (each module that asks gets its own)."""
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_model_len=1024, max_request_bytes=300_000,
                             max_images_per_request=2, max_image_pixels=4_000_000, max_tokens_cap=100, max_n=2,
                             max_stop=2, max_messages=4)) as s:
        yield s

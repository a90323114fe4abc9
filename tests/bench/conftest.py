"""The benchmarks' client against a real server on 127.0.0.1."""

from __future__ import annotations

import pytest

from server.settings import Settings
from tests.live import LiveServer


@pytest.fixture(scope="module")
def server(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_batch_size=4)) as s:
        yield s

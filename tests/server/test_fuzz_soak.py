"""Schema fuzzing with schemathesis, and a soak with random disconnects (slow: CI runs them)."""

import asyncio
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.settings import Settings
from tests.live import LiveServer
from tests.tools import missing_tool


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(tiny_dir, tmp_path):
    beside = Path(sys.executable).parent / "st"  # the venv's own, when PATH does not have it
    st = str(beside) if beside.exists() else shutil.which("st")
    if st is None:
        missing_tool("schemathesis is not installed (pip install -e '.[dev]')")
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", default_max_tokens=4, max_tokens_cap=8,
                             max_waiting_requests=1000)) as s:
        out = subprocess.run([st, "run", s.url + "/openapi.json", "--checks",
                              "not_a_server_error,response_schema_conformance,content_type_conformance",
                              "--max-examples", "60", "--seed", "1"], capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)  # its cache directory goes there, not into the repository
        assert out.returncode == 0, out.stdout[-4000:]
        assert "generated" in out.stdout


@pytest.mark.slow
def test_soak_with_random_disconnects_keeps_memory_flat(tiny_dir):
    psutil = pytest.importorskip("psutil")
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_waiting_requests=200)) as s:
        proc = psutil.Process()
        rng = random.Random(0)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 24}

        async def one(c, i):
            stream = rng.random() < 0.5
            try:
                if stream:
                    async with c.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                        async for _ in r.aiter_lines():
                            if rng.random() < 0.3:
                                return  # disconnect mid-stream
                else:
                    await c.post(s.url + "/v1/chat/completions", json=body,
                                 timeout=rng.choice([0.05, 30.0]))  # short timeouts disconnect
            except httpx.TimeoutException:
                pass

        async def batch(n):
            async with httpx.AsyncClient(timeout=30) as c:
                sem = asyncio.Semaphore(16)

                async def guarded(i):
                    async with sem:
                        await one(c, i)

                await asyncio.gather(*(guarded(i) for i in range(n)))

        def settle():
            deadline = time.time() + 20
            while time.time() < deadline and (s.metric("slime_num_requests_running") or s.state.engine.num_requests):
                time.sleep(0.05)

        asyncio.run(batch(100))  # warm-up: allocator pools, caches
        settle()
        baseline = proc.memory_info().rss
        asyncio.run(batch(1000))
        settle()
        after = proc.memory_info().rss
        assert s.metric("slime_num_requests_running") == 0 and s.metric("slime_num_requests_waiting") == 0
        assert s.state.engine.num_requests == 0
        assert after < baseline * 1.05, (baseline, after)

"""SIGTERM on the real process: running requests finish, new ones are refused, exit code 0."""

import json
import signal
import threading
import time

import httpx
import pytest

from tests.live import start_server_process


@pytest.mark.parametrize("engine", ["in-process", "engine-process"])
def test_sigterm_drains_running_requests_then_exits_zero(tiny_dir, engine):
    extra = ("--engine-process",) if engine == "engine-process" else ()
    proc, url = start_server_process(tiny_dir, "--drain-timeout", "30", *extra)
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        got: list[str] = []
        started = threading.Event()

        def consume():
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        got.append(line)
                        started.set()

        t = threading.Thread(target=consume)
        t.start()
        assert started.wait(30)
        children = _children(proc.pid)
        assert bool(children) == bool(extra)  # the engine process, when asked for
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # new work is refused: connection refused or 503
            r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=5)
            assert r.status_code == 503
        except httpx.TransportError:
            pass
        t.join(60)
        assert got[-1] == "data: [DONE]"
        usage = json.loads(got[-2][6:])["usage"]
        assert usage["completion_tokens"] == 300
        assert proc.wait(60) == 0
        deadline = time.time() + 10  # the engine process goes with it
        while time.time() < deadline and any(_alive(c) for c in children):
            time.sleep(0.1)
        assert not any(_alive(c) for c in children)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_drain_timeout_zero_stops_at_once_instead_of_waiting_forever(tiny_dir):
    proc, url = start_server_process(tiny_dir, "--drain-timeout", "0", "--max-model-len", "16384",
                                     "--max-tokens-cap", "16000", "--max-batch-size", "2")
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16000,
                "ignore_eos": True, "stream": True}
        started = threading.Event()

        def consume():
            try:
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                    for line in r.iter_lines():
                        if line:
                            started.set()
            except httpx.TransportError:  # cut off: expected
                pass

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        assert started.wait(30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 10  # 16,000 tokens would take far longer
    finally:
        if proc.poll() is None:
            proc.kill()


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

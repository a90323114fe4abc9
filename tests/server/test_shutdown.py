"""SIGTERM on the real process: running requests finish, new ones are refused, exit code 0."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.conftest import ROOT
from tests.server.conftest import free_port


def test_sigterm_drains_running_requests_then_exits_zero(tiny_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIME_MODEL": str(tiny_dir), "SLIME_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--drain-timeout", "30"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
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
    finally:
        if proc.poll() is None:
            proc.kill()

"""Live servers for tests and benchmarks alike: free ports, starting a server (in this process or as
a command) and waiting for it to answer, and the requests the tests send it.

No pytest here, and nothing heavy at import time: `python -m bench.serve` imports this module too.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# The two shared demo photos, kept in the repository: tests that use them must never be skipped
# because a clone sits somewhere without the project's shared folder.
IMAGES = ROOT / "tests" / "data" / "images"


def photo(name: str) -> Path:
    return IMAGES / name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, path: str = "/ready", timeout: float = 90, *, proc: subprocess.Popen | None = None) -> None:
    """Poll until `url + path` answers 200; with `proc`, give up as soon as that process exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url}{path} answered 200")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url}{path} did not answer 200 in {timeout} s")


def start_command(args: Sequence[str], url: str, path: str = "/ready", *, timeout: float = 90,
                  env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """Run any server command (ours, vLLM, `transformers serve` ...) from the repository root and
    return its process once `url + path` answers 200; kill it if it exits or times out first.
    Its output goes to the file `log` (stdout and stderr together), else nowhere."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:  # the child keeps its own handle
            proc = subprocess.Popen(list(args), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    else:
        proc = subprocess.Popen(list(args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(url, path, timeout, proc=proc)
    except BaseException as e:
        proc.kill()
        proc.wait()
        if log is not None and isinstance(e, RuntimeError):
            raise RuntimeError(f"{e}; see {log}") from e
        raise
    return proc


def start_server_process(model, *args: str, port: int | None = None, timeout: float = 90,
                         env: dict[str, str] | None = None, log: Path | None = None):
    """`python -m server` in its own process, as deployed; returns (process, url) once ready.
    `env` defaults to this one's with OMP_NUM_THREADS=1."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "--model", str(model), "--port", str(port), "--device", "cpu",
           "--log-level", "warning", *args]
    env = env if env is not None else {**os.environ, "OMP_NUM_THREADS": "1"}
    return start_command(cmd, url, "/ready", timeout=timeout, env=env, log=log), url


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (a graceful drain for our server), then SIGKILL after `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class LiveServer:
    """A real uvicorn server on 127.0.0.1 (random port), in a thread of this process."""

    def __init__(self, settings: Settings, **app_kwargs):
        import uvicorn

        from server.app import create_app

        self.port = free_port()
        settings = settings.model_copy(update={"host": "127.0.0.1", "port": self.port})
        self.app = create_app(settings, **app_kwargs)
        self.state = self.app.state.slime
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
                if r.status_code == 200 or not wait_ready:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of the samples of `name` whose label set contains `labels` (e.g. 'status="ok"')."""
        text = httpx.get(self.url + "/metrics").text
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            head, value = line.rsplit(" ", 1)
            base, _, label_text = head.partition("{")
            if base == name and labels in label_text:
                total += float(value)
                found = True
        if not found:
            raise KeyError(f"{name} {labels}")
        return total


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}


def stream_lines(url: str, body: dict, *, after: int, then) -> list[str]:
    """POST a streamed chat request, call `then()` once `after` SSE lines came, return every line."""
    lines: list[str] = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
                if len(lines) == after:
                    then()
    return lines

"""A real uvicorn server on 127.0.0.1 (random port) serving the tiny checkpoint."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, settings: Settings, **app_kwargs):
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


@pytest.fixture(scope="session")
def server(tiny_dir):
    s = LiveServer(Settings(model=str(tiny_dir), device="cpu", max_batch_size=16, max_waiting_requests=64)).start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def aclient(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


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


def wait_for(url: str, path: str = "/ready", timeout: float = 90) -> None:
    """Poll until `url + path` answers 200."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url}{path} did not answer 200 in {timeout} s")


def start_server_process(tiny_dir, *args: str, port: int | None = None):
    """`python -m server` in its own process, as deployed; returns (process, url) once ready."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    port = port or free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(tiny_dir), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url)
    except BaseException:
        proc.kill()
        raise
    return proc, url

"""Shared helpers: start a server process, wait for it, and summarise latencies."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_thread_env() -> dict[str, str]:
    """Timings on small shared machines swing wildly with more than one torch thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class Process:
    def __init__(self, args: list[str], url: str, ready_path: str, log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log, "w")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=single_thread_env(), stdout=self.log, stderr=subprocess.STDOUT)
        self.url = url
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{args[:4]} exited; see {log}")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{args[:4]} did not become ready; see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def tiny_or(model: str | None) -> Path:
    """The checkpoint a benchmark runs: `model`, else the tiny one under .cache/ (built if absent)."""
    path = Path(model) if model else ROOT / ".cache" / "tiny-slime"
    if not model and not (path / "config.json").exists():
        from weights.make_tiny import make_tiny

        make_tiny(path)
    return path


def start_slime(model: Path, log: Path, *extra: str) -> Process:
    port = free_port()
    args = [sys.executable, "-m", "server", "--model", str(model), "--port", str(port), "--device", "cpu",
            "--log-level", "warning", *extra]
    return Process(args, f"http://127.0.0.1:{port}", "/ready", log)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")

"""Shared helpers: start a server process, wait for it, and summarise latencies. Starting and
waiting are the tests' own helpers (tests/live.py), so benchmarks and tests start servers alike."""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.live import ROOT, free_port, start_command, start_server_process, stop_process

__all__ = ["ROOT", "Process", "free_port", "median", "pct", "single_thread_env", "start_command_process",
           "start_slime", "tiny_or"]

# How long a benchmark waits for a server (a real checkpoint can take minutes to load).
READY_TIMEOUT = 300


def single_thread_env() -> dict[str, str]:
    """Timings on small shared machines swing wildly with more than one torch thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class Process:
    """A server started and ready: `proc`, `url`, `stop()`."""

    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc = proc
        self.url = url

    def stop(self) -> None:
        stop_process(self.proc)


def start_command_process(args: Sequence[str], url: str, ready_path: str, log: Path) -> Process:
    """Any server command (`transformers serve`, vLLM ...), single-threaded, output to `log`."""
    return Process(start_command(args, url, ready_path, timeout=READY_TIMEOUT, env=single_thread_env(), log=log), url)


def tiny_or(model: str | None) -> Path:
    """The checkpoint a benchmark runs: `model`, else the tiny one under .cache/ (built if absent)."""
    from server.engine.build import resolve_model_dir

    return resolve_model_dir(model, ROOT / ".cache")


def start_slime(model: Path, log: Path, *extra: str) -> Process:
    proc, url = start_server_process(model, *extra, timeout=READY_TIMEOUT, env=single_thread_env(), log=log)
    return Process(proc, url)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")

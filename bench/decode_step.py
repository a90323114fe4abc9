"""The CPU float32 decode step, path by path, in one process on one checkpoint (issue #13).

    python -m bench.decode_step [--size small|medium | --model DIR] [--batches 1,16,64]
        [--context 128,1024] [--rounds 5] [--out artifacts/bench]

Three ways to run the same step, alternating round by round (medians; ratios are medians of the
paired rounds):

  gather   decode attention through the eager path: each sequence's blocks gathered into a padded
           copy, then two matmuls (the in-place kernel's fallback; today's packed GEMMs, unpadded
           1-row steps and single-op RMSNorm, so it isolates the attention)
  kernel   `model.paged_attention_cpu`: RoPE, cache write and attention reading the blocks in place,
           called through the modules (`LlamaForCausalLM._run`)
  flat     the serving default: the same kernel in `model.cpu_decode`'s flat loop

Every row of a batch sits at a context of about the given length (keys cached per sequence). Prints
a table of milliseconds per step (and tokens/s) and saves it with a plot under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tests.live import ROOT

from .vs_vllm import checkpoint_for

PATHS = ("gather", "kernel", "flat")


def _configure(llm, path: str, cpu_decode, real_ready) -> None:
    llm.set_attention_backend("sdpa" if path == "gather" else "cpu")
    cpu_decode.ready = real_ready if path == "flat" else (lambda _llm: False)


def measure(model_dir: Path, batches: list[int], contexts: list[int], rounds: int) -> list[dict]:
    from model import cpu_decode
    from model.loading import load_model

    lm = load_model(model_dir)
    llm = lm.model.llm
    if not cpu_decode.ready(llm):
        raise SystemExit("the checkpoint did not load in the CPU float32 serving form (numba and oneDNN needed)")
    real_ready = cpu_decode.ready
    rows = []
    try:
        for context in contexts:
            for b in batches:
                cache = llm.new_cache(num_slots=b, max_len=context + 8, dtype=torch.float32, device="cpu")
                embeds = torch.randn(b, lm.cfg.hidden_size)
                positions = [context - 1 - (i % 7) for i in range(b)]
                reps = max(2, int(200 / (b + 4)))
                times: dict[str, list[float]] = {p: [] for p in PATHS}
                for r in range(rounds):
                    for path in (PATHS if r % 2 == 0 else PATHS[::-1]):
                        _configure(llm, path, cpu_decode, real_ready)
                        llm.logits(llm.decode(embeds, positions, cache))  # warm
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            llm.logits(llm.decode(embeds, positions, cache))
                        times[path].append((time.perf_counter() - t0) / reps * 1e3)
                row = {"batch": b, "context": context, **{f"{p}_ms": statistics.median(times[p]) for p in PATHS}}
                for p in ("kernel", "flat"):
                    row[f"gather_over_{p}"] = statistics.median(g / x for g, x in zip(times["gather"], times[p]))
                rows.append(row)
                print(_line(row), flush=True)
    finally:
        _configure(llm, "flat", cpu_decode, real_ready)
    return rows


HEADER = ("| batch | context | gather ms | kernel ms | flat (default) ms | gather / kernel | gather / flat "
          "| flat tok/s |\n|---|---|---|---|---|---|---|---|")


def _line(r: dict) -> str:
    return (f"| {r['batch']} | {r['context']} | {r['gather_ms']:.2f} | {r['kernel_ms']:.2f} | {r['flat_ms']:.2f} "
            f"| x{r['gather_over_kernel']:.2f} | x{r['gather_over_flat']:.2f} | {r['batch'] / r['flat_ms'] * 1e3:.0f} |")


def save(rows: list[dict], out: Path, name: str, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{name}.md").write_text(header + "\n\n" + HEADER + "\n" + "\n".join(_line(r) for r in rows) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, len({r["context"] for r in rows}), figsize=(11, 4), squeeze=False)
    for ax, context in zip(axes[0], sorted({r["context"] for r in rows})):
        sub = [r for r in rows if r["context"] == context]
        for p in PATHS:
            ax.plot([r["batch"] for r in sub], [r[f"{p}_ms"] for r in sub], marker="o", label=p)
        ax.set(title=f"context {context}", xlabel="batch (sequences)", ylabel="ms per decode step", xscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    print(f"saved {out / name}.md, .json, .png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a SliME checkpoint")
    src.add_argument("--size", choices=["small", "medium"], default="small", help="a benchmark checkpoint (built under .cache/)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", default="128,1024", help="cached positions per sequence, per table")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench"))
    args = ap.parse_args()
    model = checkpoint_for(args)
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.context.split(",")]
    header = (f"# CPU decode step by path, {model.name}: ms per step, medians of {args.rounds} alternating rounds "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(header + "\n\n" + HEADER, flush=True)
    rows = measure(model, batches, contexts, args.rounds)
    save(rows, Path(args.out), f"decode-step-{model.name}", header)


if __name__ == "__main__":
    main()

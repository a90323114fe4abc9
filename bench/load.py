"""Load time and peak memory of a checkpoint (default: the tiny one).

    python -m bench.load [--model DIR] [--dtype float32|bfloat16] [--repeat 3]

Each load runs in a fresh process so that peak RSS is the load's own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from .common import ROOT, single_thread_env, tiny_or

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from model.loading import LoadOptions, load_model
t_import = time.perf_counter() - t0
lm = load_model(sys.argv[1], LoadOptions(device="cpu", dtype=sys.argv[2]))
print(json.dumps({"load_s": lm.stats["load_seconds"], "import_s": t_import, "params": lm.stats["parameters"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.load")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    model = tiny_or(args.model)
    rows = []
    for _ in range(args.repeat):
        out = subprocess.run([sys.executable, "-c", CHILD, str(model), args.dtype], capture_output=True, text=True,
                             cwd=ROOT, env=single_thread_env(), check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| run | load s | torch import s | parameters | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {i + 1} | {r['load_s']:.2f} | {r['import_s']:.2f} | {r['params']:,} | {r['peak_rss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

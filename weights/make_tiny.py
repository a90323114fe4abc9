"""Build a deterministic tiny SliME checkpoint in the official layout, with random weights.

    python -m weights.make_tiny OUT [--template vicuna_v1|llama3] [--seed N]
        [--format safetensors|sharded|bin] [--tower separate|embedded] [--projector gated|mlp2x_gelu|linear]
    python -m weights.make_tiny --lora OUT [--lora-base BASE] [--template ...] [--seed N]

A tiny CLIP tower that still makes 576 patches from 336 x 336 (mm_hidden_size 128), a small
Llama and a real tokenizer trained here. The weights are scaled so that greedy output depends on
the image and the cosine selector keeps a strict, non-trivial subset of the local tokens. This
is what the service serves when no model is given and what the tests use; its answers are
random words.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from .tiny_parts import SIZES, TOWER_DIR, build_tiny_parts, save, write_tower


def make_tiny(out: str | Path, *, template: str = "vicuna_v1", seed: int = 0, fmt: str = "safetensors",
              tower: str = "separate", projector: str = "gated", size: str = "tiny") -> Path:
    """Write the tiny checkpoint to `out` (replaced atomically) and return its path. `size` picks
    the LLM's shapes (SIZES); the vision side and the tokenizer are the same for every size."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        parts = build_tiny_parts(tmp, template=template, seed=seed, projector=projector, size=size)
        tensors, vision, config = {**parts.llm, **parts.projector}, parts.vision, parts.config
        if tower == "embedded":
            tensors.update({"model.vision_tower.vision_tower." + k: v for k, v in vision.items()})
        else:
            write_tower(vision, tmp / TOWER_DIR)
        save(tensors, tmp, fmt)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(parts.generation_config, indent=2))
        (tmp / "README.md").write_text(
            "Random SliME checkpoint made by `python -m weights.make_tiny` (size %s, seed %d, template %s).\n"
            "Its answers are random words: it exists to exercise the real loading and serving code.\n"
            % (size, seed, template))
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weights.make_tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--lora", metavar="OUT", default=None,
                    help="write a LoRA checkpoint in SliME-Llama3-70B's layout (see weights.tiny_lora) instead")
    ap.add_argument("--lora-base", metavar="BASE", default=None, help="where its base model goes (default: OUT-base)")
    ap.add_argument("--template", choices=["vicuna_v1", "llama3"], default=None,
                    help="vicuna_v1 (default), llama3 (the default with --lora)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", dest="fmt", choices=["safetensors", "sharded", "bin"], default="safetensors")
    ap.add_argument("--tower", choices=["separate", "embedded"], default="separate")
    ap.add_argument("--projector", choices=["gated", "mlp2x_gelu", "linear"], default="gated")
    ap.add_argument("--size", choices=list(SIZES), default="tiny",
                    help="LLM shapes: tiny (tests), small (~20M parameters), medium (~100M) for benchmarks")
    args = ap.parse_args(argv)
    if (args.out is None) == (args.lora is None):
        ap.error("give OUT, or --lora OUT")
    if args.lora is not None:
        from .tiny_lora import make_tiny_lora

        lora, base = make_tiny_lora(args.lora, args.lora_base, template=args.template or "llama3", seed=args.seed)
        print(lora)
        print(base)
        return 0
    path = make_tiny(args.out, template=args.template or "vicuna_v1", seed=args.seed, fmt=args.fmt, tower=args.tower,
                     projector=args.projector, size=args.size)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Merge a LoRA checkpoint (SliME-Llama3-70B) into its base model once, and write the result in
the official full-checkpoint layout that `--model OUT` loads with no `--model-base`.

    python -m weights.merge_lora --model DIR --model-base BASE --out OUT [--dtype auto|float16|bfloat16|float32]
        [--shard-gb 5]

The tensors are exactly those `--model DIR --model-base BASE` loads (model.lora.LoraSource),
read, merged and written one at a time into safetensors shards: memory holds one shard, never
the model. `--dtype auto` keeps each tensor's stored dtype (a bf16 base gives bf16 merged
weights, the merge itself done in float32 then rounded once); `float32` keeps the merges
unrounded. The tokenizer comes from the base (as the reference reads it), the config from DIR,
and a vision tower kept inside DIR is copied along.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from model.loading import DTYPES

BASE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json")


def _plan_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def merge_lora(model_dir: str | Path, base_dir: str | Path, out: str | Path, *, dtype: str = "auto",
               shard_bytes: int = 5 * 10**9) -> Path:
    from safetensors.torch import save_file

    from model.checkpoint import CheckpointError
    from model.config import SliMEConfig, VisionConfig
    from model.lora import LoraSource, is_lora_checkpoint, llm_linear_shapes
    from model.modeling import SliMEForCausalLM

    model_dir, base_dir, out = Path(model_dir), Path(base_dir), Path(out)
    if not is_lora_checkpoint(model_dir):
        raise CheckpointError(f"{model_dir} is not a LoRA checkpoint (no adapter_config.json)")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty")
    cast = None if dtype == "auto" else DTYPES[dtype]
    cfg = SliMEConfig.from_file(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=out.parent))
    try:
        with LoraSource(model_dir, base_dir) as src:
            # The meta model names what the reference's modules hold; the tower's shapes do not
            # matter here (it is not written), the projector's come from config.json.
            with torch.device("meta"):
                model = SliMEForCausalLM(cfg, cfg.vision or (VisionConfig() if cfg.is_multimodal else None))
            src.add_fresh_pos_embeds(model)
            problems = src.problems(llm_linear_shapes(model))
            if problems:
                raise CheckpointError(f"cannot merge {model_dir} into {base_dir}: " + " | ".join(problems))

            def out_dtype(key: str) -> torch.dtype:
                stored = src.dtype(key)
                if cast is None or not stored.is_floating_point or key.endswith("pos_embed"):
                    return stored  # pos_embed stays float16, as the loader keeps it
                return cast

            keys = src.keys()
            sizes = {k: torch.Size(src.shape(k)).numel() * out_dtype(k).itemsize for k in keys}
            shards = _plan_shards(sizes, shard_bytes)
            names = (["model.safetensors"] if len(shards) == 1 else
                     [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
            for name, shard in zip(names, shards):
                tensors = {k: src.get(k).to(out_dtype(k)).contiguous() for k in shard}
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
                del tensors
        if len(shards) > 1:
            weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2))
        _copy_side_files(model_dir, base_dir, tmp, cfg.mm_vision_tower)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_side_files(model_dir: Path, base_dir: Path, out: Path, tower: str | None) -> None:
    shutil.copy(model_dir / "config.json", out / "config.json")
    for name in BASE_FILES:
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, out / name)
    for name in ("generation_config.json", "preprocessor_config.json"):
        src = model_dir / name if (model_dir / name).exists() else base_dir / name
        if src.exists():
            shutil.copy(src, out / name)
    # A relative `mm_vision_tower` found inside the LoRA checkpoint (where weights.download puts
    # it) must be found inside the merged one too.
    if tower and not Path(tower).is_absolute() and (model_dir / tower / "config.json").exists():
        shutil.copytree(model_dir / tower, out / tower)


def main(argv: list[str] | None = None) -> int:
    from model.checkpoint import CheckpointError

    ap = argparse.ArgumentParser(prog="python -m weights.merge_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the LoRA checkpoint directory")
    ap.add_argument("--model-base", required=True, help="its base model directory")
    ap.add_argument("--out", required=True, help="where the merged checkpoint goes (must not exist or be empty)")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="auto: each tensor keeps its stored dtype")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="largest safetensors shard, in GB")
    args = ap.parse_args(argv)
    try:
        path = merge_lora(args.model, args.model_base, args.out, dtype=args.dtype,
                          shard_bytes=int(args.shard_gb * 10**9))
    except (CheckpointError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

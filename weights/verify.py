"""Check a checkpoint directory without loading the model.

    python -m weights.verify DIR [--model-base BASE] [--json]

Reads config.json and the weight index/headers, builds the model on the meta device (no memory),
and reports missing, unexpected and mis-shaped keys plus parameter counts. Exit code 1 when the
checkpoint is unusable. A LoRA checkpoint (SliME-Llama3-70B) is checked against its base model:
the adapter's config, its ranks and shapes against the base's weights, adapter keys nothing uses,
targeted modules the adapter has no weights for, and the non-LoRA trainables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _open(directory: Path, base: Path | None, report: dict):
    """The checkpoint's tensors (a LoRA checkpoint merged with its base), or None with the reason
    added to the report's problems."""
    from model.checkpoint import CheckpointError, TensorSource, weight_files
    from model.lora import LoraSource, is_lora_checkpoint, missing_base_message

    try:
        if is_lora_checkpoint(directory):
            if base is None:
                report["problems"].append(missing_base_message(directory))
                return None
            src = LoraSource(directory, base)
            report["lora"] = {"base": str(base), "r": src.config.r, "alpha": src.config.alpha,
                              "target_modules": src.config.target_modules, "merged_weights": len(src.pairs)}
            return src
        if base is not None:
            report["problems"].append(f"a base model was given but {directory} is not a LoRA checkpoint "
                                      "(no adapter_config.json)")
            return None
        files = weight_files(directory)
    except (CheckpointError, FileNotFoundError) as e:
        report["problems"].append(str(e))
        return None
    report["weight_files"] = [f.name for f in files]
    return TensorSource(files)


def verify(directory: str | Path, base: str | Path | None = None) -> dict:
    from model.checkpoint import TensorSource, weight_files
    from model.config import SliMEConfig, VisionConfig
    from model.loading import VISION_PREFIX, _ignorable, infer_vision_config
    from model.lora import LoraSource, llm_linear_shapes
    from model.modeling import SliMEForCausalLM

    directory = Path(directory)
    report: dict = {"path": str(directory), "ok": False, "problems": []}
    try:
        cfg = SliMEConfig.from_file(directory)
    except (OSError, ValueError, KeyError) as e:
        report["problems"].append(f"config.json: {e}")
        return report
    src = _open(directory, Path(base) if base is not None else None, report)
    if src is None:
        return report
    with src:
        vision_cfg = cfg.vision
        tower = None
        if cfg.is_multimodal and vision_cfg is None:
            if any(True for _ in src.items_with_prefix(VISION_PREFIX)):
                vision_cfg = infer_vision_config(src, VISION_PREFIX)
            else:
                tower_dir = directory / (cfg.mm_vision_tower or "")
                if (tower_dir / "config.json").exists():
                    vision_cfg = VisionConfig.from_dict(json.loads((tower_dir / "config.json").read_text()))
                    tower = TensorSource(weight_files(tower_dir))
                else:
                    report["problems"].append(
                        f"vision tower {cfg.mm_vision_tower!r} is not in the weights nor a local directory "
                        "(it will be needed at load time)")
        with torch.device("meta"):
            model = SliMEForCausalLM(cfg, vision_cfg)
        if isinstance(src, LoraSource):
            src.add_fresh_pos_embeds(model)
            report["problems"] += src.problems(llm_linear_shapes(model))
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        missing, misshaped, used = [], [], set()
        for ours, key in model.checkpoint_names().items():
            s = src
            if key.startswith(VISION_PREFIX) and tower is not None:
                s, key = tower, key[len(VISION_PREFIX):]
            if key not in s and ours == "llm.lm_head.weight" and cfg.tie_word_embeddings:
                key = "model.embed_tokens.weight"
            if key not in s:
                if not (key.startswith(VISION_PREFIX) and vision_cfg is None):
                    missing.append(key)
                continue
            if s is src:
                used.add(key)
            if s.shape(key) != shapes[ours]:
                misshaped.append(f"{key}: checkpoint {list(s.shape(key))}, model {list(shapes[ours])}")
        unexpected = [k for k in src.keys() if k not in used and not _ignorable(k, model)]
        if isinstance(src, LoraSource) and missing:
            report["problems"].append(f"{len(missing)} key(s) in neither the base model nor non_lora_trainables.bin "
                                      f"(see missing), e.g. {missing[0]}")
        if tower is not None:
            tower.close()
        counts = {"llm": sum(p.numel() for p in model.llm.parameters())}
        if model.vision_tower is not None:
            counts["vision_tower_used"] = sum(p.numel() for p in model.vision_tower.parameters())
        if model.mm_projector is not None:
            counts["projector"] = sum(p.numel() for p in model.mm_projector.parameters())
        if model.post_qformer is not None:
            counts["local_resampler"] = sum(p.numel() for p in model.post_qformer.parameters())
    report.update(missing=missing, unexpected=unexpected, misshaped=misshaped, parameters=counts,
                  projector=cfg.mm_projector_type, local_branch=cfg.has_local_branch)
    report["ok"] = not (missing or unexpected or misshaped or report["problems"])
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weights.verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--model-base", default=None, help="base model directory of a LoRA checkpoint")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    report = verify(args.dir, args.model_base)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['path']}: {'OK' if report['ok'] else 'UNUSABLE'}")
        for key in ("problems", "missing", "unexpected", "misshaped"):
            for item in report.get(key, []):
                print(f"  {key}: {item}")
        for name, n in report.get("parameters", {}).items():
            print(f"  parameters {name}: {n:,}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

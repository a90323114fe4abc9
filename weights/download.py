"""Download an official checkpoint and the CLIP tower it names (resumable, via huggingface_hub);
for a LoRA checkpoint (SliME-Llama3-70B), its base model too.

    python -m weights.download yifanzhang114/SliME-Llama3-8B [--dir checkpoints/SliME-Llama3-8B]
    python -m weights.download yifanzhang114/SliME-llama3-70B [--base REPO] [--base-dir DIR]

The tower goes inside the checkpoint directory and `mm_vision_tower` keeps its hub id: the
loader looks for a relative path in the checkpoint first, so the pair works offline afterwards.
A LoRA checkpoint's base goes to its own directory (default checkpoints/<base name>); serve the
pair with `--model DIR --model-base BASE_DIR`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.txt", "*.py"]
# Official LoRA checkpoints whose adapter config names the training machine's path, not a hub id.
KNOWN_BASES = {"yifanzhang114/slime-llama3-70b": "meta-llama/Meta-Llama-3-70B-Instruct"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def download(repo_id: str, directory: str | Path | None = None, *, revision: str | None = None,
             token: str | None = None, base: str | None = None, base_dir: str | Path | None = None) -> Path:
    """The checkpoint's directory (its base, for a LoRA checkpoint, fetched as well)."""
    return download_checkpoint(repo_id, directory, revision=revision, token=token, base=base, base_dir=base_dir)[0]


def download_checkpoint(repo_id: str, directory: str | Path | None = None, *, revision: str | None = None,
                        token: str | None = None, base: str | None = None,
                        base_dir: str | Path | None = None) -> tuple[Path, Path | None]:
    """(checkpoint directory, base model directory or None when it is no LoRA checkpoint)."""
    from huggingface_hub import snapshot_download

    from model.lora import is_lora_checkpoint

    target = Path(directory or Path("checkpoints") / repo_id.split("/")[-1])
    target.mkdir(parents=True, exist_ok=True)
    # snapshot_download resumes partial files and skips complete ones.
    snapshot_download(repo_id, local_dir=str(target), revision=revision, token=token, allow_patterns=PATTERNS)
    config_path = target / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{repo_id} has no config.json: not a checkpoint")
    tower = json.loads(config_path.read_text()).get("mm_vision_tower")
    if tower and not Path(tower).is_absolute() and not (target / tower / "config.json").exists():
        print(f"downloading vision tower {tower}", file=sys.stderr)
        snapshot_download(tower, local_dir=str(target / tower), token=token, allow_patterns=_weight_patterns(tower))
    if not is_lora_checkpoint(target):
        return target, None
    base_repo = lora_base_repo(target, repo_id, base)
    base_path = Path(base_dir or Path("checkpoints") / base_repo.split("/")[-1])
    print(f"downloading base model {base_repo} to {base_path}", file=sys.stderr)
    base_path.mkdir(parents=True, exist_ok=True)
    try:
        # `original/` holds Meta's own consolidated .pth copy of the weights: not needed.
        snapshot_download(base_repo, local_dir=str(base_path), token=token, allow_patterns=_weight_patterns(base_repo),
                          ignore_patterns=["original/*"])
    except Exception as e:
        raise RuntimeError(f"downloading base model {base_repo} failed: {e} (gated repositories such as "
                           "meta-llama's need their licence accepted on the hub and a token: --token or "
                           "HF_TOKEN)") from e
    return target, base_path


def lora_base_repo(checkpoint: Path, repo_id: str, base: str | None = None) -> str:
    """Which hub repository holds a LoRA checkpoint's base model: `base` when given, then the
    known base of an official checkpoint, then the adapter config's `base_model_name_or_path`
    when it is a hub id."""
    from model.lora import base_model_name

    if base:
        return base
    known = KNOWN_BASES.get(repo_id.lower())
    if known:
        return known
    named = base_model_name(checkpoint)
    if named and HUB_ID.fullmatch(named):
        return named
    raise ValueError(f"{repo_id} is a LoRA checkpoint whose base model ({named!r} in adapter_config.json) is "
                     "not a hub id: name it with --base")


def _weight_patterns(repo_id: str) -> list[str]:
    return ["*.json", "*.safetensors", "*.txt", "tokenizer.model"] if _has_safetensors(repo_id) else PATTERNS


def _has_safetensors(repo_id: str) -> bool:
    try:
        from huggingface_hub import list_repo_files

        return any(f.endswith(".safetensors") for f in list_repo_files(repo_id))
    except Exception:  # noqa: BLE001 - offline or private: fall back to every weight format
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weights.download", description=__doc__.split("\n\n")[0])
    ap.add_argument("repo_id")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--revision", default=None)
    ap.add_argument("--token", default=None, help="hub token (default: HF_TOKEN / cached login)")
    ap.add_argument("--base", default=None, help="hub repository of a LoRA checkpoint's base model "
                    f"(default: known for official checkpoints, e.g. {KNOWN_BASES['yifanzhang114/slime-llama3-70b']})")
    ap.add_argument("--base-dir", default=None, help="where the base model goes (default: checkpoints/<base name>)")
    args = ap.parse_args(argv)
    try:
        path, base_path = download_checkpoint(args.repo_id, args.dir, revision=args.revision, token=args.token,
                                              base=args.base, base_dir=args.base_dir)
    except Exception as e:  # noqa: BLE001 - report any hub/network failure as one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    if base_path is not None:
        print(base_path)
        print(f"LoRA checkpoint: serve it with --model {path} --model-base {base_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

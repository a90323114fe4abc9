"""Download an official checkpoint and the CLIP tower it names (resumable, via huggingface_hub).

    python -m weights.download yifanzhang114/SliME-Llama3-8B [--dir checkpoints/SliME-Llama3-8B]

The tower goes inside the checkpoint directory and `mm_vision_tower` keeps its hub id: the
loader looks for a relative path in the checkpoint first, so the pair works offline afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.txt", "*.py"]


def download(repo_id: str, directory: str | Path | None = None, *, revision: str | None = None,
             token: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

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
        snapshot_download(tower, local_dir=str(target / tower), token=token,
                          allow_patterns=["*.json", "*.safetensors", "*.txt"] if _has_safetensors(tower) else PATTERNS)
    return target


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
    args = ap.parse_args(argv)
    try:
        path = download(args.repo_id, args.dir, revision=args.revision, token=args.token)
    except Exception as e:  # noqa: BLE001 - report any hub/network failure as one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

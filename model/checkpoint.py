"""Finding and reading checkpoint tensors without loading the model (safetensors, sharded, .bin)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import torch

# safetensors' dtype names (its header's) -> torch dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """The checkpoint cannot be used; the message says why."""


WEIGHT_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, preferring safetensors."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.exists():
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({directory / name for name in weight_map.values()})
            missing = [p.name for p in files if not p.exists()]
            if missing:
                raise FileNotFoundError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
            return files
        if (directory / single).exists():
            return [directory / single]
    shards = sorted(directory.glob("model-*-of-*.safetensors")) or sorted(directory.glob("pytorch_model-*-of-*.bin"))
    if shards:
        return shards
    raise FileNotFoundError(f"no weights in {directory} (looked for {', '.join(WEIGHT_PATTERNS)})")


class TensorSource:
    """Lazy access to every tensor of a set of weight files: names and shapes without reading data,
    and one tensor at a time (safetensors memory-mapped, `.bin` via `torch.load(mmap=True)`)."""

    def __init__(self, files: list[Path]):
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        self._bins: dict[str, torch.Tensor] = {}
        from safetensors import safe_open

        for path in files:
            if path.suffix == ".safetensors":
                handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                for key in handle.keys():
                    self._where[key] = handle
            else:
                sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
                for key, tensor in sd.items():
                    self._where[key] = None
                    self._bins[key] = tensor

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._where[key]
        if handle is None:
            return tuple(self._bins[key].shape)
        return tuple(handle.get_slice(key).get_shape())  # type: ignore[attr-defined]

    def dtype(self, key: str) -> torch.dtype:
        handle = self._where[key]
        if handle is None:
            return self._bins[key].dtype
        return SAFETENSORS_DTYPES[handle.get_slice(key).get_dtype()]  # type: ignore[attr-defined]

    def dtype_name(self, key: str) -> str:
        return str(self.dtype(key)).replace("torch.", "")

    def get(self, key: str) -> torch.Tensor:
        handle = self._where[key]
        if handle is None:
            return self._bins[key]
        return handle.get_tensor(key)  # type: ignore[attr-defined]

    def items_with_prefix(self, prefix: str) -> Iterator[str]:
        return (k for k in self._where if k.startswith(prefix))

    def close(self) -> None:
        self._stack.close()
        self._bins.clear()

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

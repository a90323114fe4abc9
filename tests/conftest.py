"""Shared fixtures: tiny checkpoints built once per session, and the two shared photos
(paths and helpers live in tests/live.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.live import photo


@pytest.fixture(scope="session")
def c_compiler() -> str:
    """torch.compile on the CPU builds C++: the tests that compile need a compiler."""
    import shutil

    from tests.tools import missing_tool

    cc = shutil.which("cc")
    if cc is None:
        missing_tool("torch.compile on the CPU needs a C compiler (apt-get install gcc)")
    return cc


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from weights.make_tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory) -> Path:
    from weights.make_tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-llama3", template="llama3", seed=1)


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory) -> tuple[Path, Path]:
    """(LoRA checkpoint, its base model) in SliME-Llama3-70B's layout (weights.tiny_lora)."""
    from weights.tiny_lora import make_tiny_lora

    root = tmp_path_factory.mktemp("lora")
    return make_tiny_lora(root / "tiny-lora", root / "tiny-lora-base")


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir):
    from model.loading import LoadOptions, load_model

    return load_model(tiny_dir, LoadOptions(device="cpu"))


@pytest.fixture(scope="session")
def ironing():
    from model.images import load_image

    return load_image(photo("extreme_ironing.jpg"))


@pytest.fixture(scope="session")
def waterview():
    from model.images import load_image

    return load_image(photo("waterview.jpg"))

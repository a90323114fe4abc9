"""Tests that need an outside tool (Chromium, Podman, nginx, a C compiler, unshare ...)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

VENV_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing_tool(reason: str):
    """Skip, saying why, on a laptop without the tool; fail under CI=true (our CI installs every
    tool, so a missing one there is a broken pipeline, not a reason to pass)."""
    if in_ci():
        pytest.fail(f"CI=true and a required tool is missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def tool(name: str, package: str) -> str:
    """The path of the command `name` (on PATH or in .venv/bin), else missing_tool naming `package`."""
    path = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    if path is None:
        missing_tool(f"{name} is missing: install {package} (make test-deploy installs it)")
    return path

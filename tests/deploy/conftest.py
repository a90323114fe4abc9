"""Deployment checks with real tools. Each skips with the package to install when a tool is
missing; `make test-deploy` installs them first (CI runs it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.tools import missing_tool

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def tool(name: str, package: str) -> str:
    path = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    if path is None:
        missing_tool(f"{name} is missing: install {package} (make test-deploy installs it)")
    return path


@pytest.fixture(scope="session")
def repo() -> Path:
    return ROOT

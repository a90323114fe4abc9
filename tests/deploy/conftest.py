"""Deployment checks with real tools. Each skips with the package to install when a tool is
missing; `make test-deploy` installs them first (CI runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.live import ROOT


@pytest.fixture(scope="session")
def repo() -> Path:
    return ROOT

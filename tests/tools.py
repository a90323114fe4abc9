"""Tests that need an outside tool (Chromium, Podman, nginx, a C compiler, unshare ...)."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing_tool(reason: str):
    """Skip, saying why, on a laptop without the tool; fail under CI=true (our CI installs every
    tool, so a missing one there is a broken pipeline, not a reason to pass)."""
    if in_ci():
        pytest.fail(f"CI=true and a required tool is missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

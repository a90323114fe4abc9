"""Settings come from one place, and README's settings table says what the code does."""

import ast
import re
from pathlib import Path

import pytest

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


_ENV_NAMES = {"environ", "environb", "getenv", "getenvb"}


def _environment_reads(tree: ast.AST) -> list[int]:
    """Lines that read the process environment: `os.environ`, `os.getenv(...)` (any module alias),
    `from os import getenv` / `environ` (any alias), and `from posix import ...` alike."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _ENV_NAMES:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "posix", "nt"):
            lines += [node.lineno for a in node.names if a.name in _ENV_NAMES or a.name == "*"]
    return lines


@pytest.mark.parametrize("source, reads", [
    ("import os\nos.environ['X']", True), ("import os as o\no.getenv('X')", True),
    ("from os import getenv\ngetenv('X')", True), ("from os import environ as e\ne.get('X')", True),
    ("from os import *", True), ("from posix import environ", True),
    ("from os import path\npath.join('a')", False), ("import os\nos.cpu_count()", False),
])
def test_the_environment_check_sees_every_spelling(source, reads):
    assert bool(_environment_reads(ast.parse(source))) is reads


def test_only_the_settings_module_reads_the_environment():
    for package in ("server", "model", "weights"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "server" / "settings.py":
                continue
            lines = _environment_reads(ast.parse(path.read_text()))
            assert not lines, f"{path.relative_to(ROOT)}:{lines[0]} reads the environment"


def test_the_readme_table_lists_every_setting_with_its_flag_variable_and_default():
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| `(--[a-z-]+)` \| `(SLIME_[A-Z_]+)` \| `([^`]*)`", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in rows, f"README's settings table lacks {flag}"
        env, default = rows[flag]
        assert env == "SLIME_" + name.upper()
        if name == "cache_dir":
            continue  # shown as ~/.cache/slime-serve
        want = field.default if field.default_factory is None else field.default_factory()
        assert default == str(want), f"{flag}: README says {default!r}, the code {want!r}"
    assert set(rows) == {"--" + n.replace("_", "-") for n in Settings.model_fields}  # nothing stale

"""Settings come from one place, and README's settings table says what the code does."""

import ast
import re
from pathlib import Path

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_only_the_settings_module_reads_the_environment():
    for package in ("server", "model", "weights"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "server" / "settings.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                    raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} reads the environment")


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

"""One meaning per name: no class or module-level constant is defined in two modules of
server/, model/ or weights/ (two VISION_PREFIXes with different values, two NULL_BLOCKs and three
copies of one pydantic base were found this way), and code known dead stays gone."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def definitions() -> dict[str, list[str]]:
    where = defaultdict(list)
    for pkg in ("server", "model", "weights"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                names = [node.name] if isinstance(node, ast.ClassDef) else [
                    t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name) and t.id.isupper()]
                for name in names:
                    where[name].append(str(path.relative_to(ROOT)))
    return where


def test_no_class_or_constant_is_defined_twice():
    where = definitions()
    assert "NULL_BLOCK" in where and "SequenceState" in where
    twice = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not twice, twice


def test_dead_code_stays_gone():
    scheduler = (ROOT / "server/engine/scheduler.py").read_text()
    runner = (ROOT / "server/engine/runner.py").read_text()
    assert "scheduled_time" not in scheduler and "def length" not in scheduler
    assert "    def decode(" not in runner and "class SeqState" not in runner

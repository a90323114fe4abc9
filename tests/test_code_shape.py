"""Size limits that keep the server readable (issue 24): no function in server/ over 50 lines,
and the engine core under 250 (its module too)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _defs(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node, node.end_lineno - node.lineno + 1


def test_no_function_in_the_server_is_over_50_lines():
    long = [f"{p.relative_to(ROOT)}:{n.name} ({size})" for p in (ROOT / "server").rglob("*.py")
            for n, size in _defs(p) if not isinstance(n, ast.ClassDef) and size > 50]
    assert not long, long


def test_the_engine_classes_are_under_250_lines():
    sizes = {n.name: size for p in (ROOT / "server/engine/engine.py", ROOT / "server/engine/client.py")
             for n, size in _defs(p) if isinstance(n, ast.ClassDef)}
    assert sizes["EngineCore"] < 250 and sizes["Engine"] < 250, sizes
    assert len((ROOT / "server/engine/engine.py").read_text().splitlines()) < 250

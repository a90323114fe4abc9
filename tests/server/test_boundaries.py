"""The import direction routes -> chat -> engine client -> engine -> model holds, and the engine
process never loads the HTTP stack."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HTTP = ("fastapi", "starlette", "uvicorn", "pydantic_settings", "server.app", "server.chat", "server.routes",
        "server.protocol", "server.settings", "server.middleware", "server.media", "server.fetch", "server.errors",
        "server.metrics")


def _imports(path: Path, package: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module or "")
    return out


def test_the_engine_package_imports_nothing_of_http():
    for path in sorted((ROOT / "server" / "engine").glob("*.py")):
        bad = {m for m in _imports(path, "server.engine") if m.startswith(HTTP)}
        assert not bad, f"{path.name} imports {bad}"


def test_the_model_package_imports_neither_server_nor_http():
    for path in sorted((ROOT / "model").glob("*.py")):
        bad = {m for m in _imports(path, "model") if m.startswith(("server",) + HTTP)}
        assert not bad, f"{path.name} imports {bad}"


def test_the_engine_process_entry_point_loads_no_http_module():
    code = ("import sys, server.engine.process, server.engine.build, server.engine.factory; "
            "print(sorted(m for m in sys.modules if m.startswith(%r)))" % (HTTP,))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_http_side_reaches_the_engine_only_through_its_interface_and_types():
    allowed = {"server.engine.interface", "server.engine.types", "server.engine.factory", "server.engine.build"}
    for path in sorted((ROOT / "server").glob("*.py")) + sorted((ROOT / "server" / "routes").glob("*.py")):
        package = "server.routes" if path.parent.name == "routes" else "server"
        engine = {m for m in _imports(path, package) if m.startswith("server.engine")}
        assert engine <= allowed, f"{path.name} imports {engine - allowed}"


def test_the_scheduler_and_the_vision_cache_need_no_torch():
    code = ("import sys, server.engine.scheduler, server.engine.vision_cache, server.engine.types, "
            "server.engine.stopping, server.engine.streams; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""The layering of DESIGN.md, read from every file's imports (lazy ones included): dependencies
point one way, no import cycles, and the worker process never loads the HTTP or tokenizer stack."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .processes import Process

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("faasmoe", "runtime", "worker")

# layer -> the project modules it may import (prefix match); a layer always may import itself.
ALLOWED = {
    "faasmoe.model": (),
    # runtime.compute: the lean compute thread a frontend and a worker both run torch work on (no I/O, no messages)
    "faasmoe.engine": ("faasmoe.model", "runtime.client", "runtime.protocol", "runtime.compute"),
    "faasmoe.tenancy": (),
    "faasmoe.api": ("faasmoe.engine", "faasmoe.model", "faasmoe.tenancy", "runtime.metrics", "runtime.protocol"),
    "worker": ("faasmoe.model", "runtime"),
    "runtime": (),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """Every project module a file imports, at the top or inside a function: `from a import b` is
    module a.b when that is a module, else a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    files = {module_name(f): f for pkg in PACKAGES for f in (REPO / pkg).rglob("*.py")}
    return {mod: {m for m in project_imports(f, set(files)) if m != mod} for mod, f in files.items()}


def layer_of(module: str) -> str | None:
    return next((layer for layer in sorted(ALLOWED, key=len, reverse=True)
                 if module == layer or module.startswith(layer + ".")), None)


def check_layers(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imports in edges.items():
        layer = layer_of(module)
        if layer is None:
            continue
        allowed = (layer, *ALLOWED[layer])
        wrong += [f"{module} -> {m}" for m in imports if not any(m == a or m.startswith(a + ".") for a in allowed)]
    return sorted(wrong)


def test_dependencies_point_one_way() -> None:
    wrong = check_layers(graph())
    assert not wrong, "imports against the layering of DESIGN.md:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(edges[module]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from faasmoe.api.app import create_app\n")
    assert project_imports(bad, {"faasmoe.api.app"}) == {"faasmoe.api.app"}
    assert "faasmoe.model -> faasmoe.api.app" in check_layers({"faasmoe.model": {"faasmoe.api.app"}})
    assert layer_of("faasmoe.model.trunk") == "faasmoe.model" and layer_of("faasmoe.cli") is None


HEAVY = ("aiohttp", "tokenizers", "jinja2")


def test_worker_modules_do_not_import_the_http_or_tokenizer_stack() -> None:
    code = ("import sys, worker.cli, worker.worker, worker.memory, runtime.budgets; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_a_running_worker_has_no_http_or_tokenizer_libraries_mapped(tmp_path: Path) -> None:
    sock = tmp_path / "w.sock"
    worker = Process([sys.executable, "-m", "worker", "--token", "t", "--device", "cpu", "--listen", f"unix:{sock}",
                      "--memory", "64MiB", "--host-cache", "0"])
    try:
        worker.wait_for("listening at", timeout=120)
        time.sleep(0.2)
        maps = Path(f"/proc/{worker.proc.pid}/maps").read_text()
        assert "libtorch" in maps  # the check can see the libraries a worker does load
        assert not [lib for lib in ("aiohttp", "tokenizers", "markupsafe") if f"/{lib}/" in maps]
    finally:
        worker.stop()

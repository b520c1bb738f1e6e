"""The project's structure: no import cycle among its modules, no source module over 500
lines, and a CLI whose common verbs import neither aiohttp nor asyncio.

Imports are read from the source (ast), every one of them: at the top, inside functions
and under `if TYPE_CHECKING:` alike, since a cycle that only the type checker sees still
ties two modules together. An import names a module (`import a.b`, `from a import b`
where a/b.py exists) or a package's __init__ (`from a import name`); a module is not
taken to import its parent packages, so a package re-exporting its submodules is fine.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("supervisor", "shared", "sidecar", "services")
MAX_LINES = 500


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """{dotted name: file} of every module below the given top-level packages."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules that `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                named.add(submodule if submodule in modules else base)
    return {target for target in named if target in modules and target != name}


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    modules = find_modules(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_among_the_project_modules():
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 50 and graph["supervisor.daemon"] >= {"supervisor.control", "supervisor.builder"}
    assert cycles(graph) == []


def test_the_control_server_does_not_know_the_daemon():
    graph = import_graph(ROOT, PACKAGES)
    assert "supervisor.daemon" not in graph["supervisor.control"]
    assert "supervisor.daemon" not in graph["supervisor.verbs"]


def test_the_cli_and_its_status_import_neither_aiohttp_nor_asyncio(tmp_path):
    """Every `supervisor status` (and scale, restart, logs...) pays for what the CLI
    imports: aiohttp alone took ~0.3 s of it. The verbs that need aiohttp, asyncio or
    psutil (start, intentions, status --cluster without a supervisor) import them
    themselves. Checked in a new interpreter: importing the CLI, then `status` with no
    supervisor running (the config loaded, the control socket tried)."""
    (tmp_path / "config").mkdir()
    (tmp_path / "Procfile").write_text("web: sleep 60\n")
    (tmp_path / "config" / "meshvisor.toml").write_text("[services.web]\nsidecar = false\n")
    code = textwrap.dedent("""
        import sys
        import supervisor.cli
        imported = {m for m in ("aiohttp", "asyncio", "psutil") if m in sys.modules}
        try:
            supervisor.cli.main(["status"])
        except SystemExit as exc:
            code = exc.code
        print(sorted(imported), sorted(m for m in ("aiohttp", "asyncio", "psutil") if m in sys.modules), code)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("MESHVISOR_CONFIG", None)
    env.pop("MESHVISOR_STATE_DIR", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.stdout.strip() == "[] [] 3", done.stderr
    assert "the supervisor is not running" in done.stderr


def test_no_source_module_over_500_lines():
    too_long = {
        str(path.relative_to(ROOT)): lines
        for path in find_modules(ROOT, PACKAGES).values()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert too_long == {}


def test_a_cycle_through_a_type_checking_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.c import C\n")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import thing\n"
    )
    (package / "sub" / "c.py").write_text("def f():\n    from . import d\nC = 1\n")
    (package / "sub" / "d.py").write_text("from pkg.sub import c\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.sub.c"] == {"pkg.sub.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.sub.c", "pkg.sub.d"]]

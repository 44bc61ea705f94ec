"""The package layering (ARCHITECTURE.md): imports go one way, and no module imports itself back.

kernels < adapt < compression < server < client: a package may import its own modules and those of the
packages below it, never above. The generated API (`adaptclip.v1`) belongs to the transport layers
(server, client) only. Every import counts, including those inside functions: a lazy import is still a
dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "adapt", "compression", "server", "client")  # folder = subpackage of adaptclip
TRANSPORT_ONLY = "v1"


def _modules() -> dict[str, Path]:
    mods = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).glob("*.py")):
            name = f"adaptclip.{layer}" if path.stem == "__init__" else f"adaptclip.{layer}.{path.stem}"
            mods[name] = path
    return mods


def _imports(path: Path, package: str) -> set[str]:
    """Every adaptclip module `path` imports (absolute or relative, at any depth of the file)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m == "adaptclip" or m.startswith("adaptclip.")}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = _modules()
GRAPH = {name: {m for m in _imports(path, name.rsplit(".", 1)[0] if not path.stem == "__init__" else name)
                if m in MODULES or _layer(m) in (*LAYERS, TRANSPORT_ONLY)} for name, path in MODULES.items()}


def test_every_layer_is_found() -> None:
    assert {_layer(m) for m in MODULES} == set(LAYERS)
    assert len(MODULES) > 40


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_one_way(module: str) -> None:
    rank = LAYERS.index(_layer(module))
    for target in sorted(GRAPH[module]):
        layer = _layer(target)
        if layer == TRANSPORT_ONLY:
            assert rank >= LAYERS.index("server"), f"{module} imports the generated API {target}: compute " \
                                                    f"layers take tensors, not messages"
        elif layer in LAYERS:
            assert LAYERS.index(layer) <= rank, f"back-edge: {module} ({LAYERS[rank]}) imports {target} ({layer})"


def test_no_import_cycles() -> None:
    """Depth-first search over module imports; any edge back to a module on the stack is a cycle."""
    edges = {m: {t for t in targets if t in MODULES and t != m} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_checker_sees_back_edges_and_cycles(tmp_path: Path) -> None:
    """The walk above must bite: a relative import and a function-local import are both found."""
    src = tmp_path / "mod.py"
    src.write_text("from .views import X\n\ndef f():\n    from adaptclip.server.app import App\n")
    assert _imports(src, "adaptclip.adapt") >= {"adaptclip.adapt.views", "adaptclip.server.app"}


def test_no_source_file_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for folder in (*LAYERS, "tests", "bench") for p in (ROOT / folder).glob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def _top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_declared() -> None:
    """Each non-stdlib package the installed code imports is a dependency (or an extra) in pyproject.toml."""
    import importlib.metadata
    import re
    import sys
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    declared = {norm(re.split(r"[\s;<>=!~\[]", d, maxsplit=1)[0]) for d in specs}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for name, path in MODULES.items():
        for top in _top_level_imports(path) - set(sys.stdlib_module_names) - {"adaptclip", "__future__"}:
            if not {norm(d) for d in distributions.get(top, [top])} & declared:
                missing.setdefault(top, name)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"

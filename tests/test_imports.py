"""The layering rules, read from the source: the engine never imports the nodes or the trainer, its import graph
(function-level imports included) has no cycle, and the nodes reach the engine with plain imports only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "zimage_core"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return found


def engine_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ENGINE.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for imp in imports_of(path):
            parts = imp.split(".")
            # importing a.b.c runs a.b's __init__ too; the root package's __init__ is trivial
            for i in range(2, len(parts) + 1):
                dep = ".".join(parts[:i])
                # a module's own packages are initialised before it runs: importing them is never a cycle
                if dep in files and dep != mod and not mod.startswith(dep + "."):
                    deps.add(dep)
        graph[mod] = deps
    return graph


def test_engine_imports_neither_nodes_nor_train_nor_comfyui():
    bad = {}
    for path in ENGINE.rglob("*.py"):
        hits = sorted(
            i for i in imports_of(path) if i.split(".")[0] in ("nodes", "train", "comfy", "folder_paths", "server")
        )
        if hits:
            bad[module_name(path)] = hits
    assert not bad


def test_engine_import_graph_has_no_cycle():
    graph = engine_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert "zimage_core.checkpoints" not in {d for d in graph["zimage_core.quant.load"]}


def absolute_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add(node.module)
    return out


def test_nodes_use_plain_imports_of_the_engine():
    engine_users = 0
    for path in (ROOT / "nodes").glob("*.py"):
        text = path.read_text()
        imps = imports_of(path)
        engine_users += any(i.startswith("zimage_core.") for i in imps)
        assert "inspect" not in imps, f"{path.name} probes signatures"
        assert not any(i.split(".")[0] == "zimage_core" for i in absolute_imports(path)), (
            f"{path.name}: import the engine relatively (from ..zimage_core import ...), as ComfyUI loads the pack"
        )
        if path.name not in ("host.py",):
            assert "importlib" not in imps, f"{path.name} imports modules dynamically"
        assert "BlockStreamer" not in text, f"{path.name} builds a block streamer (use memory.Residency)"
    assert engine_users >= 5  # the check above really saw the engine imports

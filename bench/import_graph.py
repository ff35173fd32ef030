"""Which part of cunet_optimize imports which: the package-level import graph, from the source.

A node is a subpackage (exporters, surgery, profiling...) or a top-level module (build, tasks,
cli...); `cunet_optimize` itself is the package's __init__. Every `import` / `from ... import`
statement of toolkit/cunet_optimize that names another node is an edge, read with `ast`
(nothing is imported, so the graph of a broken tree can still be drawn). Imports inside
the same node are not edges.

Where an import sits decides what it costs, so the edges are counted in two kinds:
  module-level  runs when the importing module is imported (top level, class bodies,
                module-level `if`/`try`); these are the edges a cycle check must see;
  lazy          inside a function: runs only when that function is called (the way a
                command keeps torch off a path that does not need it). Counted separately
                and never part of a cycle; `if TYPE_CHECKING:` blocks are left out (they
                never run).

    python bench/import_graph.py                 # text: edges, then cycles
    python bench/import_graph.py --json out.json # the same as JSON (edges with their sites)

Exit status 1 when the module-level graph has a cycle.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "cunet_optimize"
DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "toolkit" / PACKAGE
MODULE_LEVEL, LAZY = "module-level", "lazy"


@dataclass
class Edge:
    importer: str
    imported: str
    sites: dict[str, list[str]] = field(default_factory=lambda: {MODULE_LEVEL: [], LAZY: []})


def node_of(module: str) -> str:
    """`cunet_optimize.onnx_tools.verify` -> `onnx_tools`; the package itself -> `cunet_optimize`."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        raise ValueError(module)
    return parts[1] if len(parts) > 1 else PACKAGE


def _is_submodule(dotted: str, root: Path) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (root / rel).is_dir() or (root / rel).with_suffix(".py").is_file()


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(stmt: ast.Import | ast.ImportFrom, module: str, is_package: bool, root: Path) -> list[str]:
    """The cunet_optimize modules a statement loads (names imported from a package count
    as modules when a file of that name exists: `from cunet_optimize import tasks`)."""
    if isinstance(stmt, ast.Import):
        return [a.name for a in stmt.names if a.name.split(".")[0] == PACKAGE]
    if stmt.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (stmt.level - 1)]
        source = ".".join(base + ([stmt.module] if stmt.module else []))
    else:
        source = stmt.module or ""
    if source.split(".")[0] != PACKAGE:
        return []
    found = []
    for alias in stmt.names:
        candidate = f"{source}.{alias.name}"
        found.append(candidate if alias.name != "*" and _is_submodule(candidate, root) else source)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(tree: ast.AST):
    """(import statement, kind) for every import that can run."""
    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    yield from visit_one(other, lazy)
                continue
            yield from visit_one(child, lazy)

    def visit_one(child, lazy):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, LAZY if lazy else MODULE_LEVEL
        else:
            yield from visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from visit(tree, False)


def module_of(module: str) -> str:
    """The finest grain: every module is its own node."""
    return module


def import_graph(root: Path = DEFAULT_ROOT, node=node_of) -> dict[tuple[str, str], Edge]:
    """The edges between nodes, `node` mapping a module to its node: its subpackage
    (node_of, the default) or the module itself (module_of)."""
    edges: dict[tuple[str, str], Edge] = {}
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        importer = node(module)
        tree = ast.parse(path.read_text(), filename=str(path))
        for stmt, kind in _walk(tree):
            for target in sorted(set(_imported_modules(stmt, module, path.name == "__init__.py", root))):
                imported = node(target)
                if imported == importer:
                    continue
                edge = edges.setdefault((importer, imported), Edge(importer, imported))
                edge.sites[kind].append(f"{path.relative_to(root)}:{stmt.lineno}")
    return edges


def cycles(edges: dict[tuple[str, str], Edge], kinds: tuple[str, ...] = (MODULE_LEVEL,)) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), over edges of `kinds`."""
    succ: dict[str, list[str]] = {}
    for (a, b), edge in sorted(edges.items()):
        if any(edge.sites[kind] for kind in kinds):
            succ.setdefault(a, []).append(b)
            succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            strongconnect(v)
    return sorted(found)


def cycle_edges(edges: dict[tuple[str, str], Edge], component: list[str]) -> list[Edge]:
    members = set(component)
    return [e for (a, b), e in sorted(edges.items()) if a in members and b in members and e.sites[MODULE_LEVEL]]


def as_json(edges: dict[tuple[str, str], Edge]) -> dict:
    return {
        "root": f"toolkit/{PACKAGE}",
        "edges": [{"importer": e.importer, "imported": e.imported,
                   "module_level": len(e.sites[MODULE_LEVEL]), "lazy": len(e.sites[LAZY]), "sites": e.sites}
                  for _, e in sorted(edges.items())],
        "cycles": cycles(edges),
        "cycles_with_lazy": cycles(edges, (MODULE_LEVEL, LAZY)),
    }


def as_text(edges: dict[tuple[str, str], Edge]) -> str:
    lines = ["# importer -> imported: module-level imports (+ lazy, function-level ones)"]
    by_importer: dict[str, list[Edge]] = {}
    for (a, _), e in sorted(edges.items()):
        by_importer.setdefault(a, []).append(e)
    for importer, out in by_importer.items():
        parts = []
        for e in out:
            n, lazy = len(e.sites[MODULE_LEVEL]), len(e.sites[LAZY])
            parts.append(f"{e.imported} {n}" + (f"+{lazy}" if lazy else "") if n else f"({e.imported} +{lazy})")
        lines.append(f"{importer} -> " + ", ".join(parts))
    found = cycles(edges)
    lines.append("")
    lines.append(f"# module-level cycles: {len(found)}")
    for component in found:
        lines.append("cycle: " + " <-> ".join(component))
        for e in cycle_edges(edges, component):
            lines.append(f"  {e.importer} -> {e.imported}: " + ", ".join(e.sites[MODULE_LEVEL]))
    # for information: where function-level imports close a loop (no import-time cycle)
    lines.append("# counting lazy imports too: " + ("; ".join(" <-> ".join(c) for c in cycles(edges, (MODULE_LEVEL, LAZY)))
                                                   or "no cycle"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the package folder to read")
    parser.add_argument("--json", metavar="PATH", help="also write the graph as JSON")
    args = parser.parse_args(argv)
    edges = import_graph(args.root)
    print(as_text(edges))
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(edges), indent=1) + "\n")
    return 1 if cycles(edges) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The import graph of raymoe's packages, read from the source with `ast` (every import, at any
depth: inside functions too), and the rules it must keep.

    python tests/import_graph.py            # each package's imports, then any violation
    python tests/import_graph.py --modules  # every module's imports of other raymoe modules

Rules: packages import only those to their left in `ORDER` (kernels <- moe <- archs <- parallel
<- cluster <- jobs); no cycle between modules. tests/ may import anything and is not part of it.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ORDER = ("kernels", "moe", "archs", "parallel", "cluster", "jobs")
ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the raymoe packages: dotted name -> file."""
    return {module_name(p, root): p for pkg in ORDER for p in sorted((root / pkg).rglob("*.py"))}


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may load (`from a import b` may load module `a.b`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{a.name}" for a in node.names] + [prefix]


def edges(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the raymoe modules it imports (the deepest existing module of each import)."""
    mods = modules(root)
    out: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            found = set()
            for target in _targets(node, name, path.name == "__init__.py"):
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target:
                    found.add(target)
            # `from a import b` where `a.b` is a module: the edge is to `a.b` (and `a`'s __init__ runs too)
            out[name] |= {t for t in found if t != name}
        out.setdefault(name, set())
    return dict(out)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    pk: dict[str, set[str]] = {p: set() for p in ORDER}
    for a, targets in graph.items():
        for b in targets:
            pa, pb = a.split(".")[0], b.split(".")[0]
            if pa != pb:
                pk[pa].add(pb)
    return pk


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports against ORDER: (importer, imported)."""
    rank = {p: i for i, p in enumerate(ORDER)}
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if rank[b.split(".")[0]] > rank[a.split(".")[0]])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    graph = edges()
    if "--modules" in argv:
        for name in sorted(graph):
            print(f"{name} -> {', '.join(sorted(graph[name])) or '-'}")
        print()
    for pkg, targets in package_graph(graph).items():
        print(f"{pkg:9s} -> {', '.join(p for p in ORDER if p in targets) or '(nothing)'}")
    bad = [f"upward import: {a} -> {b}" for a, b in upward(graph)]
    bad += [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    for line in bad:
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

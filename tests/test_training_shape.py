"""The training package stays readable (issue 25): no function over 80 lines, and no import cycle between
its modules, function-local imports included. Read from the source (AST): nothing is imported or run."""

import ast
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[1] / "sdatc" / "training"
MAX_FUNCTION_LINES = 80


def _trees():
    trees = {f"sdatc.training.{f.stem}": ast.parse(f.read_text(), str(f)) for f in sorted(TRAINING.glob("*.py"))}
    assert "sdatc.training.trainer" in trees, TRAINING
    return trees


def test_no_training_function_is_over_80_lines():
    long = [f"{mod}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for mod, tree in _trees().items()
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_no_import_cycle_inside_training():
    trees = _trees()
    edges = {mod: set() for mod in trees}
    for mod, tree in trees.items():
        for node in ast.walk(tree):  # every import statement, at the top or inside a function
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            edges[mod] |= {n for n in names if n in trees and n != mod}
    done, path = set(), []

    def visit(mod):  # depth-first; a module met again on the current path closes a cycle
        if mod in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(mod):] + [mod]))
        if mod in done:
            return
        path.append(mod)
        for dep in sorted(edges[mod]):
            visit(dep)
        path.pop()
        done.add(mod)

    for mod in sorted(trees):
        visit(mod)

"""The package's shape: no import cycle between sdatc modules, counting imports inside functions.

Every ``sdatc/**/*.py`` is parsed with ``ast`` (nothing is imported), every ``import`` / ``from ... import``
anywhere in it (module level, functions, methods, ``if TYPE_CHECKING``) becomes an edge to the sdatc module it
names (``from sdatc.metrics import builtin`` names ``sdatc.metrics.builtin`` when that is a module, else the
package ``sdatc.metrics``; a module's own ancestor packages, which Python imports before it anyway, are not
edges), and the graph must have no cycle. A function-local import hides a cycle from
Python, not from a reader: the two modules still need each other.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sdatc"

# Edges known to close a cycle, each with the issue that removes it. The test fails on any cycle not broken
# by removing these edges, and on an entry that no longer exists (delete it from here when it goes).
KNOWN_CYCLES: dict[tuple[str, str], str] = {}  # none left (the last, pipelines -> inference, went with issue 25 item 3)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: sdatc modules it imports anywhere in its file}."""
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . / .. import
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:  # import sdatc.a.b.c (a name inside b) -> sdatc.a.b
                    t = t.rpartition(".")[0]
                if t and t != mod and t.split(".")[0] == "sdatc" and not mod.startswith(t + "."):
                    graph[mod].add(t)  # (an ancestor package is always imported before its modules: no edge)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of ``graph``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_sees_function_local_imports():
    graph = import_graph()
    assert "sdatc.models.dcm" in graph["sdatc.models.sdatc"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_sdatc_modules():
    graph = import_graph()
    stale = [edge for edge in KNOWN_CYCLES if edge[1] not in graph.get(edge[0], set())]
    assert not stale, f"known-cycle edges that no longer exist (delete them from KNOWN_CYCLES): {stale}"
    for a, b in KNOWN_CYCLES:
        graph[a].discard(b)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_sit_below_metrics_and_pipelines():
    """RAFT, warping and the quality networks live in sdatc.models: metrics and pipelines both use them, neither
    imports the other, and models import neither (nor training, nor the CLI modules)."""
    graph = import_graph()
    up = ("sdatc.pipelines", "sdatc.metrics", "sdatc.training", "sdatc.inference", "sdatc.evaluation")
    rules = {"sdatc.models": up, "sdatc.metrics": ("sdatc.pipelines",), "sdatc.pipelines": ("sdatc.metrics",)}
    bad = [(a, b) for a, targets in graph.items() for low, banned in rules.items() if a.startswith(low + ".")
           for b in targets if b.startswith(banned)]
    assert not bad, f"imports against the layering: {bad}"


def test_the_dcm_only_paths_start_without_diffusers():
    """infer.py's default (the preview DCM) and bicubic modes build their model and pipeline without importing
    diffusers, transformers or peft (about 3 s of every start); the diffusion systems import them where they
    build a model. In a fresh process: this one has imported them already."""
    code = """
import sys
import torch
from sdatc.config import load_config
from sdatc.inference import InferConfig, build_model, make_pipeline
for config in ("configs/infer/preview.yaml", "configs/infer/bicubic.yaml"):
    cfg = load_config(InferConfig, config)
    make_pipeline(build_model(cfg), cfg, torch.device("cpu"), torch.float32, progress=False)
print(sorted(m for m in ("diffusers", "transformers", "peft") if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout

"""docs/architecture.md's map of the package matches the tree and the imports.

The "Package layout" block names every module of ``sdatc/`` in its layer (``training/`` and ``tables/`` stand
for their packages; words in parentheses are descriptions), and no module imports one of a higher layer,
counting imports inside functions. The training section's table names every file of ``sdatc/training/``.
"""

from __future__ import annotations

import re

from test_code_shape import PACKAGE, ROOT, import_graph, module_name

DOC = ROOT / "docs" / "architecture.md"
SUBPACKAGE_LAYERS = ("data", "models", "metrics", "pipelines")  # their names are modules of sdatc.<layer>


def _strip_parentheses(text: str) -> str:
    while True:
        text, n = re.subn(r"\([^()]*\)", "", text)
        if not n:
            return text


def layout_layers() -> list[tuple[str, list[str]]]:
    """[(label, names)] from the layout block, lowest layer first; the first line's label is ``base``."""
    doc = DOC.read_text()
    block = doc[doc.index("## 9. Package layout"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    layers: list[tuple[str, str]] = []
    for line in block.splitlines():
        if line.startswith("  <- "):
            label, _, rest = line[5:].strip().partition(" ")
            layers.append((label, rest))
        elif not layers:
            layers.append(("base", line))
        else:
            layers[-1] = (layers[-1][0], layers[-1][1] + " " + line)
    return [(label, re.findall(r"[a-z_]+/?", _strip_parentheses(text))) for label, text in layers]


def named_modules() -> dict[str, int]:
    """{module or package name: its layer's index} for every name in the block (scripts/ left out)."""
    out: dict[str, int] = {}
    for i, (label, names) in enumerate(layout_layers()):
        if label == "scripts/":
            continue
        for name in names:
            full = f"sdatc.{label}.{name}" if label in SUBPACKAGE_LAYERS else f"sdatc.{name.rstrip('/')}"
            assert full not in out, f"{full} is named twice in the layout block"
            out[full] = i
    return out


def layer_of(module: str, named: dict[str, int]) -> int:
    """A module's layer: its own entry, else its package's (``training/``), else its subpackage layer's."""
    labels = [label for label, _ in layout_layers()]
    parts = module.split(".")
    for k in range(len(parts), 1, -1):
        if ".".join(parts[:k]) in named:
            return named[".".join(parts[:k])]
    if len(parts) > 1 and parts[1] in labels:  # a subpackage's __init__: sdatc.models
        return labels.index(parts[1])
    return len(labels) - 2  # the package's own __init__ (the public API): with the jobs


def test_the_layout_block_names_every_module_once():
    named = named_modules()
    modules = {module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    missing = sorted(m for m in modules if not any(m == n or m.startswith(n + ".") for n in named))
    unknown = sorted(n for n in named if n not in modules and n not in packages)
    assert not missing, f"modules the layout block in {DOC.name} does not name: {missing}"
    assert not unknown, f"names in the layout block that are not modules: {unknown}"


def test_no_module_imports_a_higher_layer():
    named = named_modules()
    labels = [label for label, _ in layout_layers()]
    bad = [f"{a} ({labels[layer_of(a, named)]}) -> {b} ({labels[layer_of(b, named)]})"
           for a, targets in import_graph().items() for b in targets if layer_of(b, named) > layer_of(a, named)]
    assert not bad, "imports against the layout block's layers: " + "; ".join(sorted(bad))


def test_the_check_sees_an_upward_import():
    named = named_modules()
    assert layer_of("sdatc.models.capm", named) < layer_of("sdatc.pipelines.sampler", named)
    assert layer_of("sdatc.data.video", named) < layer_of("sdatc.training.trainer", named)
    assert layer_of("sdatc.utils", named) == 0


def test_the_training_table_names_every_training_file():
    doc = DOC.read_text()
    section = doc[doc.index("## 5. Training"):]
    section = section[:section.index("\n## ", 4)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    listed = set(re.findall(r"`([a-z_]+\.py)`", "\n".join(row.split(" | ")[0] for row in rows)))
    files = {p.name for p in (PACKAGE / "training").glob("*.py") if p.name != "__init__.py"}
    assert listed == files, f"training table vs sdatc/training/: missing {sorted(files - listed)}, " \
                            f"stale {sorted(listed - files)}"

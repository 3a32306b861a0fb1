"""Every script's ``--help`` reads as written and says what each option is; benchmarks print one line.
In-process (each script's ``main(argv)``), no subprocess."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def help_text(path: Path, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        load(path).main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def options_without_help(text: str) -> list[str]:
    """Option entries of argparse's "options:" section that carry no help text."""
    lines = text.split("\noptions:\n", 1)[1].splitlines()
    bare = []
    for i, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        same_line = re.search(r"\S {2,}\S", line.strip())
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not same_line and not (nxt.startswith(" " * 6) and not nxt.strip().startswith("-")):
            bare.append(line.strip())
    return bare


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_help_is_readable(path, capsys):
    text = help_text(path, capsys)
    source = path.read_text()
    doc = source[source.index('"""') + 3:source.index('"""', source.index('"""') + 3)]
    for line in doc.splitlines():  # a shell line continuation shows as written, not joined into one line
        if line.endswith(" \\"):
            assert line.strip() in text, f"{path.name}: {line.strip()!r} not in --help as written"
    assert "(default: None)" not in text
    assert not options_without_help(text), f"{path.name}: options without help: {options_without_help(text)}"
    long = [ln for ln in text.splitlines() if len(ln) > 120]
    assert not long, f"{path.name}: --help lines over 120 characters: {long}"


def test_bench_infer_prints_one_line_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    load(ROOT / "scripts" / "bench_infer.py").main(["--config", "configs/infer/preview.yaml", "--frames", "2",
                                                     "--no-memory-ratio", "--warmup-steps", "0", "--json", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and re.fullmatch(
        r"configs/infer/preview\.yaml: [\d.]+ s per output frame \(.+\), peak \d+ MB \(every field: .+\)", printed[0])
    result = json.loads(out.read_text())
    assert result["frames"] == 2 and result["seconds_per_frame"] > 0

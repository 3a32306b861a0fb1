"""ruff, with the project's own settings (pyproject.toml), finds nothing in the code a reader sees.

The settings enforce lines of at most 120 characters (E501 on); a check here fails if that is switched off.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["sdatc", "scripts", "tests", "comfyui"]


def test_settings_enforce_120_character_lines():
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["line-length"] == 120
    assert "E" in ruff["lint"]["select"] and "E501" not in ruff["lint"].get("ignore", [])


def test_ruff_check_is_clean():
    if importlib.util.find_spec("ruff") is None:  # a dev extra (pyproject.toml); not needed to run sdatc
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *PATHS],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr

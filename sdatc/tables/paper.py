"""The paper's published numbers, shipped with the package as sdatc/reference/paper_tables.csv.

The file holds three CSV blocks, each with its own header line: Tables I/II (per set, CRF, method),
Table III (parameters and runtime per method) and Table VII (VMAF etc. on REDS4 at CRF 25).

    paper = load_paper()
    paper.quality[("REDS4", 25, "SDATC")]["lpips"]   # 0.3488
    paper.vmaf["SDATC"]["vmaf"]                      # 67.22
"""

from __future__ import annotations

import csv
import dataclasses
import io
from functools import lru_cache
from importlib import resources

PAPER_FILE = "reference/paper_tables.csv"


@dataclasses.dataclass
class PaperTables:
    quality: dict[tuple[str, int, str], dict]  # (dataset, crf, method) -> {metric: float}
    runtime: dict[str, dict]  # method -> {kind, trainable_params, total_params, runtime_s}
    vmaf: dict[str, dict]  # method -> {vmaf, niqe, maniqa, clipiqa} (REDS4, CRF 25)

    def methods(self, dataset: str) -> list[str]:
        """Methods of the paper's table for ``dataset``, in the paper's order (SDATC last)."""
        return list(dict.fromkeys(m for (d, _, m) in self.quality if d == dataset))


def _num(v: str):
    try:
        return float(v)
    except ValueError:
        return v


@lru_cache(maxsize=1)
def load_paper() -> PaperTables:
    text = resources.files("sdatc").joinpath(PAPER_FILE).read_text()
    blocks, cur = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith(("table,", "method,")) and cur:
            blocks.append(cur)
            cur = []
        cur.append(line)
    blocks.append(cur)
    quality, runtime, vmaf = {}, {}, {}
    for block in blocks:
        rows = list(csv.DictReader(io.StringIO("\n".join(block))))
        header = block[0].split(",")
        if header[0] == "table":
            for r in rows:
                quality[(r["dataset"], int(r["crf"]), r["method"])] = {
                    k: _num(v) for k, v in r.items() if k not in ("table", "dataset", "crf", "method")}
        elif "runtime_s" in header:
            runtime = {r["method"]: {k: _num(v) for k, v in r.items() if k != "method"} for r in rows}
        elif "vmaf" in header:
            vmaf = {r["method"]: {k: _num(v) for k, v in r.items() if k != "method"} for r in rows}
    return PaperTables(quality, runtime, vmaf)

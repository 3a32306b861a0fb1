"""Score restored clips against GT: pair clips by name and frames by sorted order, per-clip rows + mean.

    cfg = EvalConfig(sr="results/x/crf25", gt="testsets/GT", metrics=["psnr_y", "ssim_y"], out="r.csv")
    rows = evaluate(cfg)          # [{"clip": ..., "frames": ..., "psnr_y": ...}, ..., {"clip": "mean", ...}]

SR and GT roots may each be a folder of clip folders, a folder of videos, or a single clip.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sdatc.data.video import VideoReader, list_clips
from sdatc.errors import SdatcError
from sdatc.metrics import get_metric
from sdatc.utils import atomic_write_text, natural_key


@dataclasses.dataclass
class EvalConfig:
    """Settings of ``scripts/evaluate.py``."""

    sr: str | None = None
    gt: str | None = None
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["psnr_y", "ssim_y"])
    out: str | None = None  # CSV path; None prints only
    clips: list[str] | None = None  # evaluate only these clips (default: every clip, SR and GT must match)
    crop_border: int = 0  # pixels cut from each border before scoring (the protocol uses 0)
    device: str = "cpu"


def pair_clips(sr_root: str | Path, gt_root: str | Path, only: list[str] | None = None) -> dict[str, tuple[Path, Path]]:
    """{clip: (sr_path, gt_path)}; every selected clip must exist on both sides."""
    sr, gt = list_clips(sr_root), list_clips(gt_root)
    if len(sr) == 1 and len(gt) == 1 and not only:  # two single clips: pair them whatever their names
        return {next(iter(gt)): (next(iter(sr.values())), next(iter(gt.values())))}
    names = only or sorted(set(sr) | set(gt), key=natural_key)
    missing_sr = [n for n in names if n not in sr]
    missing_gt = [n for n in names if n not in gt]
    if missing_sr or missing_gt:
        parts = []
        if missing_sr:
            parts.append(f"no SR for {', '.join(missing_sr)} in {sr_root}")
        if missing_gt:
            parts.append(f"no GT for {', '.join(missing_gt)} in {gt_root}")
        raise SdatcError("clips do not match: " + "; ".join(parts) + " (select a subset with clips=[...])")
    return {n: (sr[n], gt[n]) for n in names}


def _crop(img: np.ndarray, b: int) -> np.ndarray:
    return img[b:-b, b:-b] if b else img


def score_clip(name: str, sr_path: Path, gt_path: Path, metrics: dict, crop_border: int = 0) -> dict:
    """Mean of each frame metric over the clip's frames."""
    sr, gt = VideoReader(sr_path), VideoReader(gt_path)
    if len(sr) != len(gt):
        raise SdatcError(f"clip {name!r}: {len(sr)} SR frames ({sr_path}) vs {len(gt)} GT frames ({gt_path})")
    if (sr.meta.height, sr.meta.width) != (gt.meta.height, gt.meta.width):
        raise SdatcError(
            f"clip {name!r}: SR frames are {sr.meta.width}x{sr.meta.height}, GT frames {gt.meta.width}x{gt.meta.height}"
        )
    scores: dict[str, list[float]] = {m: [] for m in metrics}
    for a, b in tqdm(zip(sr, gt, strict=True), total=len(gt), desc=name, leave=False, unit="fr"):
        a, b = _crop(a, crop_border), _crop(b, crop_border)
        for m, fn in metrics.items():
            scores[m].append(float(fn(a, b)))
    return {"clip": name, "frames": len(gt), **{m: float(np.mean(v)) for m, v in scores.items()}}


def evaluate(cfg: EvalConfig) -> list[dict]:
    """Per-clip rows and a final ``mean`` row (mean over clips); writes ``cfg.out`` as CSV if set."""
    if not cfg.sr or not cfg.gt:
        raise SdatcError("both sr (--sr) and gt (--gt) are required")
    specs = [get_metric(m) for m in cfg.metrics]
    for s in specs:
        if s.kind != "frame":
            raise SdatcError(f"metric {s.name!r} ({s.kind}) is not supported by evaluate yet")
    metrics = {s.name: s.factory(device=cfg.device) for s in specs}
    pairs = pair_clips(cfg.sr, cfg.gt, cfg.clips)
    rows = [score_clip(n, s, g, metrics, cfg.crop_border) for n, (s, g) in tqdm(pairs.items(), desc="clips", unit="clip")]
    mean = {"clip": "mean", "frames": sum(r["frames"] for r in rows)}
    mean.update({m: float(np.mean([r[m] for r in rows])) for m in metrics})
    rows.append(mean)
    if cfg.out:
        atomic_write_text(cfg.out, rows_to_csv(rows))
    return rows


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()})
    return buf.getvalue()


def format_table(rows: list[dict]) -> str:
    """A plain aligned text table of the rows."""
    cols = list(rows[0])

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "-" * len(line)]
    for i, row in enumerate(cells):
        if i == len(cells) - 1 and row[0] == "mean":
            out.append("-" * len(line))
        out.append("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    return "\n".join(out)

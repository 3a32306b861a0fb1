"""Score restored clips against GT: pair clips by name and frames by sorted order, per-clip rows + mean.

    cfg = EvalConfig(sr="results/x/crf25", gt="testsets/GT", metrics=["psnr_y", "ssim_y", "vmaf"], out="r.csv")
    rows = evaluate(cfg)          # [{"clip": ..., "frames": ..., "psnr_y": ...}, ..., {"clip": "mean", ...}]

Every metric reads the clip in one decoding pass (frame metrics batched on the GPU when there is
one). A metric whose weights are missing is reported once and marked ``missing``, never a number.

SR and GT roots may each be a folder of clip folders, a folder of videos, or a single clip.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
from pathlib import Path

import numpy as np

from sdatc.config import check_device
from sdatc.data.video import VideoReader, list_clips
from sdatc.errors import SdatcError
from sdatc.metrics import MetricContext, MetricUnavailable, build_metric, get_metric
from sdatc.metrics.base import Metric
from sdatc.utils import atomic_write_text, natural_key, tqdm
from sdatc.weights import resolve_root


@dataclasses.dataclass
class EvalConfig:
    """Settings of ``scripts/evaluate.py``."""

    sr: str | None = None
    gt: str | None = None
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["psnr_y", "ssim_y"])
    out: str | None = None  # CSV path; None prints only
    clips: list[str] | None = None  # evaluate only these clips (default: every clip, SR and GT must match)
    crop_border: int = 0  # pixels cut from each border before scoring (the protocol uses 0)
    device: str = "auto"  # auto: the GPU when there is one
    weights: str | None = None  # offline weights folder (else $SDATC_WEIGHTS, else $TORCH_HOME)
    batch_size: int = 4  # frames per call of a learned metric

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_device(self.device)


MISSING = "missing"


def build_metrics(names: list[str], ctx: MetricContext, log=print) -> tuple[dict[str, Metric], dict[str, str]]:
    """Build each metric once: ({name: Metric}, {name: why it is missing}). Unknown names are errors."""
    specs = [get_metric(n) for n in names]  # all names checked before any network is loaded
    ready, missing = {}, {}
    for spec in specs:
        try:
            ready[spec.name] = build_metric(spec.name, ctx)
        except MetricUnavailable as e:
            missing[spec.name] = str(e)
            log(f"skipping {spec.name}: {e}")
    return ready, missing


def pair_clips(sr_root: str | Path, gt_root: str | Path, only: list[str] | None = None) -> dict[str, tuple[Path, Path]]:
    """{clip: (sr_path, gt_path)}; every selected clip must exist on both sides."""
    sr, gt = list_clips(sr_root, prefer_frames=True), list_clips(gt_root, prefer_frames=True)
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


def score_clip(name: str, sr_path: Path, gt_path: Path, metrics: dict[str, Metric], crop_border: int = 0,
               num_frames: int | None = None) -> dict:
    """One decoding pass over a clip feeding every metric's scorer.

    ``num_frames``: score the first N GT frames (the test set's count); SR must have exactly that many.
    Returns {"clip", "frames", metric: value}; a set metric's value is its per-clip data (FID features).
    """
    sr, gt = VideoReader(sr_path), VideoReader(gt_path)
    n = len(gt) if num_frames is None else min(num_frames, len(gt))
    if len(sr) != n:
        raise SdatcError(f"clip {name!r}: {len(sr)} SR frames ({sr_path}) vs {n} GT frames ({gt_path})")
    if (sr.meta.height, sr.meta.width) != (gt.meta.height, gt.meta.width):
        raise SdatcError(
            f"clip {name!r}: SR frames are {sr.meta.width}x{sr.meta.height}, GT frames {gt.meta.width}x{gt.meta.height}"
        )
    scorers = {m: metric.scorer() for m, metric in metrics.items()}
    pairs = zip(sr, itertools.islice(gt, n))
    for a, b in tqdm(pairs, total=n, desc=name, leave=False, unit="fr"):
        a, b = _crop(a, crop_border), _crop(b, crop_border)
        for s in scorers.values():
            s.update(a, b)
    return {"clip": name, "frames": n, **{m: s.result() for m, s in scorers.items()}}


def evaluate(cfg: EvalConfig, log=print) -> list[dict]:
    """Per-clip rows and a final ``mean`` row (mean over clips; set metrics such as FID over all
    frames); a metric that cannot run here is ``missing`` in every row. Writes ``cfg.out`` if set."""
    if not cfg.sr or not cfg.gt:
        raise SdatcError("both sr (--sr) and gt (--gt) are required")
    for n in cfg.metrics:
        get_metric(n)  # unknown names fail before anything is loaded
    pairs = pair_clips(cfg.sr, cfg.gt, cfg.clips)
    ctx = MetricContext(device=cfg.device, weights=resolve_root(cfg.weights), batch_size=cfg.batch_size)
    metrics, missing = build_metrics(cfg.metrics, ctx, log)
    names = [get_metric(n).name for n in cfg.metrics]
    results = [score_clip(n, s, g, metrics, cfg.crop_border)
               for n, (s, g) in tqdm(pairs.items(), desc="clips", unit="clip")]
    rows, mean = [], {"clip": "mean", "frames": sum(r["frames"] for r in results)}
    for r in results:
        rows.append({"clip": r["clip"], "frames": r["frames"],
                     **{m: (MISSING if m in missing else "" if metrics[m].kind == "set" else r[m]) for m in names}})
    for m in names:
        if m in missing:
            mean[m] = MISSING
        elif metrics[m].kind == "set":
            mean[m] = metrics[m].combine([r[m] for r in results])
        else:
            mean[m] = float(np.mean([r[m] for r in results]))
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

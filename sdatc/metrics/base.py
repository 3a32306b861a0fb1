"""Metric and per-clip Scorer: every metric sees a clip as a stream of (SR, GT) frame pairs.

    metric = build_metric("psnr_y")
    s = metric.scorer()
    for sr, gt in pairs:            # (H, W, 3) uint8 RGB each, in frame order
        s.update(sr, gt)
    value = s.result()              # frame / clip kind: a float; set kind: per-clip data for combine()

Frame metrics with a ``batch_fn`` score ``batch_size`` frames at once (on the GPU when there is one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class MetricContext:
    """What a metric factory may use: the device, the offline weights folder, the batch size."""

    device: str = "cpu"
    weights: Path | None = None  # resolved weights root (sdatc.weights.resolve_root)
    batch_size: int = 4


class Scorer:
    """Accumulates one clip."""

    def update(self, sr: np.ndarray, gt: np.ndarray) -> None:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


class Metric:
    """A ready metric: ``scorer()`` per clip; set-kind metrics also ``combine(per_clip_results)``."""

    name: str = ""
    kind: str = "frame"

    def scorer(self) -> Scorer:
        raise NotImplementedError

    def combine(self, results: Sequence) -> float:
        raise NotImplementedError(f"{self.name} is not a set metric")


class FrameMetric(Metric):
    """Mean over frames of a per-frame score.

    Args:
        name: metric name.
        fn: ``fn(sr, gt) -> float`` for one (H, W, 3) uint8 pair (used when ``batch_fn`` is None).
        batch_fn: ``batch_fn(sr, gt) -> sequence of floats`` for (N, H, W, 3) uint8 stacks.
        batch_size: frames per ``batch_fn`` call.
    """

    kind = "frame"

    def __init__(self, name: str, fn: Callable | None = None, batch_fn: Callable | None = None, batch_size: int = 1):
        if fn is None and batch_fn is None:
            raise ValueError("FrameMetric needs fn or batch_fn")
        self.name, self.fn, self.batch_fn, self.batch_size = name, fn, batch_fn, max(1, batch_size)

    def scorer(self) -> Scorer:
        return _FrameScorer(self)


class _FrameScorer(Scorer):
    def __init__(self, metric: FrameMetric):
        self.m, self.values, self.sr, self.gt = metric, [], [], []

    def update(self, sr, gt) -> None:
        if self.m.batch_fn is None:
            self.values.append(float(self.m.fn(sr, gt)))
            return
        self.sr.append(sr)
        self.gt.append(gt)
        if len(self.sr) >= self.m.batch_size:
            self._flush()

    def _flush(self) -> None:
        if self.sr:
            self.values.extend(float(v) for v in self.m.batch_fn(np.stack(self.sr), np.stack(self.gt)))
            self.sr, self.gt = [], []

    def result(self) -> float:
        self._flush()
        return float(np.mean(self.values)) if self.values else float("nan")


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_tensor(frames: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 RGB -> (N, 3, H, W) float32 in [0, 1] on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    if x.ndim == 3:
        x = x[None]
    return x.to(device).permute(0, 3, 1, 2).float().div_(255.0)

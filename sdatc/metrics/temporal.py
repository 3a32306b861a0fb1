"""Temporal consistency (not in the paper's tables): warping error, tLP, tOF. One value per clip.

* ``warping_error`` (x1e3, lower is better): RAFT-large flow between consecutive *output* frames;
  frame t-1 backward-warped to frame t, mean squared RGB difference ([0, 1]) over the pixels that
  are not occluded (forward-backward check in the squared form of Lai et al.'s code, alpha 0.01, beta
  0.5 px^2; flow guidance defaults to the linear form) and the 3 channels; mean over the T-1 pairs,
  times 1000 (Lai et al. 2018).
* ``tlp`` (x100, lower is better): |LPIPS(GT_{t-1}, GT_t) - LPIPS(SR_{t-1}, SR_t)|, mean over pairs,
  times 100 (TecoGAN); LPIPS is pyiqa's AlexNet v0.1.
* ``tof`` (pixels, lower is better): mean over pairs and pixels of the L2 norm of the difference
  between the Farneback flows (OpenCV, TecoGAN's settings 0.5, 3, 15, 3, 5, 1.2) of GT and SR,
  on the frames' grey levels; full frame (TecoGAN crops borders and skips 2 frames; we do not).

A clip of one frame has no pairs: NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch

from sdatc.errors import MetricUnavailable
from sdatc.metrics.base import Metric, MetricContext, Scorer, pick_device, to_tensor
from sdatc.models.flow import FlowConfig, backward_warp, compute_flows, load_raft, occlusion_mask
from sdatc.weights import WeightsMissing, require, resolve_root

OCC_ALPHA, OCC_BETA = 0.01, 0.5
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)  # pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags


class _PairScorer(Scorer):
    """Calls ``fn(prev_sr, sr, prev_gt, gt) -> float`` for each consecutive pair; mean of the values."""

    def __init__(self, fn: Callable):
        self.fn, self.prev, self.values = fn, None, []

    def update(self, sr, gt) -> None:
        if self.prev is not None:
            self.values.append(float(self.fn(self.prev[0], sr, self.prev[1], gt)))
        self.prev = (sr, gt)

    def result(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")


# --------------------------------------------------------------------------- tOF


def farneback(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Farneback flow between two (H, W, 3) uint8 RGB frames on grey: (H, W, 2) float32 pixels."""
    a, b = (cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY) for x in (prev, cur))
    return cv2.calcOpticalFlowFarneback(a, b, None, *FARNEBACK)


def tof_pair(prev_sr, sr, prev_gt, gt) -> float:
    diff = farneback(prev_gt, gt) - farneback(prev_sr, sr)  # (H, W, 2)
    return float(np.sqrt((diff.astype(np.float64) ** 2).sum(-1)).mean())


class TOF(Metric):
    kind, name = "clip", "tof"

    def scorer(self) -> Scorer:
        return _PairScorer(tof_pair)


# --------------------------------------------------------------------------- tLP


class TLP(Metric):
    """|LPIPS(GT_{t-1}, GT_t) - LPIPS(SR_{t-1}, SR_t)| x 100, with pyiqa's LPIPS (built offline)."""

    kind, name = "clip", "tlp"

    def __init__(self, ctx: MetricContext):
        from sdatc.models.iqa import create_pyiqa

        self.net = create_pyiqa("lpips", pick_device(ctx.device), ctx.weights, user="tlp")
        self.device = next(self.net.parameters()).device

    @torch.no_grad()
    def pair(self, prev_sr, sr, prev_gt, gt) -> float:
        prev = to_tensor(np.stack([prev_sr, prev_gt]), self.device)  # (2, 3, H, W)
        cur = to_tensor(np.stack([sr, gt]), self.device)
        d_sr, d_gt = self.net(cur, prev).reshape(2, -1).mean(1).double().cpu().tolist()
        return abs(d_gt - d_sr) * 100.0

    def scorer(self) -> Scorer:
        return _PairScorer(self.pair)


# --------------------------------------------------------------------------- warping error


def warping_errors(frames: torch.Tensor, fwd: torch.Tensor, bwd: torch.Tensor) -> torch.Tensor:
    """Occlusion-masked warping error of each consecutive pair (not scaled).

    Args:
        frames: (T, 3, H, W) frames in [0, 1].
        fwd: (T-1, 2, H, W) flows from frame i to i+1 (pixels); bwd: from frame i+1 to i.

    Returns:
        (T-1,) mean over non-occluded pixels and channels of (x_{i+1} - W(x_i, bwd_i))^2; 0 where
        every pixel is occluded.
    """
    prev, cur = frames[:-1], frames[1:]  # (T-1, 3, H, W)
    warped = backward_warp(prev, bwd.to(frames.dtype))  # frame i aligned to frame i+1
    valid = 1 - occlusion_mask(bwd.float(), fwd.float(), OCC_ALPHA, OCC_BETA, "squared")  # (T-1, 1, H, W)
    sq = ((cur - warped) ** 2).float() * valid  # (T-1, 3, H, W)
    n = valid.sum(dim=(1, 2, 3)) * frames.shape[1]
    return torch.where(n > 0, sq.sum(dim=(1, 2, 3)) / n.clamp(min=1), torch.zeros_like(n))


class WarpingError(Metric):
    """Warping error x1e3 with flows from ``flow_fn(frames) -> (fwd, bwd)`` (RAFT-large by default).

    Frames are processed in chunks of ``chunk`` pairs (consecutive chunks share one frame).
    """

    kind, name = "clip", "warping_error"

    def __init__(self, flow_fn: Callable, device: torch.device | str = "cpu", chunk: int = 4):
        self.flow_fn, self.device, self.chunk = flow_fn, torch.device(device), max(1, chunk)

    @classmethod
    def with_raft(cls, ctx: MetricContext, iters: int = 12) -> WarpingError:
        root = ctx.weights or resolve_root(None)
        try:
            (path,) = require("warping_error", root)
        except WeightsMissing as e:
            raise MetricUnavailable(str(e)) from None
        device = pick_device(ctx.device)
        raft = load_raft(FlowConfig(raft_weights=str(path), required=True, raft_iters=iters), device)
        return cls(lambda frames: compute_flows(raft, frames, iters), device, ctx.batch_size)

    def scorer(self) -> Scorer:
        return _WarpScorer(self)


class _WarpScorer(Scorer):
    def __init__(self, m: WarpingError):
        self.m, self.buf, self.sum, self.pairs = m, [], 0.0, 0

    def update(self, sr, gt) -> None:
        self.buf.append(sr)
        if len(self.buf) > self.m.chunk:
            self._flush()

    @torch.no_grad()
    def _flush(self) -> None:
        if len(self.buf) >= 2:
            frames = to_tensor(np.stack(self.buf), self.m.device)  # (T, 3, H, W)
            fwd, bwd = self.m.flow_fn(frames)
            errs = warping_errors(frames, fwd.to(frames.device), bwd.to(frames.device))
            self.sum += float(errs.double().sum())
            self.pairs += len(errs)
        self.buf = self.buf[-1:]

    def result(self) -> float:
        self._flush()
        return self.sum / self.pairs * 1e3 if self.pairs else float("nan")


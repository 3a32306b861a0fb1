"""Learned metrics through pyiqa (a dependency, research-only licence: used, never copied).

LPIPS (AlexNet, v0.1), DISTS, NIQE, MANIQA (KonIQ weights), CLIP-IQA (RN50, pyiqa's prompt
ensemble): RGB in [0, 1], full frame, ``batch_size`` frames per call. FID: Inception-V3 pool3
features (pyiqa's FID network) of every frame after the clean-fid resize (PIL bicubic per channel in
float to 299x299), then one Frechet distance per set between all SR and all GT features.

Every network is built with :func:`sdatc.models.iqa.create_pyiqa` after checking that its
files are in the weights folder (sdatc.weights); a missing file makes the metric unavailable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdatc.metrics.base import FrameMetric, Metric, MetricContext, Scorer, pick_device, to_tensor
from sdatc.models.iqa import create_pyiqa

FULL_REFERENCE = {"lpips", "dists"}


def pyiqa_frame_metric(name: str, ctx: MetricContext) -> FrameMetric:
    """A batched frame metric around a pyiqa network (full-reference ones get the GT frame too)."""
    net = create_pyiqa(name, pick_device(ctx.device), ctx.weights)
    device = next((p.device for p in net.parameters()), pick_device(ctx.device))

    @torch.no_grad()
    def batch_fn(sr: np.ndarray, gt: np.ndarray) -> list[float]:
        x = to_tensor(sr, device)  # (N, 3, H, W) in [0, 1]
        out = net(x, to_tensor(gt, device)) if name in FULL_REFERENCE else net(x)
        return out.reshape(len(sr), -1).mean(dim=1).double().cpu().tolist()

    return FrameMetric(name, batch_fn=batch_fn, batch_size=ctx.batch_size)


# --------------------------------------------------------------------------- FID


def clean_resize(frame: np.ndarray, size: int = 299) -> np.ndarray:
    """clean-fid's resize: each channel as a float32 PIL image, bicubic to (size, size), clipped.

    (H, W, 3) uint8 -> (size, size, 3) float32 in [0, 255].
    """
    chans = [np.asarray(Image.fromarray(frame[..., c].astype(np.float32)).resize((size, size), Image.BICUBIC))
             for c in range(3)]
    return np.clip(np.stack(chans, axis=-1), 0, 255)


class FID(Metric):
    """Set metric: ``scorer().result()`` gives {"sr": (N, 2048), "gt": (N, 2048)} features of a clip."""

    kind = "set"
    name = "fid"

    def __init__(self, ctx: MetricContext):
        fid = create_pyiqa("fid", pick_device(ctx.device), ctx.weights)
        self.net = fid.net.model  # pyiqa's FID Inception-V3 (pool3 output)
        self.device = next(self.net.parameters()).device
        self.batch_size = ctx.batch_size

    @torch.no_grad()
    def features(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, 2048) float32 Inception pool3 features."""
        x = np.stack([clean_resize(f) for f in frames])  # (N, 299, 299, 3) in [0, 255]
        x = torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device)
        x = (x - 128) / 128  # clean-fid's input scaling
        feat = self.net(x, False, False)[0]  # (N, 2048, 1, 1)
        return feat.reshape(len(frames), -1).float().cpu().numpy()

    def scorer(self) -> Scorer:
        return _FeatureScorer(self)

    def combine(self, results: Sequence[dict]) -> float:
        """Frechet distance between the SR and GT features of all clips of a set."""
        from pyiqa.archs.fid_arch import frechet_distance

        sr = np.concatenate([r["sr"] for r in results]).astype(np.float64)
        gt = np.concatenate([r["gt"] for r in results]).astype(np.float64)
        if len(sr) < 2:
            return float("nan")
        return float(frechet_distance(sr.mean(0), np.cov(sr, rowvar=False), gt.mean(0), np.cov(gt, rowvar=False)))


class _FeatureScorer(Scorer):
    def __init__(self, fid: FID):
        self.fid, self.sr, self.gt, self.buf = fid, [], [], ([], [])

    def update(self, sr, gt) -> None:
        self.buf[0].append(sr)
        self.buf[1].append(gt)
        if len(self.buf[0]) >= self.fid.batch_size:
            self._flush()

    def _flush(self) -> None:
        if self.buf[0]:
            self.sr.append(self.fid.features(np.stack(self.buf[0])))
            self.gt.append(self.fid.features(np.stack(self.buf[1])))
            self.buf = ([], [])

    def result(self) -> dict:
        self._flush()
        return {"sr": np.concatenate(self.sr), "gt": np.concatenate(self.gt)}


def save_features(path: Path, result: dict) -> None:
    from sdatc.utils import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, sr=result["sr"], gt=result["gt"])


def load_features(path: Path) -> dict:
    with np.load(path) as d:
        return {"sr": d["sr"], "gt": d["gt"]}

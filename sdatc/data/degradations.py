"""On-the-fly training degradations: HR frames (T, H, W, 3) -> compressed LR frames (T, H/4, W/4, 3).

    deg = Degradation(DegradationConfig())                 # the paper's: bicubic x1/4, then x264
    lq, info = deg(gt_frames, np.random.default_rng(0))     # info: {"bitrate": ..., ...}

``x264`` (default, the paper / MGLD-VSR): MATLAB bicubic x1/4, then x264 at a random bitrate in
[1e4, 1e5] bit/s with the stream declared at 1 fps (yuv420p), one bitrate per clip.

``crf`` (an option): a share of clips is encoded at a random CRF instead (the test-set recipe, 10 fps
stream), for models meant to serve the CRF 15..35 test conditions.

``second_order`` (RealBasicVSR-style, an option): two rounds of [Gaussian blur -> random resize ->
Gaussian noise], a final bicubic resize to exactly H/4 x W/4, then the same x264 step. Each random
parameter is drawn once per clip, so every frame of a clip gets the same degradation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import cv2
import numpy as np

from sdatc.config import check_fps
from sdatc.data.compress import x264_compress
from sdatc.data.imresize import imresize
from sdatc.data.video import X264_PRESETS


@dataclasses.dataclass
class DegradationConfig:
    kind: Literal["x264", "second_order"] = "x264"
    scale: int = 4
    bitrate: tuple[float, float] = (1e4, 1e5)  # bit/s, uniform per clip
    fps: float = 1.0  # declared frame rate of the training stream (MGLD-VSR: 1)
    pix_fmt: Literal["yuv420p", "yuv444p"] = "yuv420p"
    preset: str = "medium"
    # optional spread of CRFs (the test-set recipe): with probability crf_prob a clip is encoded at a
    # random integer CRF in [crf[0], crf[1]] on a crf_fps stream instead of at a random bitrate
    crf: tuple[int, int] | None = None
    crf_prob: float = 0.5
    crf_fps: float = 10.0
    # second_order only: per round, blur sigma, resize factor, noise std (in 0..255)
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    resize: tuple[float, float] = (0.5, 1.5)
    noise_std: tuple[float, float] = (1.0, 15.0)

    def __post_init__(self):
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        check_fps(self.fps)
        check_fps(self.crf_fps, "crf_fps")
        for name in ("bitrate", "blur_sigma", "resize", "noise_std"):
            lo, hi = getattr(self, name)
            if lo > hi or lo < 0:
                raise ValueError(f"{name} must be a range [low, high] with 0 <= low <= high, got {[lo, hi]}")
        if self.bitrate[0] <= 0:
            raise ValueError(f"bitrate must be > 0, got {list(self.bitrate)}")
        if self.crf is not None and not 0 <= self.crf[0] <= self.crf[1] <= 51:
            raise ValueError(f"crf must be a range within [0, 51], got {list(self.crf)}")
        if not 0 <= self.crf_prob <= 1:
            raise ValueError(f"crf_prob must be in [0, 1], got {self.crf_prob}")
        if self.preset not in X264_PRESETS:  # else the first data loader worker fails, after the model loaded
            raise ValueError(f"preset {self.preset!r} is not an x264 preset ({', '.join(X264_PRESETS)})")
        for name in ("fps", "crf_fps"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number of frames per second, got {getattr(self, name)}")


class Degradation:
    """Callable degradation chain; see the module docstring."""

    def __init__(self, cfg: DegradationConfig):
        self.cfg = cfg

    def __call__(self, gt: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """gt: (T, H, W, 3) uint8 with H, W divisible by the scale -> (T, H/s, W/s, 3) uint8, info."""
        cfg = self.cfg
        t, h, w, _ = gt.shape
        if h % cfg.scale or w % cfg.scale:
            raise ValueError(f"GT size {w}x{h} is not divisible by the scale {cfg.scale}")
        lh, lw = h // cfg.scale, w // cfg.scale
        info: dict = {}
        if cfg.kind == "second_order":
            lr = self._second_order(gt, (lh, lw), rng, info)
        else:
            lr = np.stack([imresize(f, size=(lh, lw)) for f in gt])  # (T, h, w, 3) uint8, MATLAB bicubic
        if cfg.crf is not None and rng.random() < cfg.crf_prob:
            crf = int(rng.integers(cfg.crf[0], cfg.crf[1] + 1))
            lq = x264_compress(lr, crf=crf, fps=cfg.crf_fps, pix_fmt=cfg.pix_fmt, preset=cfg.preset).frames
            info.update(crf=crf, bitrate=0.0)
            return lq, info
        bitrate = float(rng.uniform(*cfg.bitrate))
        lq = x264_compress(lr, bitrate=bitrate, fps=cfg.fps, pix_fmt=cfg.pix_fmt, preset=cfg.preset).frames
        info["bitrate"] = bitrate
        return lq, info

    def _second_order(self, gt: np.ndarray, size: tuple[int, int], rng: np.random.Generator, info: dict) -> np.ndarray:
        cfg = self.cfg
        x = gt.astype(np.float32)  # (T, H, W, 3) in 0..255
        for r in range(2):
            sigma = float(rng.uniform(*cfg.blur_sigma))
            factor = float(rng.uniform(*cfg.resize))
            std = float(rng.uniform(*cfg.noise_std))
            x = np.stack([cv2.GaussianBlur(f, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for f in x])
            nh, nw = max(int(round(x.shape[1] * factor)), size[0]), max(int(round(x.shape[2] * factor)), size[1])
            x = np.stack([cv2.resize(f, (nw, nh), interpolation=cv2.INTER_CUBIC) for f in x])
            x = x + rng.normal(0.0, std, size=x.shape[1:]).astype(np.float32)  # the same noise on every frame
            info[f"round{r}"] = {"blur_sigma": sigma, "resize": factor, "noise_std": std}
        x = np.clip(x, 0, 255)
        return np.stack([np.clip(np.round(imresize(f, size=size)), 0, 255).astype(np.uint8) for f in x])

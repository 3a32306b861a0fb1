"""DRS estimators: one degradation score d in (0, 1] per clip (1: clean), which sets UltraVSR's timestep.

* ``fixed``: ``drs.d`` from the config (tests, ablations).
* ``clipiqa``: the mean CLIP-IQA score (pyiqa, offline weights folder) of ``min(5, T)`` frames sampled
  evenly from the bicubic x4 LR frames (the reference samples ``T // 10`` frames, none below 10: a bug).
  Without the CLIP weights it falls back to ``bitstream`` with one warning.
* ``bitstream`` (ours): the stream's own compression level: x264's SEI options string (``crf=`` when
  the encoder ran in CRF mode, else ``qp=``) when present, else bits per pixel, mapped to d by
  piecewise-linear, monotone tables in the config. The tables are a hand-set prior, not calibrated
  (docs/usage.md, "UltraVSR").

d is clipped to ``[d_min, d_max]``: by default [0.01, 1], where the release has no clip (D = d^2 straight into
``argmin |abar_t - D|``; 0.01 only keeps ``z / sqrt(D)`` finite). [0.2, 0.95] was ours before issue 24.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from sdatc.errors import MetricUnavailable, SdatcError
from sdatc.pipelines.config import DRSConfig

X264_OPTION = re.compile(rb"x264 - core \d+.*?options: ([^\x00]*)", re.S)


def x264_options(path: str | Path, max_packets: int = 8) -> dict[str, str]:
    """The x264 SEI options of the first video packets (``{"crf": "25.0", "qp": ...}``), or {}."""
    import av

    try:
        with av.open(str(path), metadata_errors="replace") as box:
            stream = box.streams.video[0]
            head = bytes(stream.codec_context.extradata or b"")
            for i, packet in enumerate(box.demux(stream)):
                head += bytes(packet)
                if i + 1 >= max_packets:
                    break
    except (av.error.FFmpegError, IndexError, OSError):
        return {}
    m = X264_OPTION.search(head)
    if not m:
        return {}
    opts = {}
    for token in m.group(1).decode("latin-1").split():
        key, _, value = token.partition("=")
        opts[key] = value
    return opts


def bits_per_pixel(path: str | Path) -> float | None:
    """Video bits per pixel per frame: stream bit rate (or file size / duration) / (width x height x fps)."""
    import av

    try:
        with av.open(str(path), metadata_errors="replace") as box:
            s = box.streams.video[0]
            rate = float(s.average_rate or 0) or None
            bits = s.bit_rate or (Path(path).stat().st_size * 8 / (float(box.duration) / 1e6) if box.duration else None)
            if not (rate and bits and s.width and s.height):
                return None
            return bits / (s.width * s.height * rate)
    except (av.error.FFmpegError, IndexError, OSError, ZeroDivisionError):
        return None


def _interp(x: float, table: list[list[float]]) -> float:
    xs, ys = zip(*table, strict=True)
    return float(np.interp(x, xs, ys))


def bitstream_d(path: str | Path | None, cfg: DRSConfig) -> tuple[float, str]:
    """d from the stream's compression level; returns (d, how it was found)."""
    if path is not None and Path(path).is_file():
        opts = x264_options(path)
        for key in ("crf", "qp"):
            if opts.get(key) not in (None, "", "0"):
                try:
                    level = float(opts[key])
                except ValueError:
                    continue
                return _clip(_interp(level, cfg.crf_table), cfg), f"x264 {key}={level:g}"
        bpp = bits_per_pixel(path)
        if bpp is not None:
            return _clip(_interp(bpp, cfg.bpp_table), cfg), f"{bpp:.3f} bits per pixel"
    return _clip(cfg.d, cfg), f"no stream information (frames or an unreadable file): drs.d={cfg.d:g}"


def _clip(d: float, cfg: DRSConfig) -> float:
    return min(max(d, cfg.d_min), cfg.d_max)


def sample_indices(num_frames: int, k: int) -> list[int]:
    """``min(k, T)`` frame indices spread evenly over the clip."""
    k = min(k, num_frames)
    return sorted({int(round(i)) for i in np.linspace(0, num_frames - 1, k)})


class DRSEstimator:
    """Gives each clip its d. ``clipiqa`` loads CLIP-IQA once (or falls back to ``bitstream``, one warning)."""

    def __init__(self, cfg: DRSConfig, device: str = "cpu", weights: str | Path | None = None):
        self.cfg, self.kind, self.net = cfg, cfg.estimator, None
        if cfg.estimator not in ("clipiqa", "bitstream", "fixed"):
            raise SdatcError(f"drs.estimator must be clipiqa, bitstream or fixed, got {cfg.estimator!r}")
        if cfg.estimator == "clipiqa":
            from sdatc.models.iqa import create_pyiqa

            try:
                self.net = create_pyiqa("clipiqa", device, Path(weights) if weights else None)
            except MetricUnavailable as e:
                warnings.warn(f"DRS: CLIP-IQA unavailable ({e}); d comes from the bitstream instead", stacklevel=2)
                self.kind = "bitstream"

    def __call__(self, path: str | Path | None = None, frames: np.ndarray | None = None) -> tuple[float, str]:
        """d for the clip at ``path`` (bitstream) or its upscaled frames ``frames`` (T, H, W, 3) uint8 (clipiqa)."""
        if self.kind == "fixed":
            return _clip(self.cfg.d, self.cfg), f"fixed d={self.cfg.d:g}"
        if self.kind == "clipiqa" and frames is not None:
            import torch

            sel = frames[sample_indices(len(frames), self.cfg.frames)]
            x = torch.from_numpy(np.ascontiguousarray(sel)).permute(0, 3, 1, 2).float().div(255)
            dev = next((p.device for p in self.net.parameters()), torch.device("cpu"))
            with torch.no_grad():
                score = float(self.net(x.to(dev)).mean())
            return _clip(score, self.cfg), f"CLIP-IQA {score:.3f} over {len(sel)} frames"
        return bitstream_d(path, self.cfg)

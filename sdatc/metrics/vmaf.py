"""VMAF (model vmaf_v0.6.1) through the ``libvmaf`` filter of the ffmpeg binary shipped by imageio-ffmpeg.

Both clips are reduced to the protocol's Y (BT.601 limited range, ``16 + 65.481 R + 128.553 G +
24.966 B``, rounded to 8 bit) with neutral chroma, written as raw YUV to a temporary folder, and
scored with SR as the distorted ("main") input and GT as the reference. One value per clip: libvmaf's
mean over frames. (VMAF's features read luma only, so the neutral chroma changes nothing.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from sdatc.errors import MetricUnavailable
from sdatc.metrics.base import Metric, Scorer
from sdatc.metrics.psnr_ssim import rgb_to_y

VMAF_MODEL = "vmaf_v0.6.1"


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of imageio-ffmpeg's ffmpeg binary (it has libvmaf; Debian's ffmpeg does not)."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # not installed, or no binary for this platform
        raise MetricUnavailable(f"vmaf: no ffmpeg binary from imageio-ffmpeg ({e}); "
                                "pip install imageio-ffmpeg") from None


@lru_cache(maxsize=1)
def ffmpeg_version() -> str:
    """First line of ``ffmpeg -version`` without the copyright, e.g. ``ffmpeg version n7.1``."""
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].split(" Copyright")[0] if out else "unknown"


@lru_cache(maxsize=1)
def _has_libvmaf() -> bool:
    p = subprocess.run([ffmpeg_exe(), "-hide_banner", "-filters"], capture_output=True, text=True)
    return any(line.split()[1:2] == ["libvmaf"] for line in p.stdout.splitlines() if line.strip())


class VMAF(Metric):
    """Clip metric; ``libvmaf_version`` is set after the first clip is scored."""

    kind = "clip"
    name = "vmaf"

    def __init__(self, threads: int | None = None):
        if not _has_libvmaf():
            raise MetricUnavailable(f"vmaf: {ffmpeg_exe()} has no libvmaf filter "
                                    "(use the ffmpeg shipped by imageio-ffmpeg)")
        self.threads = threads or min(os.cpu_count() or 1, 16)
        self.libvmaf_version: str | None = None

    def scorer(self) -> Scorer:
        return _VMAFScorer(self)


def _yuv_bytes(frame: np.ndarray) -> tuple[bytes, str]:
    """(H, W, 3) uint8 RGB -> raw 8-bit Y plane + neutral chroma, and the pixel format used."""
    y = np.clip(np.round(rgb_to_y(frame)), 0, 255).astype(np.uint8)  # (H, W)
    h, w = y.shape
    if h % 2 == 0 and w % 2 == 0:
        return y.tobytes() + bytes([128]) * (h * w // 2), "yuv420p"
    return y.tobytes() + bytes([128]) * (2 * h * w), "yuv444p"


class _VMAFScorer(Scorer):
    def __init__(self, metric: VMAF):
        self.m = metric
        self.dir = Path(tempfile.mkdtemp(prefix="sdatc_vmaf_"))
        self.files = {k: open(self.dir / f"{k}.yuv", "wb") for k in ("sr", "gt")}
        self.size, self.pix_fmt, self.count = None, None, 0

    def update(self, sr, gt) -> None:
        if sr.shape != gt.shape:
            raise ValueError(f"vmaf: frame shapes differ: sr {sr.shape} vs gt {gt.shape}")
        for key, frame in (("sr", sr), ("gt", gt)):
            data, self.pix_fmt = _yuv_bytes(frame)
            self.files[key].write(data)
        self.size = (sr.shape[1], sr.shape[0])
        self.count += 1

    def result(self) -> float:
        try:
            for f in self.files.values():
                f.close()
            if not self.count:
                return float("nan")
            log = self.dir / "vmaf.json"
            raw = ["-f", "rawvideo", "-pix_fmt", self.pix_fmt, "-s", f"{self.size[0]}x{self.size[1]}",
                   "-framerate", "25"]
            graph = (f"[0:v][1:v]libvmaf=model=version={VMAF_MODEL}:log_fmt=json:"
                     f"log_path={log}:n_threads={self.m.threads}")
            cmd = [ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error", *raw, "-i", str(self.dir / "sr.yuv"),
                   *raw, "-i", str(self.dir / "gt.yuv"), "-lavfi", graph, "-f", "null", "-"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0 or not log.is_file():
                raise RuntimeError(f"vmaf: ffmpeg failed: {p.stderr.strip()[-300:]}")
            data = json.loads(log.read_text())
            self.m.libvmaf_version = data.get("version")
            if len(data["frames"]) != self.count:
                raise RuntimeError(f"vmaf: libvmaf scored {len(data['frames'])} of {self.count} frames")
            return float(np.mean([f["metrics"]["vmaf"] for f in data["frames"]]))
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __del__(self):  # a clip abandoned half-way: close and remove the temporary files
        for f in getattr(self, "files", {}).values():
            f.close()
        if getattr(self, "dir", None) is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

"""Restoration baselines that need no weights: bicubic x4 (MATLAB imresize)."""

from __future__ import annotations

from pathlib import Path

from sdatc.data.imresize import bicubic_up
from sdatc.data.video import FrameWriter, VideoReader
from sdatc.utils import tqdm


def bicubic_upscale_clip(src: str | Path, out_dir: str | Path, scale: int = 4, overwrite: bool = True) -> Path:
    """Upscale every frame of a clip by ``scale`` with MATLAB bicubic; writes ``out_dir/%08d.png``."""
    reader = VideoReader(src)
    with FrameWriter(out_dir, overwrite=overwrite) as w:
        for frame in tqdm(reader, total=len(reader), desc=f"bicubic x{scale}", leave=False, unit="fr"):
            w.write(bicubic_up(frame, scale))
    return Path(out_dir)

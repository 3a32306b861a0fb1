"""Periodic validation on one held-out clip: PSNR-Y of the output and a side-by-side picture.

The clip's first ``val.num_frames`` GT frames (centre-cropped to ``val.gt_size`` when set, a multiple
of 4) are degraded once like the training data (bicubic x1/4, x264 at ``val.bitrate`` on a 1 fps
stream). Stage 0 scores the DCM output; stages 1 and 2 run the restoration pipeline with
``val.steps`` sampling steps (no flow guidance). The picture is the middle frame:
``LR (bicubic x4) | output | GT``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdatc.data.compress import x264_compress
from sdatc.data.imresize import bicubic_down, bicubic_up
from sdatc.data.video import VideoReader
from sdatc.errors import SdatcError
from sdatc.metrics.psnr_ssim import psnr_y
from sdatc.training.config import ValConfig
from sdatc.utils import atomic_path


class Validator:
    """Holds the degraded validation frames; ``__call__`` scores a model and writes the picture."""

    def __init__(self, cfg: ValConfig, root: str | Path, out_dir: str | Path):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        path = Path(root) / cfg.clip
        candidates = [path] if path.exists() else sorted(Path(root).glob(f"{cfg.clip}.*"))
        if not candidates:
            raise SdatcError(f"validation clip {cfg.clip!r} not found in {root} (val.clip / val.root)")
        reader = VideoReader(candidates[0])
        if len(reader) < cfg.num_frames:
            raise SdatcError(f"validation clip {candidates[0]} has {len(reader)} frames, "
                             f"val.num_frames={cfg.num_frames}")
        gt = reader.read_all(cfg.num_frames)  # (T, H, W, 3)
        if cfg.gt_size is not None:
            s = min(cfg.gt_size, gt.shape[1], gt.shape[2]) // 4 * 4
            top, left = (gt.shape[1] - s) // 2 // 4 * 4, (gt.shape[2] - s) // 2 // 4 * 4
            gt = gt[:, top:top + s, left:left + s]
        h, w = gt.shape[1] // 4 * 4, gt.shape[2] // 4 * 4
        self.gt = np.ascontiguousarray(gt[:, :h, :w])
        lr = np.stack([bicubic_down(f, 4) for f in self.gt])
        self.lq = x264_compress(lr, bitrate=cfg.bitrate, fps=1).frames  # (T, h/4, w/4, 3)
        self.bicubic = np.stack([bicubic_up(f, 4) for f in self.lq])
        self.bicubic_psnr = float(np.mean([psnr_y(b, g) for b, g in zip(self.bicubic, self.gt)]))

    @torch.no_grad()
    def __call__(self, restore, step: int) -> dict:
        """``restore(lq)``: (T, h, w, 3) uint8 -> (T, 4h, 4w, 3) uint8. Returns the logged numbers."""
        out = restore(self.lq)
        psnr = float(np.mean([psnr_y(o, g) for o, g in zip(out, self.gt)]))
        k = len(out) // 2
        picture = np.concatenate([self.bicubic[k], out[k], self.gt[k]], axis=1)  # (H, 3W, 3)
        path = self.out_dir / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        with atomic_path(path) as tmp:
            Image.fromarray(picture).save(tmp, format="PNG")
        return {"val_psnr_y": psnr, "val_bicubic_psnr_y": self.bicubic_psnr, "val_picture": str(path)}


def dcm_restorer(dcm, device, dtype: torch.dtype = torch.float32):
    """``restore`` for stage 0: the DCM alone, as ``infer.py mode=dcm`` runs it (the run's dtype)."""
    from sdatc.pipelines.config import PipelineConfig, TilingConfig
    from sdatc.pipelines.dcm_pipeline import DCMPipeline

    pipe = DCMPipeline(dcm, PipelineConfig(tiling=TilingConfig(mode="off")), device=device, dtype=dtype, progress=False)

    def restore(lq: np.ndarray) -> np.ndarray:
        return np.stack(list(pipe.stream(list(lq), len(lq))))

    return restore


def pipeline_restorer(model, steps: int, num_frames: int, device, dtype: torch.dtype = torch.float32):
    """``restore`` for stages 1 and 2: the inference pipeline with ``steps`` steps, one window, in the
    run's dtype (the frozen SD weights were cast to it by the trainer)."""
    from sdatc.models.flow import FlowConfig
    from sdatc.pipelines.config import PipelineConfig, WindowConfig
    from sdatc.pipelines.sampler import SamplerConfig
    from sdatc.pipelines.sdatc_pipeline import SDATCPipeline

    cfg = PipelineConfig(sampler=SamplerConfig(steps=steps), flow=FlowConfig(enabled=False),
                         window=WindowConfig(length=num_frames, stride=num_frames))
    pipe = SDATCPipeline(model, cfg, device=device, torch_dtype=dtype, progress=False, cast=False)

    def restore(lq: np.ndarray) -> np.ndarray:
        return np.stack(list(pipe.stream(list(lq), len(lq))))

    return restore


def ultravsr_restorer(model, d: float, num_frames: int, device, dtype: torch.dtype = torch.float32):
    """``restore`` for UltraVSR: the one-step pipeline at degradation score ``d``, one window, whole frames."""
    from sdatc.pipelines.config import DRSConfig, TilingConfig, UltraVSRPipelineConfig, WindowConfig
    from sdatc.pipelines.ultravsr import UltraVSRPipeline

    cfg = UltraVSRPipelineConfig(drs=DRSConfig(estimator="fixed", d=d),
                                 window=WindowConfig(length=num_frames, stride=num_frames),
                                 chunk_frames=0, tiling=TilingConfig(mode="off"))
    pipe = UltraVSRPipeline(model, cfg, device=device, torch_dtype=dtype, progress=False, cast=False)

    def restore(lq: np.ndarray) -> np.ndarray:
        return np.stack(list(pipe.stream(list(lq), len(lq))))

    return restore

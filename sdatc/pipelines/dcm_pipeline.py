"""The pipelines without diffusion: the DCM alone (the built-in preview model, the DCM-only baseline) and
MATLAB bicubic x4, with the same ``restore(frames, num_frames)`` interface as :class:`RestorePipeline`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from sdatc.errors import SdatcError
from sdatc.pipelines.restore import PipelineConfig, autocast
from sdatc.pipelines.tiling import tiled_apply


class Bicubic(torch.nn.Module):
    """MATLAB bicubic x``scale`` (``imresize``, float64) as a module: the baseline through infer.py's I/O."""

    def __init__(self, scale: int = 4):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sdatc.data.imresize import imresize

        return imresize(x.double(), scale=self.scale).to(x.dtype)  # (B, 3, h, w) -> (B, 3, sh, sw)


class DCMPipeline:
    """DCM-only restoration (the built-in preview model, and the DCM-only baseline): frame by frame,
    pixel-tiled above ``tiling.dcm_tile``; no diffusion, no colour correction (the DCM is trained
    with L1 to GT). Same interface as :class:`RestorePipeline`."""

    unet_calls = 0

    def __init__(self, dcm, cfg: PipelineConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, progress: bool = True, batch: int = 4):
        self.dcm, self.cfg, self.device, self.dtype, self.progress = dcm, cfg, torch.device(device), dtype, progress
        self.batch = batch
        autocast(self.device, dtype)  # fp16 on the CPU: an error now, not at the first frame

    @torch.no_grad()
    def restore(self, frames: Iterable[np.ndarray], num_frames: int) -> Iterator[np.ndarray]:
        """Stream restored frames (4h, 4w, 3) uint8, in order, for ``num_frames`` input frames."""
        if num_frames < 1:
            raise SdatcError("the clip has no frames")
        t, size, buf = self.cfg.tiling, None, []
        count = 0
        for frame in frames:
            if size is None:
                size = frame.shape[:2]
                if min(size) < 8:
                    raise SdatcError(f"frames of {size[1]}x{size[0]} are too small (at least 8x8 LR pixels)")
            elif frame.shape[:2] != size:
                raise SdatcError(f"frame {count} is {frame.shape[1]}x{frame.shape[0]}, earlier frames {size[1]}x{size[0]}")
            buf.append(torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1))
            count += 1
            if len(buf) == self.batch or count == num_frames:
                lq = torch.stack(buf).to(self.device).float().div(255)  # (B, 3, h, w)
                buf = []
                with autocast(self.device, self.dtype):
                    if t.mode == "on" or (t.mode == "auto" and max(lq.shape[-2:]) > t.dcm_tile):
                        out = tiled_apply(lambda x, box: self.dcm(x), lq, t.dcm_tile, t.dcm_overlap)
                    else:
                        out = self.dcm(lq)  # (B, 3, 4h, 4w)
                for y in out.float().clamp(0, 1):
                    yield (y * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            if count == num_frames:
                break
        if count < num_frames:
            raise SdatcError(f"the clip ended after {count} frames, {num_frames} expected")

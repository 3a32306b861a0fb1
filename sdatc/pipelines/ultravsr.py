"""UltraVSR's one-step pipeline over a clip: windows streamed and blended, DRS, TAI chunks, tiles.

    pipe = UltraVSRRunner(model, UltraVSRPipelineConfig())
    for frame in pipe.restore(reader, num_frames=len(reader), source="clip.mp4"):  # (h, w, 3) uint8 in
        writer.write(frame)                                                         # (4h, 4w, 3) uint8 out

Per window of ``window.length`` frames (overlaps blended as SDATC's): bicubic x4 -> VAE encoder (+LoRA)
-> one UNet call at DRS's t_rec (RTS over the whole window; spatial blocks on chunks of
``chunk_frames`` frames) -> z_HR = (z - sqrt(1 - D) eps) / sqrt(D) -> VAE decoder (+RTS) -> colour fix.
d is estimated once per clip (``drs``). Stages are tiled when memory asks (``memory.py``); the VAE runs
fewer frames per call of its frozen blocks first.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sdatc.errors import SdatcError
from sdatc.models.ultravsr import UltraVSR, bicubic_x4, drs_step, one_step_x0
from sdatc.pipelines.colour import colour_correct
from sdatc.pipelines.drs import DRSConfig, DRSEstimator
from sdatc.pipelines.memory import StagePlan, StagePlanner
from sdatc.pipelines.prompt import clip_context
from sdatc.pipelines.restore import TilingConfig, WindowConfig, autocast, pad_to_multiple
from sdatc.pipelines.speed import speed_up
from sdatc.pipelines.tiled_vae import tiled_shared
from sdatc.pipelines.tiling import tiled_batched
from sdatc.pipelines.windows import FrameFeed, WindowBlender, plan_windows
from sdatc.utils import tqdm


@dataclasses.dataclass
class UltraVSRPipelineConfig:
    drs: DRSConfig = dataclasses.field(default_factory=DRSConfig)
    window: WindowConfig = dataclasses.field(default_factory=lambda: WindowConfig(length=16, stride=12))
    chunk_frames: int = 1  # TAI: frames per chunk through the spatial blocks (0: the whole window at once)
    tiling: TilingConfig = dataclasses.field(default_factory=TilingConfig)
    colour: Literal["wavelet", "adain", "none"] = "wavelet"

    def __post_init__(self):
        if not isinstance(self.chunk_frames, int) or self.chunk_frames < 0:
            raise ValueError(f"chunk_frames must be an int >= 0, got {self.chunk_frames!r}")


class UltraVSRRunner:
    """Runs an UltraVSR model over clips. ``unet_calls`` counts UNet calls (batches), ``unet_evals`` frame-tile
    evaluations by latent shape; ``plans`` holds each stage's last memory plan."""

    def __init__(self, model: UltraVSR, cfg: UltraVSRPipelineConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, progress: bool = True, weights: str | Path | None = None,
                 compile: bool = False):
        self.model, self.cfg, self.device, self.dtype, self.progress = model, cfg, torch.device(device), dtype, progress
        autocast(self.device, dtype)  # fp16 on the CPU: an error now, not at the first frame
        self.drs = DRSEstimator(cfg.drs, device=str(self.device), weights=weights)
        self.unet_calls = 0  # denoiser invocations (each a batch of frames x tiles)
        self.unet_evals: Counter[tuple[int, int]] = Counter()  # latent (h, w) of each frame-tile evaluation -> count
        self._plan = StagePlanner(model, self.device, cfg.tiling)  # budget read at the first window
        self.plans: dict[str, StagePlan] = self._plan.plans
        self.denoiser = speed_up(model, self.device, compile=compile)  # model.predict, or compiled
        self.last_drs: tuple[float, int, str] | None = None  # (d, t_rec, how d was found) of the last clip
        self.vae_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        self.unet_factor = 2 ** (len(model.unet.config.block_out_channels) - 1)

    def _pad(self, lq: torch.Tensor) -> torch.Tensor:
        return pad_to_multiple(lq, self.model.pad_multiple)

    def window_x0(self, lq: torch.Tensor, t: int, big_d: float, context: torch.Tensor | None = None) -> torch.Tensor:
        """One window, (T, 3, h, w) LR in [0, 1] (padded) -> z_HR (T, 4, 4h/8, 4w/8). Whole frames, or tiles
        (x the window's frames: RTS mixes them) as memory allows. ``context``: the frames' text states
        (T, 77, D); None: the empty prompt."""
        cfg, tc, n = self.cfg, self.cfg.tiling, lq.shape[0]
        chunk = cfg.chunk_frames or None
        up = bicubic_x4(lq, self.model.cfg.input_resize)  # (T, 3, 4h, 4w), the release's PIL bicubic by default
        with autocast(self.device, self.dtype):
            p = self._plan("encode", up, tc.encoder_tile, chunk=chunk)  # fewer frames per call first, then tiles
            enc_chunk = p.batch if p.batch < n else None
            if p.tiled:  # computed by tiles, whole-frame statistics (tiled_vae.py)
                z = tiled_shared(self.model.vae.encoder, lambda x: self.model.encode(x, enc_chunk), up, p.tile)
            else:
                z = self.model.encode(up, enc_chunk)

            def unet(zt, *text):
                self.unet_calls += 1
                self.unet_evals[tuple(zt.shape[-2:])] += zt.shape[0]
                if text:  # the frames' text states, cut with them (tiled_batched's per_frame)
                    return self.denoiser(zt, t, n, chunk, context=text[0])
                return self.denoiser(zt, t, n, chunk)

            p = self._plan("predict", z, tc.latent_tile, group=n)
            out = tiled_batched(unet, (z,), tc.latent_tile if p.tiled else None, tc.latent_overlap, p.batch,
                                align=self.unet_factor, group=n, per_frame=() if context is None else (context,))
        return one_step_x0(out.float(), z.float(), big_d, self.model.prediction_type)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(T, 4, h, w) -> (T, 3, 8h, 8w) in [0, 1], clamped: UltraVSR's release colour-fixes the 8-bit output
        image (``ToPILImage`` first), unlike StableSR (fp32 decode when running fp16)."""
        tc, n = self.cfg.tiling, z.shape[0]
        # the frozen blocks on chunks of frames (TAI: fewer if memory asks), RTS on the whole window; then tiles
        p = self._plan("decode", z, tc.decoder_tile, chunk=self.cfg.chunk_frames or None)
        chunk = p.batch if p.batch < n else None
        with autocast(self.device, self.dtype, enabled=self.dtype != torch.float16):
            if p.tiled:  # computed by tiles holding all frames, whole-frame statistics (tiled_vae.py)
                out = tiled_shared(self.model.vae.decoder, lambda x: self.model.decode(x, n, chunk), z, p.tile)
            else:
                out = self.model.decode(z, n, chunk)
        return ((out.float() + 1) / 2).clamp(0, 1)

    def estimate(self, lq: torch.Tensor, source: str | Path | None) -> tuple[float, int, float]:
        """(d, t_rec, D) for a clip from its source file (bitstream) or its first window's frames (clipiqa)."""
        frames = None
        if self.drs.kind == "clipiqa":
            up = bicubic_x4(lq.float(), self.model.cfg.input_resize)  # what the reference scores
            frames = (up * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        d, how = self.drs(path=source, frames=frames)
        t, big_d = drs_step(self.model.scheduler.alphas_cumprod, d)
        self.last_drs = (d, t, how)
        return d, t, big_d

    @torch.no_grad()
    def restore(self, frames: Iterable[np.ndarray], num_frames: int, source: str | Path | None = None,
                d: float | None = None, prompt: str | list[str] | None = None) -> Iterator[np.ndarray]:
        """Stream restored frames (4h, 4w, 3) uint8, in order. ``source``: the clip's file, for DRS's
        ``bitstream`` estimator; ``d``: skip the estimator; ``prompt``: the UNet's text condition, one for the
        clip or one per frame (the release: RAM tags per frame); None or ``""``: the cached empty prompt."""
        cfg, dev = self.cfg, self.device
        feed = FrameFeed(frames, num_frames)
        text = clip_context(self.model, prompt, num_frames, dev)  # encoded once per clip; None: the empty prompt
        windows = plan_windows(num_frames, cfg.window.length, min(cfg.window.stride, cfg.window.length))
        blender = WindowBlender(num_frames, windows)
        t_rec = big_d = None
        for k, (start, end) in enumerate(tqdm(windows, desc="windows", unit="win", leave=False, disable=not self.progress)):
            lq = feed.window(start, end).to(dev)  # (T, 3, h, w)
            if t_rec is None:
                if d is None:
                    _, t_rec, big_d = self.estimate(lq, source)
                else:
                    t_rec, big_d = drs_step(self.model.scheduler.alphas_cumprod, d)
                    self.last_drs = (d, t_rec, "given")
            h, w = lq.shape[-2:]
            z = self.window_x0(self._pad(lq), t_rec, big_d, None if text is None else text.window(range(start, end)))
            out = self.decode(z)[..., : 4 * h, : 4 * w]  # (T, 3, 4h, 4w)
            out = colour_correct(out, lq, cfg.colour).clamp(0, 1)
            for _, frame in blender.add(k, out.cpu()):
                yield (frame * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            feed.release(windows[k + 1][0] if k + 1 < len(windows) else num_frames)
        if t_rec is None:
            raise SdatcError("the clip has no frames")

"""``UltraVSRPipeline``: UltraVSR's one step over a whole clip: windows streamed and blended, DRS, TAI chunks, tiles.

    pipe = UltraVSRPipeline.from_sd21(None, checkpoint="weights/ultravsr")      # loading, saving: base.py
    out = pipe(frames, d=None)                                                  # (T, h, w, 3) -> (T, 4h, 4w, 3)
    for frame in pipe.stream(reader, num_frames=len(reader), source="clip.mp4"):  # frames streamed in order
        writer.write(frame)

Per window of ``window.length`` frames (overlaps blended as SDATC's): bicubic x4 -> VAE encoder (+LoRA)
-> one UNet call at DRS's t_rec (RTS over the whole window; spatial blocks on chunks of
``chunk_frames`` frames) -> z_HR = (z - sqrt(1 - D) eps) / sqrt(D) -> VAE decoder (+RTS) -> colour fix.
d is estimated once per clip (``drs``). Stages are tiled when memory asks (``hardware.py``); the VAE runs
fewer frames per call of its frozen blocks first.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from sdatc.errors import SdatcError
from sdatc.models.ultravsr import UltraVSR, bicubic_x4, drs_step, one_step_x0
from sdatc.pipelines.base import VSRPipeline
from sdatc.pipelines.colour import colour_correct
from sdatc.pipelines.config import UltraVSRPipelineConfig, pad_to_multiple
from sdatc.pipelines.drs import DRSEstimator
from sdatc.pipelines.hardware import StagePlan, StagePlanner, speed_up
from sdatc.pipelines.prompt import clip_context
from sdatc.pipelines.tiled_vae import tiled_shared
from sdatc.pipelines.tiling import tiled_batched
from sdatc.pipelines.windows import FrameFeed, WindowBlender, plan_windows
from sdatc.utils import tqdm


class UltraVSRPipeline(VSRPipeline):
    """SD 2.1 + trained UltraVSR modules (RTS, LoRA): x4 in one UNet call per frame. ``unet_calls`` counts
    UNet calls (batches), ``unet_evals`` frame-tile evaluations by latent shape; ``plans`` holds each stage's
    last memory plan; ``last_drs`` the last clip's (d, t_rec, how d was found)."""

    mode, model_cls, config_cls, folder = "ultravsr", UltraVSR, UltraVSRPipelineConfig, "ultravsr"

    def __init__(self, model: UltraVSR, config: UltraVSRPipelineConfig | None = None,
                 device: str | torch.device = "cpu", torch_dtype: torch.dtype | str | None = None,
                 progress: bool = True, compile: bool = False, cast: bool = True, weights: str | Path | None = None):
        self._drs_weights = weights  # the CLIP-IQA weights folder of DRS's clipiqa estimator
        super().__init__(model, config, device, torch_dtype, progress, compile, cast)

    def _setup(self) -> None:
        m = self.model
        self.drs = DRSEstimator(self.config.drs, device=str(self.device), weights=self._drs_weights)
        self.unet_calls = 0  # denoiser invocations (each a batch of frames x tiles)
        self.unet_evals: Counter[tuple[int, int]] = Counter()  # latent (h, w) of each frame-tile evaluation -> count
        self._plan = StagePlanner(m, self.device, self.config.tiling)  # budget read at the first window
        self.plans: dict[str, StagePlan] = self._plan.plans
        self.denoiser = speed_up(m, self.device, compile=self.compile)  # model.predict, or compiled
        self.unet_factor = 2 ** (len(m.unet.config.block_out_channels) - 1)

    def __call__(self, frames, d: float | None = None, chunk_frames: int | None = None, colour_fix: str | None = None,
                 output_type: str = "np", prompt: str | list[str] | None = None):
        """Restore a clip in one step: (T, H, W, 3) uint8 or PIL images -> (T, 4H, 4W, 3) uint8 or PIL. ``d``: the
        degradation score in (0, 1] (1: clean; it sets the timestep); None: the configured DRS estimator on the
        frames. ``chunk_frames``: TAI chunk (memory), ``colour_fix``: wavelet | adain | none. ``prompt``: the
        UNet's text condition, one string or one per frame (the release: RAM tags per frame); None or ``""``:
        the cached empty prompt."""
        return self._collect(frames, output_type, **self._settings(d, chunk_frames, colour_fix, prompt))

    def _settings(self, d: float | None = None, chunk_frames: int | None = None, colour_fix: str | None = None,
                  prompt: str | list[str] | None = None) -> dict:
        extra = {k: v for k, v in (("chunk_frames", chunk_frames), ("colour", colour_fix)) if v is not None}
        return {"d": d, "prompt": prompt, "config": dataclasses.replace(self.config, **extra) if extra else None}

    @torch.no_grad()
    def stream(self, frames: Iterable[np.ndarray], num_frames: int, prompt: str | list[str] | None = None,
               source: str | Path | None = None, config: UltraVSRPipelineConfig | None = None,
               d: float | None = None) -> Iterator[np.ndarray]:
        """Stream restored frames (4h, 4w, 3) uint8, in order. ``source``: the clip's file, for DRS's
        ``bitstream`` estimator; ``d``: skip the estimator; ``prompt``: the UNet's text condition, one for the
        clip or one per frame (the release: RAM tags per frame); None or ``""``: the cached empty prompt;
        ``config``: this call's settings instead of the pipeline's."""
        cfg, dev = config or self.config, self.device
        feed = FrameFeed(frames, num_frames)
        text = clip_context(self.model, prompt, num_frames, dev) if prompt not in (None, "") else None  # per clip
        windows = plan_windows(num_frames, cfg.window.length, min(cfg.window.stride, cfg.window.length))
        blender = WindowBlender(num_frames, windows)
        t_rec = big_d = None
        for k, (start, end) in enumerate(tqdm(windows, desc="windows", unit="win", leave=False,
                                              disable=not self.progress)):
            lq = feed.window(start, end).to(dev)  # (T, 3, h, w)
            if t_rec is None:  # the clip's timestep, from d (given, or estimated on the first window)
                if d is None:
                    _, t_rec, big_d = self.estimate(lq, source)
                else:
                    t_rec, big_d = drs_step(self.model.scheduler.alphas_cumprod, d)
                    self.last_drs = (d, t_rec, "given")
            h, w = lq.shape[-2:]
            lq_p = pad_to_multiple(lq, self.model.pad_multiple)
            z = self.window_x0(lq_p, t_rec, big_d, None if text is None else text.window(range(start, end)), cfg)
            out = self.decode(z, cfg)[..., : 4 * h, : 4 * w]  # (T, 3, 4h, 4w)
            out = colour_correct(out, lq, cfg.colour).clamp(0, 1)
            for _, frame in blender.add(k, out.cpu()):
                yield (frame * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            feed.release(windows[k + 1][0] if k + 1 < len(windows) else num_frames)
        if t_rec is None:
            raise SdatcError("the clip has no frames")

    def window_x0(self, lq: torch.Tensor, t: int, big_d: float, context: torch.Tensor | None = None,
                  cfg: UltraVSRPipelineConfig | None = None) -> torch.Tensor:
        """One window, (T, 3, h, w) LR in [0, 1] (padded) -> z_HR (T, 4, 4h/8, 4w/8). Whole frames, or tiles
        (x the window's frames: RTS mixes them) as memory allows. ``context``: the frames' text states
        (T, 77, D); None: the empty prompt."""
        cfg = cfg or self.config
        tc, n = cfg.tiling, lq.shape[0]
        chunk = cfg.chunk_frames or None
        up = bicubic_x4(lq, self.model.cfg.input_resize)  # (T, 3, 4h, 4w), the release's PIL bicubic by default
        with self._autocast():
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

    def decode(self, z: torch.Tensor, cfg: UltraVSRPipelineConfig | None = None) -> torch.Tensor:
        """(T, 4, h, w) -> (T, 3, 8h, 8w) in [0, 1], clamped: UltraVSR's release colour-fixes the 8-bit output
        image (``ToPILImage`` first), unlike StableSR (fp32 decode when running fp16)."""
        cfg = cfg or self.config
        tc, n = cfg.tiling, z.shape[0]
        # the frozen blocks on chunks of frames (TAI: fewer if memory asks), RTS on the whole window; then tiles
        p = self._plan("decode", z, tc.decoder_tile, chunk=cfg.chunk_frames or None)
        chunk = p.batch if p.batch < n else None
        with self._autocast(enabled=self.dtype != torch.float16):
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

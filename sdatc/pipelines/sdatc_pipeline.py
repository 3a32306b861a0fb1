"""``SDATCPipeline``: SD 2.1 + the SDATC modules over a whole clip, the window loop and the denoising loop here.

    pipe = SDATCPipeline.from_sd21(None, checkpoint="weights/sdatc")   # loading, saving: ``base.py``
    out = pipe(frames, num_inference_steps=50)                         # (T, H, W, 3) uint8 -> (T, 4H, 4W, 3)
    pipe.restore_file("clip.mp4", "clip_x4.mp4", num_inference_steps=50)  # a video file, __call__'s settings
    for frame in pipe.stream(reader, num_frames=len(reader)):          # frames streamed in order
        writer.write(frame)

Per window of N frames (stride < N, overlaps blended): DCM -> VAE encoder (z_c, CFW features) ->
respaced DDPM from q_sample(z_c, 999), each step: guidance encoder + UNet, posterior step,
flow-guidance gradient step (RAFT flows cached per frame pair across windows), blend with the previous
window's trajectory on shared frames -> VAE decoder with STAM/CAPM/CFW -> AdaIN against bicubic LQ ->
blend decoded frames. Memory is bounded by one window plus its overlap, whatever the clip length.

Each stage runs the window's frames in one call when its memory estimate fits the budget
(``sdatc/pipelines/hardware.py``), else spatial tiles stacked with the frames on the batch axis; the VAE
splits frames first where it may (the encoder), then computes by tiles (``tiled_vae.py``: exact, whole-frame
statistics, memory falling with the tile). Noise comes from per-frame generators
on the device and trajectories stay there: the denoising loop never waits for the host.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from sdatc.errors import SdatcError
from sdatc.models.dcm_fast import dcm_inference
from sdatc.models.flow import load_raft, pair_flows
from sdatc.models.sdatc import SDATC
from sdatc.pipelines.base import VSRPipeline
from sdatc.pipelines.colour import colour_correct
from sdatc.pipelines.config import PipelineConfig, pad_to_multiple
from sdatc.pipelines.flow_guidance import FlowGuidance
from sdatc.pipelines.hardware import StagePlan, StagePlanner, speed_up
from sdatc.pipelines.prompt import clip_context
from sdatc.pipelines.sampler import Z_C_STEP, Sampler, frame_noise, posterior_sample
from sdatc.pipelines.tiled_vae import decode_tiled, encode_tiled
from sdatc.pipelines.tiling import tiled_batched
from sdatc.pipelines.windows import FrameFeed, WindowBlender, plan_windows, temporal_weights
from sdatc.utils import tqdm

_NO_RAFT = object()  # RAFT not loaded yet


class SDATCPipeline(VSRPipeline):
    """SD 2.1 + trained SDATC modules, restoring compressed low-resolution frames x4 (50 denoising steps).
    ``unet_calls`` counts denoiser calls (batches) and ``unet_evals`` the frame-tile evaluations by latent
    shape (for benchmarks); ``plans`` holds each stage's last memory plan. ``raft``: a RAFT to use instead
    of the one ``flow`` configures (loaded at the first clip)."""

    mode, model_cls, config_cls, folder = "sdatc", SDATC, PipelineConfig, "sdatc"

    def __init__(self, model, config: PipelineConfig | None = None, device: str | torch.device = "cpu",
                 torch_dtype: torch.dtype | str | None = None, progress: bool = True, compile: bool = False,
                 cast: bool = True, raft=_NO_RAFT):
        self._raft = raft
        super().__init__(model, config, device, torch_dtype, progress, compile, cast)

    def _setup(self) -> None:
        m = self.model
        self.sampler = Sampler(self.config.sampler, m.scheduler.alphas_cumprod, m.prediction_type)
        self.unet_calls = 0  # denoiser invocations (each a batch of frames x tiles)
        self.unet_evals: Counter[tuple[int, int]] = Counter()  # latent (h, w) of each frame-tile evaluation -> count
        self.unet_factor = 2 ** (len(m.unet.config.block_out_channels) - 1)
        self.denoiser = speed_up(m, self.device, compile=self.compile)  # model.predict, or compiled
        self._plan = StagePlanner(m, self.device, self.config.tiling)  # budget read at the first window
        self.plans: dict[str, StagePlan] = self._plan.plans

    @property
    def raft(self):
        """The RAFT of flow guidance (None: flow guidance off, or no weights), loaded once."""
        if self._raft is _NO_RAFT:
            self._raft = load_raft(self.config.flow, self.device)
        return self._raft

    def to(self, device=None, torch_dtype=None):
        if device is not None and self._raft not in (_NO_RAFT, None):
            self._raft = self._raft.to(device)
        return super().to(device, torch_dtype)

    # ------------------------------------------------------------------ the clip loop

    def __call__(self, frames, num_inference_steps: int | None = None, generator: torch.Generator | None = None,
                 cfw_weight: float | None = None, colour_fix: str | None = None, output_type: str = "np",
                 prompt: str | list[str] | None = None):
        """Restore a clip: (T, H, W, 3) uint8 or a list of PIL images -> (T, 4H, 4W, 3) uint8 (``"np"``) or
        PIL images (``"pil"``). ``num_inference_steps`` (default: the config's), ``generator``: its initial
        seed seeds each frame's noise (results do not depend on the window plan), ``cfw_weight`` in [0, 1]
        (1: fidelity, 0: realism), ``colour_fix``: adain | wavelet | none. ``prompt``: the UNet's text
        condition, one string or one per frame, encoded by SD's text encoder (loaded at the first non-empty
        prompt); None or ``""``: the cached empty prompt, as trained."""
        return self._collect(frames, output_type, **self._settings(num_inference_steps, generator, cfw_weight,
                                                                   colour_fix, prompt))

    def _settings(self, num_inference_steps: int | None = None, generator: torch.Generator | None = None,
                  cfw_weight: float | None = None, colour_fix: str | None = None,
                  prompt: str | list[str] | None = None) -> dict:
        seed = generator.initial_seed() if generator is not None else None
        config = None
        if any(v is not None for v in (num_inference_steps, seed, cfw_weight, colour_fix)):
            s = self.config.sampler
            sampler = dataclasses.replace(s, steps=num_inference_steps or s.steps,
                                          seed=s.seed if seed is None else seed)
            extra = {k: v for k, v in (("cfw_weight", cfw_weight), ("colour", colour_fix)) if v is not None}
            config = dataclasses.replace(self.config, sampler=sampler, **extra)
        return {"prompt": prompt, "config": config}

    @torch.no_grad()
    def stream(self, frames: Iterable[np.ndarray], num_frames: int, prompt: str | list[str] | None = None,
               source: str | Path | None = None, config: PipelineConfig | None = None) -> Iterator[np.ndarray]:
        """Stream restored frames (4h, 4w, 3) uint8, in order, for ``num_frames`` input frames. ``prompt``: the
        UNet's text condition, one for the clip or one per frame (``sdatc/pipelines/prompt.py``); None or
        ``""``: the cached empty-prompt embedding. ``source`` is not needed (UltraVSR's DRS reads it);
        ``config``: this call's settings (``__call__``'s arguments) instead of the pipeline's."""
        cfg, dev, up = config or self.config, self.device, self.model.cfg.upscale
        sampler = self.sampler if config is None else Sampler(cfg.sampler, self.model.scheduler.alphas_cumprod,
                                                                self.model.prediction_type)
        feed = FrameFeed(frames, num_frames)  # an error for an empty clip
        text = clip_context(self.model, prompt, num_frames, dev) if prompt not in (None, "") else None  # per clip
        windows = plan_windows(num_frames, cfg.window.length, min(cfg.window.stride, cfg.window.length))
        blender = WindowBlender(num_frames, windows)
        cond_cache: dict[int, tuple] = {}  # per frame: (z_c, {level: feature}) still needed
        shared: dict[int, list[torch.Tensor]] = {}  # trajectory of frames shared with the next window (on device)
        flows: dict[int, tuple] = {}  # RAFT flows (fwd, bwd) of the frame pair (i, i + 1), shared by windows
        bar = tqdm(windows, desc="windows", unit="win", leave=False, disable=not self.progress)
        for k, (start, end) in enumerate(bar):
            # 1. condition: DCM -> VAE encoder for the frames no earlier window encoded
            idx = list(range(start, end))
            lq = feed.window(start, end).to(dev)  # (T, 3, h, w), frames read as the window needs them
            h, w = lq.shape[-2:]
            lq_p = pad_to_multiple(lq, self.model.pad_multiple)  # (T, 3, h', w'), multiples of the pad multiple
            new = [i for i in idx if i not in cond_cache]
            if new:
                sel = torch.tensor([idx.index(i) for i in new])
                z_new, f_new = self._encode(self._dcm(lq_p[sel], cfg), new, cfg)
                for j, i in enumerate(new):
                    cond_cache[i] = (z_new[j], {lv: f[j] for lv, f in f_new.items()})
            z_c = torch.stack([cond_cache[i][0] for i in idx])  # (T, 4, H/8, W/8)
            feats = {lv: torch.stack([cond_cache[i][1][lv] for i in idx]) for lv in cond_cache[idx[0]][1]}
            # 2. denoise, following the previous window's trajectory on shared frames
            next_start = windows[k + 1][0] if k + 1 < len(windows) else None
            context = text.window(idx) if text is not None else None  # (T, 77, D) or the empty prompt
            z = self._sample(idx, z_c, lq_p, cfg, sampler, temporal_weights(start, end, windows), shared,
                             next_start, flows, context)
            # 3. decode, colour-fix against the LQ, blend the overlaps, yield the frames no later window changes
            out = self._decode(z, feats, cfg)[..., : up * h, : up * w]  # (T, 3, 4h, 4w)
            out = colour_correct(out, lq, cfg.colour).clamp(0, 1)  # fix, then clamp (the peers' order)
            for _, frame in blender.add(k, out.cpu()):
                yield (frame * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            for i in feed.release(next_start if next_start is not None else num_frames):
                cond_cache.pop(i, None)  # forget what no later window needs
                flows.pop(i, None)
        bar.close()

    def _sample(self, idx: list[int], z_c: torch.Tensor, lq_p: torch.Tensor, cfg: PipelineConfig, s: Sampler,
                weights: torch.Tensor, shared: dict, next_start: int | None, flows: dict,
                context: torch.Tensor | None) -> torch.Tensor:
        """The reverse chain for one window, (T, 4, h, w) z_c -> z_0; frames shared with the previous window
        follow its trajectory in proportion to their blending weights (``shared`` then holds this window's
        trajectory of the frames from ``next_start`` on). Nothing here waits for the device."""
        dev, shape, n = z_c.device, tuple(z_c.shape[1:]), len(idx)
        noise0 = torch.stack([frame_noise(cfg.sampler.seed, i, -1, shape, dev) for i in idx]).to(z_c)
        z = s.start(z_c, noise0)
        guide = self._guidance(idx, lq_p, tuple(z_c.shape[-2:]), flows, cfg)
        prev_w = (1 - weights).tolist()  # weight of the previous window on each frame (0 where not shared)
        keep = [j for j, i in enumerate(idx) if next_start is not None and i >= next_start]
        trajectory = {idx[j]: [] for j in keep}
        plan = self._plan("predict", z_c, cfg.tiling.latent_tile)  # whole frames in one call, or tiles x frames
        whole = not plan.tiled and plan.batch >= n
        kw = {} if context is None else {"context": context}
        bar = tqdm(range(len(s)), desc="steps", unit="step", leave=False, disable=not self.progress)
        for step in bar:
            t = torch.full((plan.batch,), s.timesteps[step], device=dev, dtype=torch.long)
            with self._autocast():
                if whole:  # the UNet (with the guidance encoder) on the window's frames at once
                    self.unet_calls += 1
                    self.unet_evals[tuple(z.shape[-2:])] += n
                    out = self.denoiser(z, t[:n], z_c, **kw)  # epsilon or v (model.prediction_type)
                else:
                    out = self._predict_tiled(z, t, z_c, context, plan, cfg)
            noise = torch.stack([frame_noise(cfg.sampler.seed, i, step, shape, dev) for i in idx]).to(z)
            z = s.step(step, z, out.float(), noise)
            if guide is not None:
                z = guide.step(z, s.posterior_variance(step))
            for j, i in enumerate(idx):
                if i in shared and prev_w[j] > 0:
                    z[j] = prev_w[j] * shared[i][step].to(z) + (1 - prev_w[j]) * z[j]
            for j in keep:
                trajectory[idx[j]].append(z[j].clone())
        bar.close()
        shared.clear()
        shared.update(trajectory)
        return z

    # ------------------------------------------------------------------ stages, tiled by memory

    def _dcm(self, lq: torch.Tensor, cfg: PipelineConfig | None = None) -> torch.Tensor:
        """(T, 3, h, w) -> (T, 3, 4h, 4w)."""
        t = (cfg or self.config).tiling
        p = self._plan("dcm", lq, t.dcm_tile)
        dcm = self.model.dcm
        up = self.model.upscale if dcm is None else lambda x: dcm_inference(dcm, x)  # the DCM's inference path
        with self._autocast():
            if not p.tiled and p.batch >= len(lq):  # the window's frames in one call
                out = up(lq)
            else:
                out = tiled_batched(up, (lq,), t.dcm_tile if p.tiled else None, t.dcm_overlap, p.batch)
        return out.float().clamp(0, 1)

    def _encode(self, img: torch.Tensor, frames: list[int],
                cfg: PipelineConfig | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(T, 3, H, W) of clip frames ``frames`` -> z_c (T, 4, H/8, W/8), CFW features. z_c is the posterior's
        mode, or with ``sampler.z_c: sample`` a draw with each frame's seeded noise (the same in every window)."""
        cfg = cfg or self.config
        t, levels = cfg.tiling, sorted(self.model.cfg.cfw_levels)
        p = self._plan("encode", img, t.encoder_tile)  # frames split first (nothing in the encoder mixes them)
        sample = cfg.sampler.z_c == "sample"

        def enc(x):
            if p.tiled:  # computed by tiles, whole-frame statistics (tiled_vae.py)
                z, *logvar, feats = encode_tiled(self.model, x, levels, p.tile, posterior=sample)
            elif sample:
                z, *logvar, feats = self.model.encode_posterior(x)
            else:
                z, *logvar, feats = self.model.encode(x)
            return (z, *logvar, *(feats[lv] for lv in levels))

        with self._autocast():  # the frames in batches of p.batch
            out = enc(img) if p.batch >= len(img) else tiled_batched(enc, (img,), None, 0, p.batch)
        z, out = out[0].float(), out[1:]
        if sample:  # latent_scale (mean + std eps): the peers' get_first_stage_encoding(posterior.sample())
            logvar, out = out[0].float(), out[1:]
            eps = torch.stack([frame_noise(cfg.sampler.seed, i, Z_C_STEP, tuple(z.shape[1:]), z.device)
                               for i in frames])
            z = self.model.latent_scale * posterior_sample(z, logvar, eps)  # z: the unscaled mean here
        return z, {lv: f for lv, f in zip(levels, out)}

    def _predict_tiled(self, z: torch.Tensor, t: torch.Tensor, z_c: torch.Tensor, context: torch.Tensor | None,
                       plan: StagePlan, cfg: PipelineConfig) -> torch.Tensor:
        """(T, 4, h, w) -> the UNet output (epsilon or v) by latent tiles x frames in batches of ``plan.batch``,
        with Gaussian blending. ``context``: (T, 77, D) text states, cut with the frames; None: the empty prompt."""
        tc = cfg.tiling

        def fn(zt, zct, *text):
            self.unet_calls += 1
            self.unet_evals[tuple(zt.shape[-2:])] += zt.shape[0]
            if text:  # the frames' text states, cut with them (tiled_batched's per_frame)
                return self.denoiser(zt, t[: zt.shape[0]], zct, context=text[0])
            return self.denoiser(zt, t[: zt.shape[0]], zct)

        return tiled_batched(fn, (z, z_c), tc.latent_tile if plan.tiled else None, tc.latent_overlap, plan.batch,
                             align=self.unet_factor, per_frame=() if context is None else (context,))

    def _decode(self, z: torch.Tensor, feats: dict[int, torch.Tensor], cfg: PipelineConfig) -> torch.Tensor:
        """(T, 4, h, w) -> (T, 3, 8h, 8w) on the [0, 1] scale, unclamped: the colour fix sees the decoder's own
        output and the caller clamps after it, as StableSR and MGLD-VSR do (fp32 decode when running fp16)."""
        tc, w, n = cfg.tiling, cfg.cfw_weight, z.shape[0]
        p = self._plan("decode", z, tc.decoder_tile, split=False)  # STAM needs the window's frames together
        with self._autocast(enabled=self.dtype != torch.float16):
            if p.tiled:  # computed by tiles holding all frames, whole-frame statistics (tiled_vae.py)
                out = decode_tiled(self.model, z, feats, n, w, p.tile)
            else:
                out = self.model.decode(z, feats, num_frames=n, w=w)  # the whole window: STAM sees all frames
        return (out.float() + 1) / 2

    def _guidance(self, idx: list[int], lq_p: torch.Tensor, latent_size: tuple[int, int], flows: dict[int, tuple],
                  cfg: PipelineConfig) -> FlowGuidance | None:
        """Flow guidance for a window; RAFT runs only on frame pairs no earlier window computed."""
        if len(idx) < 2 or not cfg.flow.enabled or self.raft is None:
            return None
        new = [j for j in range(len(idx) - 1) if idx[j] not in flows]
        if new:
            fwd, bwd = pair_flows(self.raft, lq_p[new], lq_p[[j + 1 for j in new]], cfg.flow.raft_iters)
            for n, j in enumerate(new):
                flows[idx[j]] = (fwd[n], bwd[n])  # (2, h, w) each, frame idx[j] -> idx[j] + 1 and back
        fwd = torch.stack([flows[i][0] for i in idx[:-1]])  # (T-1, 2, h, w)
        bwd = torch.stack([flows[i][1] for i in idx[:-1]])
        return FlowGuidance.from_flows(fwd, bwd, latent_size, cfg.flow)

    @torch.no_grad()
    def sample_window(self, lq: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        """The sampled latents of one window, not decoded (stage-2 training data): (T, 3, h, w) LR in
        [0, 1] -> z_0 (T, 4, h'/2, w'/2) on the padded grid; frame j's noise is seeded as frame
        ``first_frame + j`` of a clip."""
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise SdatcError(f"lq must be (T, 3, h, w), got {tuple(lq.shape)}")
        if min(lq.shape[-2:]) < 8:
            raise SdatcError(f"frames of {lq.shape[-1]}x{lq.shape[-2]} are too small (at least 8x8 LR pixels)")
        cfg, t = self.config, lq.shape[0]
        idx = list(range(first_frame, first_frame + t))
        lq_p = pad_to_multiple(lq.to(self.device).float(), self.model.pad_multiple)
        z_c, _ = self._encode(self._dcm(lq_p, cfg), idx, cfg)
        return self._sample(idx, z_c, lq_p, cfg, self.sampler, torch.ones(t), {}, None, {}, None)

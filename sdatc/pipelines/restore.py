"""Restore a whole clip with SDATC: streamed windows, stages tiled when memory asks, flow guidance, colour fix.

    pipe = RestorePipeline(model, PipelineConfig(), device="cpu")
    for frame in pipe.restore(reader, num_frames=len(reader)):   # (h, w, 3) uint8 in
        writer.write(frame)                                       # (4h, 4w, 3) uint8 out, in order

Per window of N frames (stride < N, overlaps blended): DCM -> VAE encoder (z_c, CFW features) ->
respaced DDPM from q_sample(z_c, 999), each step: guidance encoder + UNet, posterior step,
flow-guidance gradient step (RAFT flows cached per frame pair across windows), blend with the previous
window's trajectory on shared frames -> VAE decoder with STAM/CAPM/CFW -> AdaIN against bicubic LQ ->
blend decoded frames. Memory is bounded by one window plus its overlap, whatever the clip length.

Each stage runs the window's frames in one call when its memory estimate fits the budget
(``sdatc/pipelines/memory.py``), else spatial tiles stacked with the frames on the batch axis; the VAE
splits frames first where it may (the encoder), then computes by tiles (``tiled_vae.py``: exact, whole-frame
statistics, memory falling with the tile). Noise comes from per-frame generators
on the device and trajectories stay there: the denoising loop never waits for the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from sdatc.errors import SdatcError
from sdatc.models.dcm_fast import dcm_inference
from sdatc.models.flow import FlowConfig, load_raft, pair_flows
from sdatc.pipelines.colour import colour_correct
from sdatc.pipelines.flow_guidance import FlowGuidance
from sdatc.pipelines.memory import StagePlan, StagePlanner
from sdatc.pipelines.prompt import ClipContext, clip_context
from sdatc.pipelines.sampler import Z_C_STEP, Sampler, SamplerConfig, posterior_sample
from sdatc.pipelines.speed import speed_up
from sdatc.pipelines.tiled_vae import decode_tiled, encode_tiled
from sdatc.pipelines.tiling import tiled_batched
from sdatc.pipelines.windows import FrameFeed, WindowBlender, plan_windows, temporal_weights
from sdatc.utils import tqdm


@dataclasses.dataclass
class WindowConfig:
    length: int = 5  # N frames denoised together (STAM, flow guidance)
    stride: int = 3  # frames between window starts; overlaps (length - stride) are blended

    def __post_init__(self):
        if not 1 <= self.stride <= self.length:
            raise ValueError(f"window stride must be in [1, length={self.length}], got {self.stride}")


@dataclasses.dataclass
class TilingConfig:
    """Spatial tiling per stage, decided by memory (``sdatc/pipelines/memory.py``). ``auto``: a stage runs
    the whole window's frames in one call when its activation estimate fits the budget, else in tiles
    stacked with the frames on the batch axis, as many per call as fit; ``on``: always tiles (small GPUs,
    tests); ``off``: never. The tile sizes below apply only when tiling."""

    mode: Literal["auto", "on", "off"] = "auto"
    memory_gb: float | None = None  # activation budget; None: free GPU memory less a margin, or half the free RAM
    latent_tile: int = 64  # UNet path, latent pixels (StableSR: 64 with overlap 32, Gaussian weights)
    latent_overlap: int = 32
    decoder_tile: int = 64  # VAE decoder, latent pixels (x8 in output pixels); halved by the planner until it fits
    decoder_overlap: int = 16  # unused: the VAE's tiles compute exactly, without overlaps (A43); kept for old configs
    encoder_tile: int = 512  # VAE encoder, pixels of the DCM output
    encoder_overlap: int = 64  # unused, as decoder_overlap
    dcm_tile: int = 128  # DCM, LR pixels
    dcm_overlap: int = 16

    def __post_init__(self):
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise ValueError(f"tiling.memory_gb must be > 0 (or null: from the device), got {self.memory_gb}")
        for stage in ("latent", "decoder", "encoder", "dcm"):
            tile, overlap = getattr(self, f"{stage}_tile"), getattr(self, f"{stage}_overlap")
            if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
                raise ValueError(f"tiling.{stage}_tile must be a whole number of pixels >= 1, got {tile!r}")
            if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < tile:
                raise ValueError(f"tiling.{stage}_overlap must be a whole number in [0, {stage}_tile={tile}), "
                                 f"got {overlap!r}")


@dataclasses.dataclass
class PipelineConfig:
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    flow: FlowConfig = dataclasses.field(default_factory=FlowConfig)
    window: WindowConfig = dataclasses.field(default_factory=WindowConfig)
    tiling: TilingConfig = dataclasses.field(default_factory=TilingConfig)
    colour: Literal["adain", "wavelet", "none"] = "adain"
    cfw_weight: float = 0.75  # the CFW weight w at inference (A7): fidelity (1) vs realism (0); training uses 1

    def __post_init__(self):
        if not 0.0 <= self.cfw_weight <= 1.0:
            raise ValueError(f"cfw_weight must be in [0, 1], got {self.cfw_weight}")


def autocast(device: torch.device, dtype: torch.dtype, enabled: bool = True):
    """Autocast to ``dtype`` on ``device`` (CUDA: bf16 or fp16; CPU: bf16), a null context for fp32
    or ``enabled=False``; any other combination is an error (never a silent fallback)."""
    if not enabled or dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype != torch.bfloat16:
        raise SdatcError(f"{str(dtype).removeprefix('torch.')} autocast needs a GPU; use bf16 or fp32 on the CPU")
    return torch.autocast(device.type, dtype=dtype)


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a model's weights once, in place, to the run's dtype (at load, before moving it to the device), so no
    call re-casts them under autocast. fp16 keeps the VAE decoder (and what sits in it) in fp32: SD's VAE
    overflows in fp16, and the pipelines decode fp16 runs in fp32. fp32: the model as it is."""
    if dtype == torch.float32:
        return model
    model.to(dtype)
    vae = getattr(model, "vae", None)
    if dtype == torch.float16 and vae is not None:
        vae.decoder.float()
        if vae.post_quant_conv is not None:
            vae.post_quant_conv.float()
    return model


def pad_to_multiple(lq: torch.Tensor, m: int) -> torch.Tensor:
    """Pad (bottom/right; reflect, or replicate when the frame is too small to reflect) to multiples of m."""
    h, w = lq.shape[-2:]
    ph, pw = -h % m, -w % m
    if not (ph or pw):
        return lq
    return F.pad(lq, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")


def frame_noise(seed: int, frame: int, step: int, shape: tuple[int, ...],
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise for one frame at one sampling step (step -1: the start), the same in every window, drawn by a
    generator on ``device`` (no host copy). Same seed, same device type: same noise; a CPU and a GPU draw
    different numbers."""
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + frame) * 1_009 + step + 1)
    return torch.randn(shape, generator=g, device=device)


class RestorePipeline:
    """Runs an SDATC model over clips. ``unet_calls`` counts denoiser calls (batches) and ``unet_evals`` the
    frame-tile evaluations by latent shape (for benchmarks); ``plans`` holds each stage's last plan."""

    def __init__(self, model, cfg: PipelineConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, raft=None, progress: bool = True, compile: bool = False):
        self.model, self.cfg, self.device, self.dtype, self.progress = model, cfg, torch.device(device), dtype, progress
        autocast(self.device, dtype)  # fp16 on the CPU: an error now, not at the first frame
        self.raft = raft if raft is not None else load_raft(cfg.flow, self.device)
        self.sampler = Sampler(cfg.sampler, model.scheduler.alphas_cumprod, model.prediction_type)
        self.unet_calls = 0  # denoiser invocations (each a batch of frames x tiles)
        self.unet_evals: Counter[tuple[int, int]] = Counter()  # latent (h, w) of each frame-tile evaluation -> count
        self.vae_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        self.unet_factor = 2 ** (len(model.unet.config.block_out_channels) - 1)
        self.denoiser = speed_up(model, self.device, compile=compile)  # model.predict, or compiled
        self._plan = StagePlanner(model, self.device, cfg.tiling)  # budget read at the first window
        self.plans: dict[str, StagePlan] = self._plan.plans

    # ------------------------------------------------------------------ stages, tiled by memory

    def _autocast(self, enabled: bool = True):
        return autocast(self.device, self.dtype, enabled)

    def _dcm(self, lq: torch.Tensor) -> torch.Tensor:
        """(T, 3, h, w) -> (T, 3, 4h, 4w)."""
        t = self.cfg.tiling
        p = self._plan("dcm", lq, t.dcm_tile)
        dcm = self.model.dcm
        up = self.model.upscale if dcm is None else lambda x: dcm_inference(dcm, x)  # the DCM's inference path
        with self._autocast():
            out = tiled_batched(up, (lq,), t.dcm_tile if p.tiled else None, t.dcm_overlap, p.batch)
        return out.float().clamp(0, 1)

    def _encode(self, img: torch.Tensor, frames: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(T, 3, H, W) of clip frames ``frames`` -> z_c (T, 4, H/8, W/8), CFW features. z_c is the posterior's
        mode, or with ``sampler.z_c: sample`` a draw with each frame's seeded noise (the same in every window)."""
        t, levels = self.cfg.tiling, sorted(self.model.cfg.cfw_levels)
        p = self._plan("encode", img, t.encoder_tile)  # frames split first (nothing in the encoder mixes them)
        sample = self.cfg.sampler.z_c == "sample"

        def enc(x):
            if p.tiled:  # computed by tiles, whole-frame statistics (tiled_vae.py)
                z, *logvar, feats = encode_tiled(self.model, x, levels, p.tile, posterior=sample)
            elif sample:
                z, *logvar, feats = self.model.encode_posterior(x)
            else:
                z, *logvar, feats = self.model.encode(x)
            return (z, *logvar, *(feats[lv] for lv in levels))

        with self._autocast():
            out = tiled_batched(enc, (img,), None, 0, p.batch)
        z, out = out[0].float(), out[1:]
        if sample:  # latent_scale (mean + std eps): the peers' get_first_stage_encoding(posterior.sample())
            logvar, out = out[0].float(), out[1:]
            eps = torch.stack([frame_noise(self.cfg.sampler.seed, i, Z_C_STEP, tuple(z.shape[1:]), z.device)
                               for i in frames])
            z = self.model.latent_scale * posterior_sample(z, logvar, eps)  # z: the unscaled mean here
        return z, {lv: f for lv, f in zip(levels, out)}

    def _predict(self, z: torch.Tensor, t: int, z_c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(T, 4, h, w) -> the UNet output (epsilon or v): whole frames, or latent tiles x frames in batches
        with Gaussian blending, as memory allows. ``context``: (T, 77, D) text states; None: the empty prompt."""
        cfg = self.cfg.tiling
        p = self._plan("predict", z, cfg.latent_tile)
        tt = torch.full((p.batch,), t, device=z.device, dtype=torch.long)

        def fn(zt, zct, *text):
            self.unet_calls += 1
            self.unet_evals[tuple(zt.shape[-2:])] += zt.shape[0]
            if text:  # the frames' text states, cut with them (tiled_batched's per_frame)
                return self.denoiser(zt, tt[: zt.shape[0]], zct, context=text[0])
            return self.denoiser(zt, tt[: zt.shape[0]], zct)

        with self._autocast():
            out = tiled_batched(fn, (z, z_c), cfg.latent_tile if p.tiled else None, cfg.latent_overlap, p.batch,
                                align=self.unet_factor, per_frame=() if context is None else (context,))
        return out.float()

    def _decode(self, z: torch.Tensor, feats: dict[int, torch.Tensor], num_frames: int) -> torch.Tensor:
        """(T, 4, h, w) -> (T, 3, 8h, 8w) on the [0, 1] scale, unclamped: the colour fix sees the decoder's own
        output and the caller clamps after it, as StableSR and MGLD-VSR do (fp32 decode when running fp16)."""
        cfg, w = self.cfg.tiling, self.cfg.cfw_weight
        p = self._plan("decode", z, cfg.decoder_tile, split=False)  # STAM needs the window's frames together

        with self._autocast(enabled=self.dtype != torch.float16):
            if p.tiled:  # computed by tiles holding all frames, whole-frame statistics (tiled_vae.py)
                out = decode_tiled(self.model, z, feats, num_frames, w, p.tile)
            else:
                out = self.model.decode(z, feats, num_frames=num_frames, w=w)  # the whole window: STAM sees all frames
        return (out.float() + 1) / 2

    # ------------------------------------------------------------------ the clip loop

    @torch.no_grad()
    def restore(self, frames: Iterable[np.ndarray], num_frames: int,
                prompt: str | list[str] | None = None) -> Iterator[np.ndarray]:
        """Stream restored frames (4h, 4w, 3) uint8, in order, for ``num_frames`` input frames. ``prompt``: the
        UNet's text condition, one for the clip or one per frame (``sdatc/pipelines/prompt.py``); None or
        ``""``: the cached empty-prompt embedding."""
        cfg, dev, up = self.cfg, self.device, self.model.cfg.upscale
        feed = FrameFeed(frames, num_frames)  # an error for an empty clip
        text = clip_context(self.model, prompt, num_frames, dev)  # encoded once per clip; None: the empty prompt
        windows = plan_windows(num_frames, cfg.window.length, min(cfg.window.stride, cfg.window.length))
        blender = WindowBlender(num_frames, windows)
        cond_cache: dict[int, tuple] = {}  # per frame: (z_c, {level: feature}) still needed
        shared: dict[int, list[torch.Tensor]] = {}  # trajectory of frames shared with the next window (on device)
        flows: dict[int, tuple] = {}  # RAFT flows (fwd, bwd) of the frame pair (i, i + 1), shared by windows
        bar = tqdm(windows, desc="windows", unit="win", leave=False, disable=not self.progress)
        for k, (start, end) in enumerate(bar):
            idx = list(range(start, end))
            lq = feed.window(start, end).to(dev)  # (T, 3, h, w), frames read as the window needs them
            h, w = lq.shape[-2:]
            lq_p = self._pad(lq)  # (T, 3, h', w') with h', w' multiples of the model's pad multiple
            new = [i for i in idx if i not in cond_cache]
            if new:
                sel = torch.tensor([idx.index(i) for i in new])
                z_new, f_new = self._encode(self._dcm(lq_p[sel]), new)
                for j, i in enumerate(new):
                    cond_cache[i] = (z_new[j], {lv: f[j] for lv, f in f_new.items()})
            z_c = torch.stack([cond_cache[i][0] for i in idx])  # (T, 4, H/8, W/8)
            feats = {lv: torch.stack([cond_cache[i][1][lv] for i in idx]) for lv in cond_cache[idx[0]][1]}
            z = self._sample(idx, z_c, lq_p, temporal_weights(start, end, windows), shared, windows, k, flows, text)
            out = self._decode(z, feats, num_frames=len(idx))[..., : up * h, : up * w]  # (T, 3, 4h, 4w)
            out = colour_correct(out, lq, cfg.colour).clamp(0, 1)  # fix, then clamp (the peers' order)
            for _, frame in blender.add(k, out.cpu()):
                yield (frame * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            for i in feed.release(windows[k + 1][0] if k + 1 < len(windows) else num_frames):
                cond_cache.pop(i, None)  # forget what no later window needs
                flows.pop(i, None)
        bar.close()

    def _guidance(self, idx: list[int], lq_p: torch.Tensor, latent_size: tuple[int, int],
                  flows: dict[int, tuple]) -> FlowGuidance | None:
        """Flow guidance for a window; RAFT runs only on frame pairs no earlier window computed."""
        if self.raft is None or len(idx) < 2 or not self.cfg.flow.enabled:
            return None
        new = [j for j in range(len(idx) - 1) if idx[j] not in flows]
        if new:
            fwd, bwd = pair_flows(self.raft, lq_p[new], lq_p[[j + 1 for j in new]], self.cfg.flow.raft_iters)
            for n, j in enumerate(new):
                flows[idx[j]] = (fwd[n], bwd[n])  # (2, h, w) each, frame idx[j] -> idx[j] + 1 and back
        fwd = torch.stack([flows[i][0] for i in idx[:-1]])  # (T-1, 2, h, w)
        bwd = torch.stack([flows[i][1] for i in idx[:-1]])
        return FlowGuidance.from_flows(fwd, bwd, latent_size, self.cfg.flow)

    def _sample(self, idx, z_c, lq_p, weights, shared, windows, k, flows,
                text: ClipContext | None = None) -> torch.Tensor:
        """The reverse chain for one window; frames shared with the previous window follow its
        trajectory in proportion to their blending weights. Nothing here waits for the device."""
        cfg, s, dev = self.cfg, self.sampler, z_c.device
        context = text.window(idx) if text is not None else None  # (T, 77, D) or the empty prompt
        shape = tuple(z_c.shape[1:])
        noise0 = torch.stack([frame_noise(cfg.sampler.seed, i, -1, shape, dev) for i in idx]).to(z_c)
        z = s.start(z_c, noise0)
        guide = self._guidance(idx, lq_p, tuple(z_c.shape[-2:]), flows)
        prev_w = (1 - weights).tolist()  # weight of the previous window on each frame (0 where not shared)
        next_start = windows[k + 1][0] if k + 1 < len(windows) else None
        keep = [j for j, i in enumerate(idx) if next_start is not None and i >= next_start]
        trajectory = {idx[j]: [] for j in keep}
        bar = tqdm(range(len(s)), desc="steps", unit="step", leave=False, disable=not self.progress)
        for step in bar:
            out = self._predict(z, s.timesteps[step], z_c, context)  # epsilon or v (model.prediction_type)
            noise = torch.stack([frame_noise(cfg.sampler.seed, i, step, shape, dev) for i in idx]).to(z)
            z = s.step(step, z, out, noise)
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

    @torch.no_grad()
    def sample_window(self, lq: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        """The sampled latents of one window, not decoded (stage-2 training data): (T, 3, h, w) LR in
        [0, 1] -> z_0 (T, 4, h'/2, w'/2) on the padded grid; frame j's noise is seeded as frame
        ``first_frame + j`` of a clip."""
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise SdatcError(f"lq must be (T, 3, h, w), got {tuple(lq.shape)}")
        self._check_size(*lq.shape[-2:])
        t = lq.shape[0]
        idx = list(range(first_frame, first_frame + t))
        lq_p = self._pad(lq.to(self.device).float())
        z_c, _ = self._encode(self._dcm(lq_p), idx)
        return self._sample(idx, z_c, lq_p, torch.ones(t), {}, [(idx[0], idx[-1] + 1)], 0, {})

    def _check_size(self, h: int, w: int) -> None:
        if min(h, w) < 8:
            raise SdatcError(f"frames of {w}x{h} are too small (at least 8x8 LR pixels)")

    def _pad(self, lq: torch.Tensor) -> torch.Tensor:
        return pad_to_multiple(lq, self.model.pad_multiple)

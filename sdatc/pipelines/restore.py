"""Restore a whole clip with SDATC: streamed windows, every stage tiled, flow guidance, colour fix.

    pipe = RestorePipeline(model, PipelineConfig(), device="cpu")
    for frame in pipe.restore(reader, num_frames=len(reader)):   # (h, w, 3) uint8 in
        writer.write(frame)                                       # (4h, 4w, 3) uint8 out, in order

Per window of N frames (stride < N, overlaps blended): DCM -> VAE encoder (z_c, CFW features) ->
respaced DDPM from q_sample(z_c, 999), each step: guidance encoder + UNet (latent tiles), posterior
step, flow-guidance gradient step, blend with the previous window's trajectory on shared frames ->
VAE decoder with STAM/CAPM/CFW (pixel tiles) -> AdaIN against bicubic LQ -> blend decoded frames.
Memory is bounded by one window plus its overlap, whatever the clip length.
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
from tqdm import tqdm

from sdatc.errors import SdatcError
from sdatc.pipelines.colour import colour_correct
from sdatc.pipelines.flow import FlowConfig, FlowGuidance, load_raft
from sdatc.pipelines.sampler import Sampler, SamplerConfig
from sdatc.pipelines.tiling import tiled_apply
from sdatc.pipelines.windows import FrameFeed, WindowBlender, plan_windows, temporal_weights


@dataclasses.dataclass
class WindowConfig:
    length: int = 5  # N frames denoised together (STAM, flow guidance)
    stride: int = 3  # frames between window starts; overlaps (length - stride) are blended

    def __post_init__(self):
        if not 1 <= self.stride <= self.length:
            raise ValueError(f"window stride must be in [1, length={self.length}], got {self.stride}")


@dataclasses.dataclass
class TilingConfig:
    """Spatial tiling, per stage. ``auto`` tiles a stage when its input exceeds its tile size."""

    mode: Literal["auto", "on", "off"] = "auto"
    latent_tile: int = 64  # UNet path, latent pixels (StableSR: 64 with overlap 32, Gaussian weights)
    latent_overlap: int = 32
    decoder_tile: int = 64  # VAE decoder, latent pixels (x8 in output pixels)
    decoder_overlap: int = 16
    encoder_tile: int = 512  # VAE encoder, pixels of the DCM output
    encoder_overlap: int = 64
    dcm_tile: int = 128  # DCM, LR pixels
    dcm_overlap: int = 16


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


def pad_to_multiple(lq: torch.Tensor, m: int) -> torch.Tensor:
    """Pad (bottom/right; reflect, or replicate when the frame is too small to reflect) to multiples of m."""
    h, w = lq.shape[-2:]
    ph, pw = -h % m, -w % m
    if not (ph or pw):
        return lq
    return F.pad(lq, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")


def frame_noise(seed: int, frame: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Noise for one frame at one sampling step (step -1: the start), the same in every window."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + frame) * 1_009 + step + 1)
    return torch.randn(shape, generator=g)


class RestorePipeline:
    """Runs an SDATC model over clips. ``unet_calls`` counts denoiser calls (for benchmarks)."""

    def __init__(self, model, cfg: PipelineConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, raft=None, progress: bool = True):
        self.model, self.cfg, self.device, self.dtype, self.progress = model, cfg, torch.device(device), dtype, progress
        autocast(self.device, dtype)  # fp16 on the CPU: an error now, not at the first frame
        self.raft = raft if raft is not None else load_raft(cfg.flow, self.device)
        self.sampler = Sampler(cfg.sampler, model.scheduler.alphas_cumprod, model.prediction_type)
        self.unet_calls = 0  # denoiser invocations (each a batch of frames x tiles)
        self.unet_evals: Counter[tuple[int, int]] = Counter()  # latent (h, w) of each frame-tile evaluation -> count
        self.vae_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        self.unet_factor = 2 ** (len(model.unet.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ tiled stages

    def _tiled(self, size: int, tile: int) -> bool:
        mode = self.cfg.tiling.mode
        return mode == "on" or (mode == "auto" and size > tile)

    def _autocast(self, enabled: bool = True):
        return autocast(self.device, self.dtype, enabled)

    def _dcm(self, lq: torch.Tensor) -> torch.Tensor:
        """(T, 3, h, w) -> (T, 3, 4h, 4w)."""
        t = self.cfg.tiling
        with self._autocast():
            if self._tiled(max(lq.shape[-2:]), t.dcm_tile):
                out = tiled_apply(lambda x, box: self.model.upscale(x), lq, t.dcm_tile, t.dcm_overlap)
            else:
                out = self.model.upscale(lq)
        return out.float().clamp(0, 1)

    def _encode(self, img: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(T, 3, H, W) -> z_c (T, 4, H/8, W/8), CFW features."""
        t, levels = self.cfg.tiling, sorted(self.model.cfg.cfw_levels)

        def enc(x, box):
            z, feats = self.model.encode(x)
            return (z, *(feats[lv] for lv in levels))

        with self._autocast():
            if self._tiled(max(img.shape[-2:]), t.encoder_tile):
                out = tiled_apply(enc, img, t.encoder_tile, t.encoder_overlap, align=self.vae_factor)
            else:
                out = enc(img, None)
        return out[0].float(), {lv: f for lv, f in zip(levels, out[1:])}

    def _predict(self, z: torch.Tensor, t: int, z_c: torch.Tensor) -> torch.Tensor:
        """(T, 4, h, w) -> the UNet output (epsilon or v), over latent tiles with Gaussian blending when large."""
        cfg = self.cfg.tiling
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)

        def fn(zt, box):
            self.unet_calls += 1
            self.unet_evals[tuple(zt.shape[-2:])] += zt.shape[0]
            zc = z_c if box is None else z_c[..., box[0]:box[1], box[2]:box[3]]
            return self.model.predict(zt, tt, zc)

        with self._autocast():
            if self._tiled(max(z.shape[-2:]), cfg.latent_tile):
                return tiled_apply(fn, z, cfg.latent_tile, cfg.latent_overlap, align=self.unet_factor).float()
            return fn(z, None).float()

    def _decode(self, z: torch.Tensor, feats: dict[int, torch.Tensor], num_frames: int) -> torch.Tensor:
        """(T, 4, h, w) -> (T, 3, 8h, 8w) in [0, 1] (fp32 decode when running fp16: SD's VAE overflows)."""
        cfg, w = self.cfg.tiling, self.cfg.cfw_weight

        def fn(zt, box):
            if box is None:
                f = feats
            else:
                f = {lv: x[..., box[0] * s:box[1] * s, box[2] * s:box[3] * s]
                     for lv, x in feats.items() for s in [self.vae_factor // 2**lv]}
            return self.model.decode(zt, f, num_frames=num_frames, w=w)

        with self._autocast(enabled=self.dtype != torch.float16):
            if self._tiled(max(z.shape[-2:]), cfg.decoder_tile):
                out = tiled_apply(fn, z, cfg.decoder_tile, cfg.decoder_overlap)
            else:
                out = fn(z, None)
        return ((out.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ the clip loop

    @torch.no_grad()
    def restore(self, frames: Iterable[np.ndarray], num_frames: int) -> Iterator[np.ndarray]:
        """Stream restored frames (4h, 4w, 3) uint8, in order, for ``num_frames`` input frames."""
        cfg, dev, up = self.cfg, self.device, self.model.cfg.upscale
        feed = FrameFeed(frames, num_frames)  # an error for an empty clip
        windows = plan_windows(num_frames, cfg.window.length, min(cfg.window.stride, cfg.window.length))
        blender = WindowBlender(num_frames, windows)
        cond_cache: dict[int, tuple] = {}  # per frame: (z_c, {level: feature}) still needed
        shared: dict[int, list[torch.Tensor]] = {}  # trajectory of frames shared with the next window
        bar = tqdm(windows, desc="windows", unit="win", leave=False, disable=not self.progress)
        for k, (start, end) in enumerate(bar):
            idx = list(range(start, end))
            lq = feed.window(start, end).to(dev)  # (T, 3, h, w), frames read as the window needs them
            h, w = lq.shape[-2:]
            lq_p = self._pad(lq)  # (T, 3, h', w') with h', w' multiples of the model's pad multiple
            new = [i for i in idx if i not in cond_cache]
            if new:
                sel = torch.tensor([idx.index(i) for i in new])
                z_new, f_new = self._encode(self._dcm(lq_p[sel]))
                for j, i in enumerate(new):
                    cond_cache[i] = (z_new[j], {lv: f[j] for lv, f in f_new.items()})
            z_c = torch.stack([cond_cache[i][0] for i in idx])  # (T, 4, H/8, W/8)
            feats = {lv: torch.stack([cond_cache[i][1][lv] for i in idx]) for lv in cond_cache[idx[0]][1]}
            z = self._sample(idx, z_c, lq_p, temporal_weights(start, end, windows), shared, windows, k)
            out = self._decode(z, feats, num_frames=len(idx))[..., : up * h, : up * w]  # (T, 3, 4h, 4w)
            out = colour_correct(out, lq, cfg.colour).clamp(0, 1)
            for _, frame in blender.add(k, out.cpu()):
                yield (frame * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            for i in feed.release(windows[k + 1][0] if k + 1 < len(windows) else num_frames):
                cond_cache.pop(i, None)  # forget what no later window needs
        bar.close()

    def _sample(self, idx, z_c, lq_p, weights, shared, windows, k) -> torch.Tensor:
        """The reverse chain for one window; frames shared with the previous window follow its
        trajectory in proportion to their blending weights."""
        cfg, s = self.cfg, self.sampler
        shape = tuple(z_c.shape[1:])
        noise0 = torch.stack([frame_noise(cfg.sampler.seed, i, -1, shape) for i in idx]).to(z_c)
        z = s.start(z_c, noise0)
        guide = None
        if self.raft is not None and len(idx) > 1:
            guide = FlowGuidance(self.raft, lq_p, tuple(z_c.shape[-2:]), cfg.flow)
        prev_w = 1 - weights  # weight of the previous window on each frame (0 where not shared)
        next_start = windows[k + 1][0] if k + 1 < len(windows) else None
        keep = [j for j, i in enumerate(idx) if next_start is not None and i >= next_start]
        trajectory = {idx[j]: [] for j in keep}
        bar = tqdm(range(len(s)), desc="steps", unit="step", leave=False, disable=not self.progress)
        for step in bar:
            out = self._predict(z, s.timesteps[step], z_c)  # epsilon or v (model.prediction_type)
            noise = torch.stack([frame_noise(cfg.sampler.seed, i, step, shape) for i in idx]).to(z)
            z = s.step(step, z, out, noise)
            if guide is not None:
                z = guide.step(z, s.posterior_variance(step))
            for j, i in enumerate(idx):
                if i in shared and prev_w[j] > 0:
                    z[j] = prev_w[j] * shared[i][step].to(z) + (1 - prev_w[j]) * z[j]
            for j in keep:
                trajectory[idx[j]].append(z[j].cpu())
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
        z_c, _ = self._encode(self._dcm(lq_p))
        return self._sample(idx, z_c, lq_p, torch.ones(t), {}, [(idx[0], idx[-1] + 1)], 0)

    def _check_size(self, h: int, w: int) -> None:
        if min(h, w) < 8:
            raise SdatcError(f"frames of {w}x{h} are too small (at least 8x8 LR pixels)")

    def _pad(self, lq: torch.Tensor) -> torch.Tensor:
        return pad_to_multiple(lq, self.model.pad_multiple)

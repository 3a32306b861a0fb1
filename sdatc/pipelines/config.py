"""The pipelines' settings and the small helpers every pipeline shares: dtypes, autocast, one weight cast.

    cfg = load_config(PipelineConfig, "pipeline.yaml")   # SDATC; UltraVSRPipelineConfig for UltraVSR
    model = cast_weights(model, torch.bfloat16)          # once, by the pipeline that runs it (base.py)
    with autocast(device, torch.bfloat16): ...           # each stage of a window
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

from sdatc.errors import SdatcError
from sdatc.models.flow import FlowConfig
from sdatc.pipelines.sampler import SamplerConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class WindowConfig:
    length: int = 5  # N frames denoised together (STAM, flow guidance)
    stride: int = 3  # frames between window starts; overlaps (length - stride) are blended

    def __post_init__(self):
        if not 1 <= self.stride <= self.length:
            raise ValueError(f"window stride must be in [1, length={self.length}], got {self.stride}")


@dataclasses.dataclass
class TilingConfig:
    """Spatial tiling per stage, decided by memory (``sdatc/pipelines/hardware.py``). ``auto``: a stage runs
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


@dataclasses.dataclass
class DRSConfig:
    estimator: Literal["clipiqa", "bitstream", "fixed"] = "clipiqa"  # the reference's; falls back to bitstream
    d: float = 0.5  # for estimator=fixed
    d_min: float = 0.01  # the release clips nothing; > 0 keeps the one-step x0 = (z - sqrt(1 - D) eps) / sqrt(D) finite
    d_max: float = 1.0
    # [guess, ours] x264 CRF (or QP) -> d, and bits per pixel -> d: monotone, interpolated, clamped at the ends
    crf_table: list[list[float]] = dataclasses.field(
        default_factory=lambda: [[10, 0.85], [20, 0.7], [30, 0.5], [40, 0.3]])
    bpp_table: list[list[float]] = dataclasses.field(
        default_factory=lambda: [[0.02, 0.3], [0.1, 0.5], [0.3, 0.7], [1.0, 0.85]])
    frames: int = 5  # clipiqa: frames sampled per clip

    def __post_init__(self):
        if not 0 < self.d_min <= self.d_max <= 1:
            raise ValueError(f"drs: need 0 < d_min <= d_max <= 1, got {self.d_min}, {self.d_max}")
        if not 0 < self.d <= 1:
            raise ValueError(f"drs.d must be in (0, 1], got {self.d}")
        for name, falling in (("crf_table", True), ("bpp_table", False)):
            table = getattr(self, name)
            xs, ys = [r[0] for r in table], [r[1] for r in table]
            if len(table) < 2 or any(len(r) != 2 for r in table) or xs != sorted(xs) or len(set(xs)) != len(xs):
                raise ValueError(f"drs.{name}: at least two [x, d] rows with x strictly increasing, got {table}")
            if ys != sorted(ys, reverse=falling):
                raise ValueError(f"drs.{name}: d must {'fall' if falling else 'rise'} with x (a monotone table), "
                                 f"got {table}")


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



@dataclasses.dataclass
class PromptConfig:
    """The prompt of each clip: ``text`` (all clips), or ``sidecar`` (``<clip>.txt``; ``text`` where a clip
    has none), or a ``captioner`` plug-in with its ``captioner_weights``. ``""``: the empty prompt."""

    text: str = ""
    sidecar: bool = False
    captioner: str | None = None  # "module:function"
    captioner_weights: str | None = None

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise ValueError(f"prompt.text must be a string, got {self.text!r}")
        if self.captioner is not None:
            module, _, name = self.captioner.partition(":")
            if not module or not name:
                raise ValueError(f"prompt.captioner must be 'module:function', got {self.captioner!r}")
            if self.sidecar or self.text:
                raise ValueError("prompt.captioner captions every clip: leave prompt.sidecar and prompt.text unset")
        elif self.captioner_weights is not None:
            raise ValueError("prompt.captioner_weights is set without prompt.captioner")

    @property
    def empty(self) -> bool:
        """Every clip gets the empty prompt (the cached-embedding fast path)."""
        return not self.text and not self.sidecar and self.captioner is None


def as_dtype(value) -> torch.dtype:
    """A torch dtype from ``torch_dtype`` as users give it: None (fp32), "fp32" | "bf16" | "fp16", or a torch dtype."""
    if value is None:
        return torch.float32
    if isinstance(value, str):
        if value not in DTYPES:
            raise SdatcError(f"torch_dtype {value!r}: use one of {', '.join(DTYPES)} or a torch dtype")
        return DTYPES[value]
    if value not in DTYPES.values():
        raise SdatcError(f"torch_dtype {value}: use torch.float32, torch.bfloat16 or torch.float16")
    return value


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

"""How a run uses its device: the memory plans that decide tiling (A41), and the denoiser's speed path (A44).

    budget = memory_budget(device, tiling)                     # bytes the stages' activations may use
    plan = plan_stage(items=5, size=(96, 160), bytes_per_pixel=est, budget=budget, tile=64, mode="auto")
    plan.tiled, plan.batch                                     # whole frames in one batch, or tiles x frames
    plan = plan_vae(frames=16, size=(90, 160), cost=vae_cost(model, "decode"), budget=budget, tile=64, chunk=1)
    plan.tiled, plan.batch, plan.tile                          # VAE: frames per call, tile size if tiled
    predict = speed_up(model, device, compile=True)            # once, on its device, in eval mode
    out = predict(z_t, t, z_c)                                 # SDATC: model.predict's arguments (UltraVSR: its own)

Budget: on a GPU the free memory (the driver's free plus what torch's allocator holds unused) less a
margin; on the CPU ``tiling.memory_gb``, else half of the available RAM. Costs: activation bytes per
input pixel of one frame of each stage, measured in fp32 by ``scripts/measure_stage_memory.py`` and
expressed per channel of the stage's widest level, so that they scale with the config (an upper bound under
bf16). Weights are not counted: they are resident before the budget is read. The VAE stages
(:func:`plan_vae`) are costed as they run (``live`` bytes per pixel of every frame of the call, ``temp`` for
the frames of one call of the frozen blocks; tiled: ``tiled_live`` and ``tiled_temp`` per pixel of a tile).
Frames are split first where the stage allows it, then tiles, halved until the estimate fits.

Speed: ``channels_last`` for the UNet (its Sites and LoRA layers included) and the guidance encoder (on CUDA
the VAE too); on CUDA TF32 for fp32 matmuls and convolutions (process-wide, set once with a printed note;
``tf32=False`` keeps full fp32); with ``compile=True`` the denoiser is ``torch.compile(model.predict,
dynamic=False)``, one graph with no graph break (``tests/models/test_compile.py``), compiled again only for a
new input shape or autocast / grad mode (timesteps enter as an (N,) tensor). Modes with CUDA graphs are
refused: a replay overwrites outputs the pipelines still hold. Outputs move by float rounding only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from sdatc.errors import SdatcError

# Activation bytes per input pixel per channel of the stage's first (widest-resolution) level, fp32,
# measured by scripts/measure_stage_memory.py on the tiny and the SD 2.1-size configs (the larger of the
# two, rounded up; docs/decisions.md A41).
COEF = {"dcm": 140.0, "predict": 150.0}
# The VAE stages by system: (live, temp, tiled_live, tiled_temp), bytes per input pixel per channel of
# block_out_channels[0], fp32 (``VAECost``). Measured on the tiny models (24x40 latent / 192x320 image, 1 and 3
# frames, tiles 12 and 4 latent / 96 and 32 image pixels; peaks in one fresh process each, the process's own
# constant included), rounded up by about 10 % (docs/decisions.md A41).
VAE_COEF = {
    ("sdatc", "encode"): (6.5, 12.0, 14.0, 24.0),
    ("sdatc", "decode"): (7000.0, 0.0, 1600.0, 8000.0),  # STAM: never split, temp folded into live
    ("ultravsr", "encode"): (0.5, 22.5, 15.0, 18.0),
    ("ultravsr", "decode"): (3400.0, 100.0, 2100.0, 900.0),  # RTS on the whole window: chunks save little
}
MIN_TILE = {"encode": 64, "decode": 8}  # the planner halves tiles down to this (image / latent pixels)
GPU_MARGIN = 0.15  # fraction of the free GPU memory left alone (fragmentation, cuDNN workspaces, the writer)
GPU_RESERVE = 1 << 30  # and at least this many bytes
CPU_FRACTION = 0.5  # of MemAvailable, when tiling.memory_gb is not set


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes); the physical memory where that file does not exist."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(device: torch.device, memory_gb: float | None = None) -> int:
    """Bytes the inference stages' activations may use on ``device`` (read now)."""
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(0, int(free - max(GPU_MARGIN * free, GPU_RESERVE)))
    return int(CPU_FRACTION * available_ram())


def stage_bytes_per_pixel(model, stage: str) -> float:
    """Activation bytes per input pixel of one frame of ``stage`` (fp32): ``dcm`` (LR pixels), ``predict``
    (latent pixels, UNet + guidance encoder). The VAE stages: :func:`vae_cost`."""
    if stage == "dcm":
        dcm = getattr(model, "dcm", model)
        width = getattr(getattr(dcm, "cfg", None), "embed_dim", 64) if dcm is not None else 3
    elif stage == "predict":
        width = model.unet.config.block_out_channels[0]
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return COEF[stage] * width


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """How a stage runs: ``tiled`` (spatial tiles) or whole frames, ``batch`` items per call (frames, or
    tile x frame pairs), and the memory estimate behind it (bytes)."""

    tiled: bool
    batch: int  # items per call (VAE stages: frames per call of the frozen blocks)
    need: int  # bytes: the estimate of what runs (all items untiled in one call for the batched stages)
    budget: int
    tile: int | None = None  # VAE stages, tiled: the tile size (input pixels)


def plan_stage(items: int, size: tuple[int, int], bytes_per_pixel: float, budget: int, tile: int,
               mode: str = "auto", group: int = 1) -> StagePlan:
    """Plan one stage for ``items`` frames of ``size`` (its input pixels).

    ``auto``: whole frames, all in one call, when they fit the budget; else tiles of ``tile`` pixels with as
    many tile x frame items per call as fit (at least ``group``, in multiples of it: a temporal stage
    needs all frames of a window together). ``on``: always tiles (small GPUs, tests). ``off``: never.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"tiling mode must be auto, on or off, got {mode!r}")
    h, w = size
    need = int(items * h * w * bytes_per_pixel)
    if mode == "off" or (mode == "auto" and need <= budget):
        return StagePlan(False, items, need, budget)
    if mode == "auto" and max(h, w) <= tile:  # tiles cannot be smaller than the frame: fewer frames per call
        fit = int(budget // max(h * w * bytes_per_pixel, 1))
        return StagePlan(False, min(items, max(group, fit // group * group)), need, budget)
    th, tw = min(tile, h), min(tile, w)
    fit = int(budget // max(th * tw * bytes_per_pixel, 1))
    batch = max(group, fit // group * group)
    return StagePlan(True, batch, need, budget)


@dataclasses.dataclass(frozen=True)
class VAECost:
    """Activation bytes per input pixel of a VAE stage (:data:`VAE_COEF` x the model's width)."""

    live: float  # per frame of the call, held for the whole call
    temp: float  # per frame of one frozen-block call
    tiled_live: float  # tiled: per frame of the call
    tiled_temp: float  # tiled: per pixel of one tile, per frame of one call

    def need(self, frames: int, size: tuple[int, int], per_call: int, tile: int | None = None) -> int:
        """Bytes for ``frames`` frames of ``size``, ``per_call`` frames per frozen-block call, untiled or by tiles."""
        h, w = size
        if tile is None or tile >= max(h, w):
            return int(h * w * (frames * self.live + per_call * self.temp))
        return int(h * w * frames * self.tiled_live + min(tile, h) * min(tile, w) * per_call * self.tiled_temp)


def vae_cost(model, stage: str) -> VAECost:
    """The :class:`VAECost` of ``stage`` (``encode``: image pixels, ``decode``: latent pixels) of an SDATC or
    UltraVSR model."""
    system = "ultravsr" if type(model).__name__ == "UltraVSR" else "sdatc"
    width = model.vae.config.block_out_channels[0]
    return VAECost(*(c * width for c in VAE_COEF[(system, stage)]))


def plan_vae(frames: int, size: tuple[int, int], cost: VAECost, budget: int, tile: int, mode: str = "auto",
             chunk: int | None = None, split: bool = True, min_tile: int = 8) -> StagePlan:
    """Plan a VAE stage for ``frames`` frames of ``size`` (its input pixels).

    ``chunk``: frames per call of the frozen blocks asked for (None: all). ``split``: the stage may run fewer
    frames per call (nothing in its frozen blocks mixes frames; SDATC's decoder, with STAM, may not). ``auto``:
    untiled with the most frames per call (up to ``chunk``) that fit; else by tiles of ``tile`` pixels,
    halved while the estimate exceeds the budget (down to ``min_tile``). ``on``: tiles of ``tile``; ``off``: untiled.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"tiling mode must be auto, on or off, got {mode!r}")
    per_call = min(chunk or frames, frames)
    whole = cost.need(frames, size, per_call)
    if mode == "off" or (mode == "auto" and whole <= budget):
        return StagePlan(False, per_call, whole, budget)
    if mode == "auto" and split:  # fewer frames per call first: exact and as fast
        fits = [b for b in range(per_call, 0, -1) if cost.need(frames, size, b) <= budget]
        if fits:
            return StagePlan(False, fits[0], cost.need(frames, size, fits[0]), budget)
        per_call = 1  # nothing untiled fits: tiles of one frame at a time
    if mode == "auto" and max(size) <= min_tile:  # tiles cannot be smaller
        return StagePlan(False, per_call, whole, budget)
    t = tile
    while mode == "auto" and t > min_tile and cost.need(frames, size, per_call, t) > budget:
        t = max(min_tile, t // 2)
    return StagePlan(True, per_call, cost.need(frames, size, per_call, t), budget, t)


class StagePlanner:
    """Plans a pipeline's stages (:func:`plan_stage`) against one budget, read at the first plan (once the
    model is resident) and divided by ``share`` (workers that run at once); ``plans`` keeps each stage's last."""

    def __init__(self, model, device: torch.device, tiling, share: int = 1):
        self.model, self.device, self.tiling, self.share = model, device, tiling, share
        self.budget: int | None = None
        self.plans: dict[str, StagePlan] = {}

    def __call__(self, stage: str, x: torch.Tensor, tile: int, group: int = 1, chunk: int | None = None,
                 split: bool = True) -> StagePlan:
        """The plan for ``x`` (N, C, h, w) at ``stage``, with tiles of ``tile`` pixels if needed; the VAE stages
        (``encode``, ``decode``) by :func:`plan_vae` (``chunk``, ``split`` as there)."""
        if self.budget is None:
            self.budget = memory_budget(self.device, self.tiling.memory_gb) // self.share
        if stage in ("encode", "decode"):
            plan = plan_vae(x.shape[0], tuple(x.shape[-2:]), vae_cost(self.model, stage), self.budget, tile,
                            self.tiling.mode, chunk, split, MIN_TILE[stage])
        else:
            plan = plan_stage(x.shape[0], tuple(x.shape[-2:]), stage_bytes_per_pixel(self.model, stage), self.budget,
                              tile, self.tiling.mode, group)
        self.plans[stage] = plan
        return plan


def describe(plans: dict[str, StagePlan]) -> str:
    """One line per run: which stages tile, with how many items per call."""
    parts = []
    for name, p in plans.items():
        how = (f"tiles{f' of {p.tile}' if p.tile else ''}, {p.batch} per call" if p.tiled
               else f"whole frames, {p.batch} per call")
        parts.append(f"{name}: {how} (needs {p.need / 2**30:.2f} of {p.budget / 2**30:.2f} GiB)")
    return "; ".join(parts)


# The speed path (A44).

COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call (``$CXX``, else g++ / clang++ on macOS), or None."""
    name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    return shutil.which(name)


def c_compiler() -> str | None:
    """The C compiler Triton builds its launchers with (``$CC``, else cc / gcc / clang), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def enable_tf32() -> bool:
    """TF32 for fp32 matmuls and cuDNN convolutions, process-wide; prints a note when it switches them on.
    Returns whether anything changed."""
    if torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print("note: TF32 on for fp32 matmuls and convolutions on CUDA "
          "(process-wide; speed_up(tf32=False) keeps full fp32)")
    return True


@torch.no_grad()
def to_channels_last(module: nn.Module) -> None:
    """Every 4-D parameter and buffer of ``module`` in channels_last, in place (``module.to(memory_format=...)``
    would fail on the 5-D Conv3d weights of STAM)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.ndim == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def speed_up_undone(model: nn.Module):
    """What :func:`speed_up` changes, undone when the block ends: the process-wide TF32 flags (and float32
    matmul precision) and the memory layout of every parameter and buffer of ``model`` (values untouched).
    For a pipeline built on a model that keeps training (the trainer's validation)."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    layouts = [(t, t.stride()) for t in (*model.parameters(), *model.buffers())]
    try:
        yield model
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[:2]
        torch.set_float32_matmul_precision(flags[2])
        with torch.no_grad():
            for t, stride in layouts:
                if t.stride() != stride:  # same values, the strides it had (Parameter objects kept)
                    t.data = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def _timesteps(t, z: Tensor) -> Tensor:
    """t (a number, a 0-d / (1,) tensor or one per sample) as a contiguous (N,) tensor on z's device, as
    ``predict`` would broadcast it; a Python int would otherwise be a constant of the graph (one compile per
    timestep)."""
    t = torch.as_tensor(t, device=z.device)
    return (t.reshape(-1).expand(z.shape[0]) if t.numel() == 1 else t).contiguous()


def speed_up(model: nn.Module, device: str | torch.device, compile: bool = False, *,
             mode: str | None = None, channels_last: bool = True, tf32: bool = True,
             backend: str | Callable = "inductor") -> Callable[..., Tensor]:
    """Prepare ``model`` (SDATC or UltraVSR, on ``device``) for fast denoising; returns its denoiser.

    Args:
        model: has ``unet`` (and ``guidance``, ``vae``, where present) and ``predict``; changed in place
            (memory layout only).
        device: where the model runs; CUDA-only settings (TF32, the VAE's layout) follow it.
        compile: return a ``torch.compile`` d ``model.predict`` (dynamic=False); else the plain one.
        mode: ``None`` / ``"default"`` or ``"max-autotune-no-cudagraphs"`` (long autotuning at the first
            call of each shape).
        channels_last: put the convolution weights in channels_last.
        tf32: on CUDA, allow TF32 for fp32 matmuls and convolutions (process-wide).
        backend: the ``torch.compile`` backend (tests pass cheap ones).

    Returns:
        ``fn`` with ``model.predict``'s arguments and output.
    """
    device = torch.device(device)
    if mode not in COMPILE_MODES:
        raise SdatcError(f"compile mode {mode!r} is not supported (one of {', '.join(map(str, COMPILE_MODES))}); "
                         "modes with CUDA graphs overwrite outputs the pipelines still hold")
    if compile and backend == "inductor":
        if device.type == "cpu" and cpp_compiler() is None:
            raise SdatcError("compile on the CPU needs a C++ compiler for inductor (g++, or $CXX): none found; "
                             "install one or run without compile")
        if device.type == "cuda" and c_compiler() is None:
            raise SdatcError("compile on CUDA needs a C compiler for Triton (cc / gcc, or $CC): none found; "
                             "install one or run without compile")
    if device.type == "cuda" and tf32:
        enable_tf32()
    if channels_last:
        parts = ["unet", "guidance"] + (["vae"] if device.type == "cuda" else [])
        for name in parts:
            part = getattr(model, name, None)
            if part is not None:
                to_channels_last(part)
    if not compile:  # model.predict itself (a partial adds no Python frame)
        denoise = functools.partial(model.predict)
        denoise.compiled = False
        return denoise
    predict = torch.compile(model.predict, dynamic=False, backend=backend,
                            **({"mode": mode} if mode not in (None, "default") else {}))

    @functools.wraps(model.predict)
    def denoise(z: Tensor, t, *args, **kwargs) -> Tensor:
        args = tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
        return predict(z.contiguous(), _timesteps(t, z), *args, **kwargs)

    denoise.compiled = True
    return denoise

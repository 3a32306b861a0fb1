"""Tiling decided by memory: how much a stage may hold, what one frame of it costs, and the plan.

    budget = memory_budget(device, tiling)                     # bytes the stages' activations may use
    plan = plan_stage(items=5, size=(96, 160), bytes_per_pixel=est, budget=budget,
                      tile=64, overlap=32, align=8, mode="auto")
    plan.tiled, plan.batch                                     # whole frames in one batch, or tiles x frames

Budget: on a GPU the free memory (the driver's free plus what torch's allocator holds unused) less a
margin; on the CPU ``tiling.memory_gb``, else half of the available RAM. Costs: activation bytes per
input pixel of one frame of each stage, measured on the CPU in fp32 by ``scripts/measure_stage_memory.py``
at the SD 2.1 size and expressed per channel of the stage's widest level, so that they scale with the
config (the tiny test models included). fp32 bytes are an upper bound under bf16 autocast. Weights are
not counted: they are resident before the budget is read.
"""

from __future__ import annotations

import dataclasses
import os

import torch

# Activation bytes per input pixel per channel of the stage's first (widest-resolution) level, fp32,
# measured by scripts/measure_stage_memory.py on the tiny and the SD 2.1-size configs (the larger of the
# two, rounded up; docs/decisions.md A41).
COEF = {"dcm": 140.0, "encode": 17.0, "predict": 150.0, "decode": 6000.0}
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
    """Activation bytes per input pixel of one frame of ``stage`` (fp32): ``dcm`` (LR pixels), ``encode``
    (x4 pixels), ``predict`` (latent pixels, UNet + guidance encoder), ``decode`` (latent pixels)."""
    if stage == "dcm":
        dcm = getattr(model, "dcm", model)
        width = getattr(getattr(dcm, "cfg", None), "embed_dim", 64) if dcm is not None else 3
    elif stage in ("encode", "decode"):
        width = model.vae.config.block_out_channels[0]
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
    batch: int
    need: int  # bytes for all items untiled in one call
    budget: int


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


class StagePlanner:
    """Plans a pipeline's stages (:func:`plan_stage`) against one budget, read at the first plan (once the
    model is resident) and divided by ``share`` (workers that run at once); ``plans`` keeps each stage's last."""

    def __init__(self, model, device: torch.device, tiling, share: int = 1):
        self.model, self.device, self.tiling, self.share = model, device, tiling, share
        self.budget: int | None = None
        self.plans: dict[str, StagePlan] = {}

    def __call__(self, stage: str, x: torch.Tensor, tile: int, group: int = 1) -> StagePlan:
        """The plan for ``x`` (N, C, h, w) at ``stage``, with tiles of ``tile`` pixels if needed."""
        if self.budget is None:
            self.budget = memory_budget(self.device, self.tiling.memory_gb) // self.share
        plan = plan_stage(x.shape[0], tuple(x.shape[-2:]), stage_bytes_per_pixel(self.model, stage), self.budget,
                          tile, self.tiling.mode, group)
        self.plans[stage] = plan
        return plan


def describe(plans: dict[str, StagePlan]) -> str:
    """One line per run: which stages tile, with how many items per call."""
    parts = []
    for name, p in plans.items():
        how = f"tiles, {p.batch} per call" if p.tiled else f"whole frames, {p.batch} per call"
        parts.append(f"{name}: {how} (needs {p.need / 2**30:.2f} of {p.budget / 2**30:.2f} GiB)")
    return "; ".join(parts)

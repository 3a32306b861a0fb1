"""Checks a training run makes on itself: every tensor on the run's device, fp32 master weights in every
optimiser, the frozen weights' bits unchanged (checksums computed on the device), the number of processes
the launcher asked for."""

from __future__ import annotations

import os

import torch

from sdatc.errors import SdatcError

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def device_checksums(tensors) -> torch.Tensor:
    """Two int64 sums of each tensor's exact bits (plain and position-weighted), computed where the tensors
    live: (n, 2). The frozen-weight check without copying ~1 B parameters to the host."""
    out = []
    for t in tensors:
        bits = t.detach().reshape(-1).view(_BITS[t.element_size()]).long()  # the exact bits, widened
        pos = torch.arange(1, bits.numel() + 1, device=bits.device)
        out.append(torch.stack([bits.sum(), (bits * pos).sum()]))  # integer sums: exact, order-free
    return torch.stack(out) if out else torch.zeros(0, 2, dtype=torch.long)


def _on(t: torch.Tensor, device: torch.device) -> bool:
    if t.device.type != device.type:
        return False
    return device.type == "cpu" or device.index is None or t.device.index == device.index  # "cpu" and "cpu:0" alike


def misplaced(device, modules: dict, optimizers: dict, ema=None) -> list[str]:
    """Names of the tensors not on ``device``: every parameter and buffer of ``modules`` (name -> module),
    every optimiser state tensor (name -> optimiser; AdamW's scalar ``step`` counters live on the host by
    design) and every EMA shadow."""
    device = torch.device(device)
    bad = []
    for name, m in modules.items():
        if m is not None:
            bad += [f"{name}.{n}" for n, t in [*m.named_parameters(), *m.named_buffers()] if not _on(t, device)]
    for name, opt in optimizers.items():
        if opt is None:
            continue
        for i, st in enumerate(opt.state.values()):
            bad += [f"{name}.state[{i}].{k}" for k, t in st.items()
                    if torch.is_tensor(t) and not (k == "step" and t.ndim == 0) and not _on(t, device)]
    if ema is not None:
        bad += [f"ema.shadow[{i}]" for i, t in enumerate(ema.shadow_params) if not _on(t, device)]
    return bad


def check_devices(device, modules: dict, optimizers: dict, ema=None, when: str = "setup") -> None:
    """Raise when any model, optimiser or EMA tensor is off the run's device (see :func:`misplaced`)."""
    bad = misplaced(device, modules, optimizers, ema)
    if bad:
        raise SdatcError(f"after {when}: {len(bad)} tensor(s) not on {device} (a bug: please report it), e.g. "
                         f"{', '.join(bad[:4])}")


def check_fp32_optimizers(optimizers: dict) -> None:
    """Every parameter an optimiser holds is fp32 (its own master copy: bf16 updates lose small steps)."""
    bad = [f"{name}: {tuple(p.shape)} {p.dtype}" for name, opt in optimizers.items() if opt is not None
           for g in opt.param_groups for p in g["params"] if p.dtype != torch.float32]
    if bad:
        raise SdatcError(f"{len(bad)} optimised parameter(s) not fp32 (a bug: please report it), e.g. "
                         f"{'; '.join(bad[:3])}")


def process_note(world: int, env=os.environ) -> str | None:
    """A warning when the launcher asked for more processes than this run has, else None."""
    asked = env.get("WORLD_SIZE", "")
    if asked.isdigit() and int(asked) > world:
        return f"the launcher asked for {asked} processes (WORLD_SIZE) but this run has {world}"
    if not asked and world == 1 and env.get("MASTER_ADDR"):  # accelerate's simple launcher, --num_processes > 1
        return ("the launcher asked for several processes (MASTER_ADDR is set) but this run is one process: "
                "without GPUs, `accelerate launch` needs --multi_gpu and ACCELERATE_USE_CPU=1 to start several")
    return None

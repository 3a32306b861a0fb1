"""Optical flow: torchvision's RAFT-large from local weights, flows between frames, warping, occlusion.

    raft = load_raft(cfg.flow, device)               # None when off or no weights (one warning)
    fwd, bwd = compute_flows(raft, frames, iters=12)  # (T-1, 2, h, w) each, pixels
    aligned = backward_warp(frames[1:], fwd)          # frame i+1 aligned to frame i
    occ = occlusion_mask(fwd, bwd, 0.01, 0.5, "linear")

Used by flow guidance (``sdatc/pipelines/flow_guidance.py``, SDATC eq. 12-13), the flow-warp training loss
and the warping-error metric. Conventions (all flows are in pixels, channel 0 = x, channel 1 = y):

* ``f_{i->i+1}(p)`` (torchvision's RAFT): frame i+1 shows frame i's content of pixel p at p + f(p).
  ``W(x, f)`` samples x at p + f(p), so ``W(z_{i+1}, f_{i->i+1})`` is frame i+1 aligned to frame i.
* Pixel centres sit at integer coordinates 0..W-1 (``grid_sample(align_corners=True)``), so an
  integer flow shifts an image exactly (up to float32 rounding of the normalised grid, ~1e-6 px; exact
  when H-1 and W-1 are powers of two). Samples outside the frame use ``padding_mode="border"``
  (repeat the edge instead of pulling latents to 0); those pixels are occluded anyway.
* Occlusion (forward-backward check; |.| is the Euclidean norm of a flow vector); 1 = occluded.
  ``flow.occlusion``: ``linear`` (the default; the architecture document and MGLD-VSR's released
  ``forward_backward_consistency_check``) ``|f + W0(b, f)| > alpha (|f| + |b|) + beta`` with ``W0`` the
  zero-padded warp and no other test; ``linear_offframe`` (ours before issue 24) the magnitude of the
  warped reverse flow ``alpha (|f| + |W(b, f)|)``, border padding, and every p whose p + f(p) leaves the
  frame occluded; ``squared`` (Sundaram et al. 2010, Ruder et al. 2016, Lai et al. 2018's warping error)
  ``|f + W(b, f)|^2 > alpha (|f|^2 + |W(b, f)|^2) + beta``, off-frame pixels occluded.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sdatc.errors import SdatcError
from sdatc.utils import read_state_dict

RAFT_WEIGHTS_NAME = "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
RAFT_HELP = (
    f"get torchvision's RAFT-large weights {RAFT_WEIGHTS_NAME} "
    "(torchvision.models.optical_flow.Raft_Large_Weights.C_T_SKHT_V2, "
    f"https://download.pytorch.org/models/{RAFT_WEIGHTS_NAME}), put the file e.g. under weights/ "
    f"and set flow.raft_weights=weights/{RAFT_WEIGHTS_NAME}"
)
# RAFT's correlation pyramid pools the 1/8 feature map 3 times and needs >= 16 cells: inputs >= 128 px.
RAFT_MIN_SIZE = 128
OCCLUSION_FORMS = ("linear", "linear_offframe", "squared")


@dataclasses.dataclass
class FlowConfig:
    """Flow guidance settings (config key ``flow``)."""

    enabled: bool = True
    raft_weights: str | None = None  # local torchvision raft_large state dict (.pth or .safetensors)
    required: bool = False  # True: missing weights is an error; False: guidance off with one warning
    step_size: Literal["log_sigma", "sigma"] = "log_sigma"  # eta = scale*|log sigma^2| or scale*sigma^2
    scale: float = 10.0
    # Forward-backward occlusion test: linear |f + W0(b)| > alpha (|f| + |b|) + beta (the architecture document,
    # MGLD-VSR's release), linear_offframe (|W(b)| in the threshold, off-frame pixels occluded), or squared
    # |f + W(b)|^2 > alpha (|f|^2 + |W(b)|^2) + beta (Sundaram et al. 2010). See the module docstring.
    occlusion: Literal["linear", "linear_offframe", "squared"] = "linear"
    occlusion_alpha: float = 0.01
    occlusion_beta: float = 0.5  # pixels (linear) or squared pixels (squared)
    raft_iters: int = 12

    def __post_init__(self) -> None:
        if self.step_size not in ("log_sigma", "sigma"):
            raise ValueError(f"step_size must be 'log_sigma' or 'sigma', got {self.step_size!r}")
        if self.occlusion not in OCCLUSION_FORMS:
            raise ValueError(f"occlusion must be one of {list(OCCLUSION_FORMS)}, got {self.occlusion!r}")
        if self.scale < 0:
            raise ValueError(f"scale must be >= 0, got {self.scale}")
        if self.raft_iters < 1:
            raise ValueError(f"raft_iters must be >= 1, got {self.raft_iters}")


def load_raft(cfg: FlowConfig, device: torch.device | str = "cpu") -> torch.nn.Module | None:
    """Build torchvision's RAFT-large and load local weights (never downloads).

    Args:
        cfg: flow settings; ``cfg.raft_weights`` is a ``.pth`` (torch pickle) or ``.safetensors`` file
            holding the state dict of ``torchvision.models.optical_flow.raft_large``.
        device: where the model goes.

    Returns:
        The model in eval mode without gradients, or None when ``cfg.enabled`` is False, or when the
        weights are missing and ``cfg.required`` is False (then one warning is issued).

    Raises:
        SdatcError: missing weights with ``cfg.required``, an unreadable file, or a state dict that
            does not match raft_large.
    """
    if not cfg.enabled:
        return None
    path = Path(cfg.raft_weights) if cfg.raft_weights else None
    if path is None or not path.is_file():
        where = f"not found: {path}" if path is not None else "flow.raft_weights is not set"
        if cfg.required:
            raise SdatcError(f"RAFT weights {where}; {RAFT_HELP}")
        warnings.warn(
            f"flow guidance off: no RAFT weights ({where}; set flow.raft_weights=.../{RAFT_WEIGHTS_NAME})",
            stacklevel=2,
        )
        return None
    state = read_state_dict(path, "RAFT weights")
    if not isinstance(state, dict):
        raise SdatcError(f"RAFT weights {path}: expected a state dict, got {type(state).__name__}")

    from torchvision.models.optical_flow import raft_large

    raft = raft_large(weights=None, progress=False)
    expected = raft.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [
            f"{name} ({len(keys)}): {', '.join(keys[:3])}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
            if keys
        ]
        raise SdatcError(f"RAFT weights {path} do not fit torchvision's raft_large: {'; '.join(parts)}")
    raft.load_state_dict(state, strict=True)
    raft.eval().requires_grad_(False)
    return raft.to(device)


@torch.no_grad()
def compute_flows(raft: torch.nn.Module, frames: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """RAFT flows between adjacent frames, both ways, in one batch.

    Frames are padded at the bottom/right (replicate) to a multiple of 8 and to at least
    ``RAFT_MIN_SIZE`` px per side (RAFT's correlation pyramid needs it), and the flows cropped back.

    Args:
        raft: torchvision RAFT model (eval mode).
        frames: (T, 3, h, w) frames in [0, 1].
        iters: RAFT refinement iterations; the last iteration's flow is returned.

    Returns:
        ``fwd`` (T-1, 2, h, w): flow from frame i to i+1; ``bwd`` (T-1, 2, h, w): from frame i+1 to i.
        Empty (0, 2, h, w) tensors when T = 1.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (T, 3, h, w), got {tuple(frames.shape)}")
    t, _, h, w = frames.shape
    if t < 2:
        empty = frames.new_zeros(0, 2, h, w, dtype=torch.float32)
        return empty, empty.clone()
    return pair_flows(raft, frames[:-1], frames[1:], iters)


@torch.no_grad()
def pair_flows(raft: torch.nn.Module, first: Tensor, second: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """RAFT flows of frame pairs, both ways, in one batch: ``first[k] -> second[k]`` and back.

    Args:
        first, second: (P, 3, h, w) frames in [0, 1] (P >= 1 pairs).
        iters: RAFT refinement iterations.

    Returns:
        ``fwd`` (P, 2, h, w) from first to second, ``bwd`` (P, 2, h, w) from second to first.
    """
    if first.shape != second.shape or first.ndim != 4 or first.shape[1] != 3 or first.shape[0] < 1:
        raise ValueError(f"frame pairs must be two (P, 3, h, w), got {tuple(first.shape)} and {tuple(second.shape)}")
    p, _, h, w = first.shape
    param = next(raft.parameters())
    hp = max(math.ceil(h / 8) * 8, RAFT_MIN_SIZE)
    wp = max(math.ceil(w / 8) * 8, RAFT_MIN_SIZE)
    a, b = (F.pad(x.to(device=param.device, dtype=param.dtype) * 2 - 1, (0, wp - w, 0, hp - h), mode="replicate")
            for x in (first, second))  # (P, 3, hp, wp) each, in [-1, 1]
    img1 = torch.cat([a, b])  # (2P, 3, hp, wp): pairs first->second, then second->first
    img2 = torch.cat([b, a])
    flow = raft(img1, img2, num_flow_updates=iters)[-1][:, :, :h, :w].float()  # (2P, 2, h, w)
    fwd, bwd = flow.split(p)
    return fwd.contiguous(), bwd.contiguous()


def resize_flow(flow: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a flow field and rescale its vectors to the new pixel grid.

    Args:
        flow: (N, 2, h, w) flow in pixels (x, y).
        size: target (H, W).

    Returns:
        (N, 2, H, W) flow; x scaled by W/w, y by H/h.
    """
    h, w = flow.shape[-2:]
    H, W = size
    if (h, w) == (H, W):
        return flow
    out = F.interpolate(flow, size=(H, W), mode="bilinear", align_corners=False)  # (N, 2, H, W)
    scale = torch.tensor([W / w, H / h], dtype=out.dtype, device=out.device).view(1, 2, 1, 1)
    return out * scale


def backward_warp(x: Tensor, flow: Tensor) -> Tensor:
    """``W(x, f)``: sample x at p + f(p) (bilinear, border padding, integer pixel centres).

    Args:
        x: (N, C, H, W) image or latent.
        flow: (N, 2, H, W) flow in pixels (x, y).

    Returns:
        (N, C, H, W) warped x.
    """
    n, _, h, w = x.shape
    if flow.shape != (n, 2, h, w):
        raise ValueError(f"flow {tuple(flow.shape)} does not fit x {tuple(x.shape)}")
    return F.grid_sample(x, flow_grid(flow, x.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def flow_grid(flow: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, 2, H, W) flow in pixels -> (N, H, W, 2) ``grid_sample`` grid of p + f(p) in [-1, 1] (corners aligned)."""
    _, _, h, w = flow.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=flow.device, dtype=dtype),
        torch.arange(w, device=flow.device, dtype=dtype),
        indexing="ij",
    )  # (H, W) each
    gx = (xs + flow[:, 0].to(dtype)) * (2 / max(w - 1, 1)) - 1  # (N, H, W) in [-1, 1]
    gy = (ys + flow[:, 1].to(dtype)) * (2 / max(h - 1, 1)) - 1
    return torch.stack([gx, gy], dim=-1)  # (N, H, W, 2)


def occlusion_mask(fwd: Tensor, bwd: Tensor, alpha: float, beta: float, form: str) -> Tensor:
    """Forward-backward consistency occlusion of ``fwd``.

    Occluded (|.| the Euclidean norm of a flow vector) where
    ``linear``: ``|f + W0(b, f)| > alpha (|f| + |b|) + beta``, ``W0`` bilinear with zero padding (MGLD-VSR's
    ``forward_backward_consistency_check``, scripts/util_flow.py:114-136 at 9aa7731; the architecture document);
    ``linear_offframe``: ``|f + W(b, f)| > alpha (|f| + |W(b, f)|) + beta`` or p + f(p) outside the frame;
    ``squared``: ``|f + W(b, f)|^2 > alpha (|f|^2 + |W(b, f)|^2) + beta`` (Sundaram et al. 2010) or outside.

    Args:
        fwd: (N, 2, H, W) flow from frame a to frame b.
        bwd: (N, 2, H, W) flow from frame b to frame a.
        alpha: relative tolerance.
        beta: absolute tolerance in pixels (linear) or squared pixels (squared).
        form: ``"linear"`` or ``"squared"``.

    Returns:
        (N, 1, H, W) float mask, 1 = occluded.
    """
    if form not in OCCLUSION_FORMS:
        raise ValueError(f"occlusion form must be one of {list(OCCLUSION_FORMS)}, got {form!r}")
    _, _, h, w = fwd.shape
    if form == "linear":  # MGLD-VSR: zero padding, the reverse flow's own magnitude, no off-frame test
        bwd_0 = F.grid_sample(bwd, flow_grid(fwd, bwd.dtype), mode="bilinear", padding_mode="zeros",
                              align_corners=True)  # (N, 2, H, W)
        diff = torch.linalg.vector_norm(fwd + bwd_0, dim=1, keepdim=True)  # (N, 1, H, W)
        mag = torch.linalg.vector_norm(fwd, dim=1, keepdim=True) + torch.linalg.vector_norm(bwd, dim=1, keepdim=True)
        return (diff > alpha * mag + beta).to(fwd.dtype)
    bwd_w = backward_warp(bwd, fwd)  # (N, 2, H, W): b at the target of f
    diff2 = (fwd + bwd_w).pow(2).sum(1, keepdim=True)  # (N, 1, H, W) squared norms
    f2, b2 = fwd.pow(2).sum(1, keepdim=True), bwd_w.pow(2).sum(1, keepdim=True)
    if form == "linear_offframe":
        occ = diff2.sqrt() > alpha * (f2.sqrt() + b2.sqrt()) + beta
    else:
        occ = diff2 > alpha * (f2 + b2) + beta
    xs = torch.arange(w, device=fwd.device, dtype=fwd.dtype).view(1, 1, 1, w) + fwd[:, :1]  # (N, 1, H, W)
    ys = torch.arange(h, device=fwd.device, dtype=fwd.dtype).view(1, 1, h, 1) + fwd[:, 1:]
    outside = (xs < 0) | (xs > w - 1) | (ys < 0) | (ys > h - 1)
    return (occ | outside).to(fwd.dtype)

"""Flow-guided latent warping (SDATC eq. 12-13, as in MGLD-VSR): pull adjacent frames' latents together.

    raft = load_raft(cfg.flow, device)                      # None when off or no weights (one warning)
    guide = FlowGuidance(raft, lr_frames, (H, W), cfg.flow)  # once per window: RAFT flows + occlusion masks
    for i, t in enumerate(sampler.timesteps):
        ...
        z = guide.step(z, sigma2)                           # z - eta_t * dL/dz

Flows, warping and the occlusion test are ``sdatc/models/flow.py`` (its docstring gives the conventions).
Loss: for each adjacent pair, the mean over all C*H*W elements of the masked L1 difference (occluded
elements count as 0), summed over the two directions and over pairs. ``eta_t`` refers to this loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sdatc.models.flow import FlowConfig, compute_flows, flow_grid, occlusion_mask, resize_flow


class FlowGuidance:
    """Per-window flow guidance: flows and occlusion masks on the latent grid, and the gradient step.

    Args:
        raft: RAFT model from :func:`load_raft`, or None (guidance off: ``step`` returns z unchanged).
        lr_frames: (T, 3, h, w) LR frames of the window in [0, 1].
        latent_size: latent grid (H, W).
        cfg: flow settings.
    """

    def __init__(
        self, raft: torch.nn.Module | None, lr_frames: Tensor, latent_size: tuple[int, int], cfg: FlowConfig
    ) -> None:
        fwd = bwd = None
        if raft is not None and cfg.enabled and lr_frames.shape[0] > 1:
            fwd, bwd = compute_flows(raft, lr_frames, cfg.raft_iters)  # (T-1, 2, h, w) each
        self._setup(fwd, bwd, latent_size, cfg)

    @classmethod
    def from_flows(
        cls, fwd: Tensor | None, bwd: Tensor | None, latent_size: tuple[int, int], cfg: FlowConfig
    ) -> FlowGuidance:
        """Build from precomputed flows (any resolution; resized to the latent grid).

        Args:
            fwd: (T-1, 2, h, w) flows i -> i+1 in pixels of their own grid, or None (guidance off).
            bwd: (T-1, 2, h, w) flows i+1 -> i.
            latent_size: latent grid (H, W).
            cfg: flow settings.
        """
        self = cls.__new__(cls)
        self._setup(fwd, bwd, latent_size, cfg)
        return self

    def _setup(self, fwd: Tensor | None, bwd: Tensor | None, latent_size: tuple[int, int], cfg: FlowConfig) -> None:
        self.cfg = cfg
        self.latent_size = (int(latent_size[0]), int(latent_size[1]))
        self.fwd = self.bwd = self.occ_fwd = self.occ_bwd = self.grid_fwd = self.grid_bwd = None
        if fwd is None or bwd is None or fwd.shape[0] == 0:
            return
        if fwd.shape != bwd.shape or fwd.ndim != 4 or fwd.shape[1] != 2:
            raise ValueError(f"fwd/bwd must both be (T-1, 2, h, w), got {tuple(fwd.shape)} and {tuple(bwd.shape)}")
        occ = (cfg.occlusion_alpha, cfg.occlusion_beta, cfg.occlusion)
        self.fwd = resize_flow(fwd.float(), self.latent_size)  # (T-1, 2, H, W)
        self.bwd = resize_flow(bwd.float(), self.latent_size)
        self.occ_fwd = occlusion_mask(self.fwd, self.bwd, *occ)  # (T-1, 1, H, W)
        self.occ_bwd = occlusion_mask(self.bwd, self.fwd, *occ)
        self.grid_fwd, self.grid_bwd = flow_grid(self.fwd), flow_grid(self.bwd)  # (T-1, H, W, 2): fixed for all steps

    @property
    def active(self) -> bool:
        """True when there are flows to guide with (RAFT available and T >= 2)."""
        return self.fwd is not None

    def eta(self, sigma2: float) -> float:
        """Step size: ``scale * |log sigma2|`` (``log_sigma``) or ``scale * sigma2`` (``sigma``)."""
        if self.cfg.step_size == "sigma":
            return self.cfg.scale * sigma2
        if sigma2 <= 0:
            raise ValueError(f"sigma2 must be > 0 for step_size='log_sigma', got {sigma2}")
        return self.cfg.scale * abs(math.log(sigma2))

    def loss(self, z: Tensor) -> Tensor:
        """Occlusion-masked warping loss of a window's latents (float32).

        Args:
            z: (T, C, H, W) latents of the window's frames in order.

        Returns:
            Scalar: sum over pairs and both directions of the mean masked L1 difference.
        """
        if not self.active:
            return z.new_zeros((), dtype=torch.float32)
        n = self.fwd.shape[0]
        if z.ndim != 4 or z.shape[0] != n + 1 or tuple(z.shape[-2:]) != self.latent_size:
            h, w = self.latent_size
            raise ValueError(f"z must be ({n + 1}, C, {h}, {w}), got {tuple(z.shape)}")
        z = z.float()
        grid_f, grid_b, occ_f, occ_b = (
            t.to(z.device).clone() if t.is_inference() else t.to(z.device)
            for t in (self.grid_fwd, self.grid_bwd, self.occ_fwd, self.occ_bwd)
        )  # grids (T-1, H, W, 2), masks (T-1, 1, H, W); clones make inference-mode tensors usable by autograd
        z0, z1 = z[:-1], z[1:]  # (T-1, C, H, W)
        warp = dict(mode="bilinear", padding_mode="border", align_corners=True)
        err_f = (1 - occ_f) * (z0 - F.grid_sample(z1, grid_f, **warp)).abs()  # frame i+1 aligned to i (W(z1, fwd))
        err_b = (1 - occ_b) * (z1 - F.grid_sample(z0, grid_b, **warp)).abs()  # frame i aligned to i+1
        return err_f.mean(dim=(1, 2, 3)).sum() + err_b.mean(dim=(1, 2, 3)).sum()

    def step(self, z: Tensor, sigma2: float) -> Tensor:
        """One guidance step ``z - eta_t * dL/dz`` (works inside no_grad / inference_mode).

        Args:
            z: (T, C, H, W) latents of the window.
            sigma2: the noise level sigma_t^2 of the current step.

        Returns:
            (T, C, H, W) new latents, detached, in z's dtype; z itself when inactive or T = 1.
        """
        if not self.active or z.shape[0] < 2:
            return z
        eta = self.eta(sigma2)
        if eta == 0:
            return z
        with torch.inference_mode(False), torch.enable_grad():
            zf = z.detach().float().clone().requires_grad_(True)  # (T, C, H, W) float32 leaf
            (grad,) = torch.autograd.grad(self.loss(zf), zf)
        return (zf.detach() - eta * grad).to(z.dtype)

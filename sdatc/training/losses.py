"""Training losses: LPIPS (offline weights), frame-difference L1, flow-warp consistency, hinge GAN.

    lp = build_lpips(pretrained_backbone=True)            # AlexNet v0.1; error if the file is missing
    loss = lp(y, gt)                                       # y, gt: (N, 3, H, W) in [0, 1]
    frame_difference_l1(y, gt, num_frames=5)
    flow_warp_l1(y, fwd, occ, num_frames=5)                # fwd: (B*(T-1), 2, H, W) flows t -> t+1
    d = PatchDiscriminator(); hinge_d_loss(d(real), d(fake)); hinge_g_loss(d(fake))
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from sdatc.errors import SdatcError
from sdatc.models.flow import backward_warp

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def alexnet_weights_path() -> Path:
    """Where torchvision looks for AlexNet's ImageNet weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


class LPIPSLoss(nn.Module):
    """LPIPS (AlexNet, v0.1) on [0, 1] images, frozen, always eval, fp32; mean over the batch."""

    def __init__(self, pretrained_backbone: bool = True):
        super().__init__()
        import lpips

        if pretrained_backbone and not alexnet_weights_path().is_file():
            raise SdatcError(
                f"LPIPS loss needs torchvision's AlexNet weights {ALEXNET_FILE} at {alexnet_weights_path()} "
                f"(https://download.pytorch.org/models/{ALEXNET_FILE}; set TORCH_HOME to the folder holding "
                "hub/checkpoints/), or set loss.lpips=0")
        if not pretrained_backbone:
            warnings.warn("LPIPS loss with a random AlexNet trunk: plumbing only, not a perceptual loss", stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation
            self.net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=not pretrained_backbone,
                                   verbose=False)
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # always eval (dropout off)
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        # x, y: (N, 3, H, W) in [0, 1] -> scalar; fp32 with autocast off (a frozen helper network)
        with torch.autocast(x.device.type, enabled=False):
            return self.net(x.float() * 2 - 1, y.float() * 2 - 1).mean()


def frame_difference_l1(y: Tensor, gt: Tensor, num_frames: int) -> Tensor:
    """L1 between consecutive-frame differences of output and GT; (B*T, C, H, W) inputs."""
    if num_frames < 2:
        return y.new_zeros(())
    y = rearrange(y, "(b t) c h w -> b t c h w", t=num_frames)
    gt = rearrange(gt, "(b t) c h w -> b t c h w", t=num_frames)
    return F.l1_loss(y[:, 1:] - y[:, :-1], gt[:, 1:] - gt[:, :-1])


def flow_warp_l1(y: Tensor, fwd: Tensor, occ: Tensor, num_frames: int) -> Tensor:
    """Masked L1 between frame t and frame t+1 warped back to t, ``|(1-O) (y_t - W(y_{t+1}, f_{t->t+1}))|``.

    Args:
        y: (B*T, C, H, W) output frames.
        fwd: (B*(T-1), 2, H, W) flows t -> t+1 (of the GT frames) in pixels.
        occ: (B*(T-1), 1, H, W) occlusion masks of ``fwd`` (1 = occluded).
    """
    if num_frames < 2:
        return y.new_zeros(())
    v = rearrange(y, "(b t) c h w -> b t c h w", t=num_frames)
    cur, nxt = v[:, :-1].flatten(0, 1), v[:, 1:].flatten(0, 1)  # (B*(T-1), C, H, W)
    err = (1 - occ) * (cur - backward_warp(nxt, fwd.to(y.dtype))).abs()
    return err.mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator``): (N, 3, H, W) in [0, 1] ->
    (N, 1, H', W') logits, one per overlapping 70x70 patch with 3 layers."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = width
        for i in range(1, n_layers + 1):
            c_out = width * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2 - 1)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()

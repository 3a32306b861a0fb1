"""Controllable Feature Wrapping (CFW, StableSR) with the MGLD-VSR residual-dense fusion.

Fuses an encoder feature ``F_e`` into a VAE-decoder feature ``F_d`` of the same shape::

    F_m = F_d + w * C(F_e, F_d)
    C   = ResBlock(2C -> C)([F_e ; F_d]) -> RDB x num_rdb -> ResBlock(C -> C) -> ZeroConv1x1

ResBlock is the VAE block (GroupNorm + SiLU + conv3x3, twice, 1x1 shortcut when widths differ;
diffusers' ``ResnetBlock2D``), RDB the ESRGAN residual dense block. The last 1x1 conv is
zero-initialised (weight and bias), so ``C(...) == 0`` and ``F_m == F_d`` exactly at init for
any ``w``; ``w`` in [0, 1] trades fidelity (1) for generative quality (0) at inference.

The zero 1x1 conv is ours (identity at init); StableSR's / MGLD-VSR's ``Fuse_sft_block_*`` end at the second
ResBlock. Their weights load with ``cfw_state_from_peer``, which maps their keys to ours and sets the conv to
the identity, so the block computes theirs (tests/models/test_cfw.py).

    cfw = CFW(512, CFWConfig())
    y = cfw(dec_feat, enc_feat, w=0.5)  # 2 x (N, 512, H, W) -> (N, 512, H, W)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass
class CFWConfig:
    """CFW hyper-parameters.

    Args:
        growth: channels added by each conv of a residual dense block.
        num_rdb: residual dense blocks between the two ResBlocks.
        groups: GroupNorm groups of the ResBlocks; ``min(groups, channels)`` is used and must
            divide the channels.
    """

    growth: int = 32
    num_rdb: int = 2
    groups: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.growth, int) or self.growth < 1:
            raise ValueError(f"CFWConfig.growth must be a positive int, got {self.growth!r}")
        if not isinstance(self.num_rdb, int) or self.num_rdb < 0:
            raise ValueError(f"CFWConfig.num_rdb must be an int >= 0, got {self.num_rdb!r}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"CFWConfig.groups must be a positive int, got {self.groups!r}")


class ResidualDenseBlock(nn.Module):
    """ESRGAN residual dense block: 5 densely connected 3x3 convs, output * 0.2 + input.

    Args:
        channels: input / output channels.
        growth: output channels of each of the first four convs.
    """

    def __init__(self, channels: int, growth: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels + i * growth, growth, 3, padding=1) for i in range(4)
        )
        self.conv_out = nn.Conv2d(channels + 4 * growth, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, C, H, W)
        feats = [x]
        for conv in self.convs:
            feats.append(F.leaky_relu(conv(torch.cat(feats, dim=1)), 0.2))  # (N, growth, H, W)
        out = self.conv_out(torch.cat(feats, dim=1))  # (N, C + 4 * growth, H, W) -> (N, C, H, W)
        return x + 0.2 * out


def _resblock(in_channels: int, out_channels: int, groups: int) -> nn.Module:
    from diffusers.models.resnet import ResnetBlock2D  # here: infer.py's DCM-only paths start without diffusers

    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=None,
        groups=groups,
        eps=1e-6,
    )


class CFW(nn.Module):
    """Controllable feature wrapping of a decoder feature by an encoder feature.

    Args:
        channels: channels C of both features.
        cfg: hyper-parameters.
        level: the VAE-encoder level whose feature it fuses when called at a Site (``ctx.enc_feats[level]``).
    """

    def __init__(self, channels: int, cfg: CFWConfig, level: int | None = None):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"CFW: channels must be a positive int, got {channels!r}")
        groups = min(cfg.groups, channels)
        if channels % groups:
            raise ValueError(
                f"CFW: GroupNorm groups {groups} do not divide channels {channels}; "
                "set CFWConfig.groups to a divisor"
            )
        self.channels, self.cfg, self.level = channels, cfg, level
        self.res_in = _resblock(2 * channels, channels, groups)
        self.rdbs = nn.Sequential(
            *(ResidualDenseBlock(channels, cfg.growth) for _ in range(cfg.num_rdb))
        )
        self.res_out = _resblock(channels, channels, groups)
        self.zero_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.zero_out.weight)
        nn.init.zeros_(self.zero_out.bias)

    def fuse(self, dec_feat: Tensor, enc_feat: Tensor) -> Tensor:
        """The fusion term ``C(F_e, F_d)`` (zero at init).

        Args:
            dec_feat: (N, C, H, W) decoder feature F_d.
            enc_feat: (N, C, H, W) encoder feature F_e.
        """
        x = torch.cat([enc_feat, dec_feat], dim=1)  # (N, 2C, H, W)
        x = self.res_in(x, None)  # (N, C, H, W)
        x = self.rdbs(x)  # (N, C, H, W)
        x = self.res_out(x, None)  # (N, C, H, W)
        return self.zero_out(x)  # (N, C, H, W)

    def forward(self, dec_feat: Tensor, enc_feat: Tensor | None = None, w: float = 1.0, ctx=None) -> Tensor:
        # dec_feat, enc_feat: (N, C, H, W) -> (N, C, H, W). At a Site: enc_feat, w from ctx (no features: pass)
        if ctx is not None:
            if ctx.enc_feats is None:
                return dec_feat
            enc_feat, w = ctx.enc_feats[self.level], ctx.cfw_weight  # w checked by PipelineConfig.cfw_weight
        return dec_feat + w * self.fuse(dec_feat, enc_feat)


def cfw_state_from_peer(peer: dict[str, Tensor], channels: int) -> dict[str, Tensor]:
    """A ``CFW`` state dict from a StableSR / MGLD-VSR fusion block's (``Fuse_sft_block_ResidualDenseBlock``:
    ``encode_enc_1`` ResBlock, ``encode_enc_2.{k}`` RDBs with ``conv1..conv5``, ``encode_enc_3`` ResBlock;
    keys relative to the block, e.g. ``decoder.fusion_layer_2.`` stripped). Our zero 1x1 conv becomes the
    identity, so ``CFW.fuse`` returns exactly the peer's ``encode_enc_3`` output."""
    out: dict[str, Tensor] = {}
    for key, value in peer.items():
        part, _, rest = key.partition(".")
        if part == "encode_enc_1":
            out["res_in." + rest.replace("conv_out.", "conv_shortcut.")] = value
        elif part == "encode_enc_3":
            out["res_out." + rest] = value
        elif part == "encode_enc_2":
            k, conv, tail = rest.split(".", 2)  # "0", "conv3", "weight"
            j = int(conv.removeprefix("conv"))
            out[f"rdbs.{k}." + (f"convs.{j - 1}." if j < 5 else "conv_out.") + tail] = value
        else:
            raise ValueError(f"not a key of a peer fusion block: {key!r}")
    ref = next(iter(peer.values()))
    out["zero_out.weight"] = torch.eye(channels, dtype=ref.dtype).view(channels, channels, 1, 1)
    out["zero_out.bias"] = torch.zeros(channels, dtype=ref.dtype)
    return out

"""Guidance encoder (StableSR / MGLD "time-aware encoder") and ControlNet-style zero convs.

A narrower copy of the UNet's encoder half runs on ``[z_t ; z_c]`` (noisy latent + condition
latent) with its own timestep embedding. Its feature at every skip position of the frozen UNet
(and its mid-block output) goes through a zero-initialised 1x1 conv to that skip's width; the
results are passed to ``UNet2DConditionModel.forward`` as ``down_block_additional_residuals`` /
``mid_block_additional_residual``. At init every residual is exactly zero, so the model is plain
SD 2.1.

    enc = GuidanceEncoder(GuidanceConfig(), unet.config)
    down, mid = enc(z_t, z_c, t)
    eps = unet(z_t, t, text_emb, down_block_additional_residuals=down,
               mid_block_additional_residual=mid).sample

The UNet's skip list (``down_block_res_samples``) is: the ``conv_in`` output, every resnet output
of every down block, and every downsampler output (all levels but the last). The encoder has the
same number of levels and layers per level, so its features line up one to one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from sdatc.errors import SdatcError

_NORM_EPS = 1e-5  # SD 2.1's norm_eps
_ACT = "silu"


class GuidanceConfigError(SdatcError, ValueError):
    """A guidance config that does not fit itself or the frozen UNet."""


@dataclasses.dataclass
class GuidanceConfig:
    """Guidance encoder shape.

    Args:
        in_channels: input channels, ``z_t`` and ``z_c`` concatenated (4 + 4).
        base_channels: width of level 0; level ``i`` has ``base_channels * channel_mult[i]``.
            The timestep embedding has ``4 * base_channels`` channels.
        channel_mult: width multiplier per level; its length must equal the UNet's level count.
        layers_per_block: resnets per level; must equal the UNet's ``layers_per_block``.
        attention_levels: self-attention after every resnet of that level (``AttnDownBlock2D``)
            or not (``DownBlock2D``). The mid block always has attention.
        num_heads: attention heads; head dim = channels // num_heads.
        norm_num_groups: GroupNorm groups in resnets and attention.
    """

    in_channels: int = 8
    base_channels: int = 256
    channel_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 1, 2, 2])
    layers_per_block: int = 2
    attention_levels: list[bool] = dataclasses.field(
        default_factory=lambda: [True, True, True, False]
    )
    num_heads: int = 4
    norm_num_groups: int = 32


def _get(cfg: Any, key: str) -> Any:
    """``cfg[key]`` for a mapping (dict, FrozenDict), else ``cfg.key`` (SimpleNamespace)."""
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)


def _unet_layers(unet_config: Any) -> list[int]:
    """The UNet's resnets per down level (``layers_per_block`` may be an int or a per-level list)."""
    n_levels = len(_get(unet_config, "block_out_channels"))
    layers = _get(unet_config, "layers_per_block")
    return [int(layers)] * n_levels if isinstance(layers, int) else [int(x) for x in layers]


def unet_skip_channels(unet_config: Any) -> tuple[list[int], int]:
    """Widths of a ``UNet2DConditionModel``'s ``down_block_res_samples`` and its mid-block output.

    Args:
        unet_config: the UNet's config (``unet.config``, a dict or any object with attributes)
            with ``block_out_channels`` and ``layers_per_block``.

    Returns:
        ``(skips, mid)``: ``skips`` in the UNet's order (conv_in output, then per level every
        resnet output and, on all but the last level, the downsampler output); ``mid`` is
        ``block_out_channels[-1]``. SD 2.1: 12 skips ``[320]*4 + [640]*3 + [1280]*5``, mid 1280.
    """
    widths = list(_get(unet_config, "block_out_channels"))
    layers = _unet_layers(unet_config)
    skips = [widths[0]]
    for i, (w, n) in enumerate(zip(widths, layers)):
        skips += [w] * (n + (i < len(widths) - 1))
    return skips, widths[-1]


class ZeroConvs(nn.Module):
    """Zero-initialised 1x1 convs from guidance features to UNet skip widths.

    Args:
        in_channels: guidance feature widths, one per UNet skip.
        out_channels: UNet skip widths, same length.
        mid_in: guidance mid-block width.
        mid_out: UNet mid-block width.
    """

    def __init__(
        self, in_channels: Sequence[int], out_channels: Sequence[int], mid_in: int, mid_out: int
    ):
        super().__init__()
        if len(in_channels) != len(out_channels):
            raise GuidanceConfigError(
                f"zero convs: {len(in_channels)} guidance features vs {len(out_channels)} UNet skips"
            )
        self.down = nn.ModuleList(
            _zero_conv(c_in, c_out) for c_in, c_out in zip(in_channels, out_channels)
        )
        self.mid = _zero_conv(mid_in, mid_out)

    def forward(self, feats: Sequence[Tensor], mid: Tensor) -> tuple[list[Tensor], Tensor]:
        # feats[k]: (N, C_k, h_k, w_k) -> (N, S_k, h_k, w_k); mid: (N, C_mid, h', w') -> (N, S_mid, h', w')
        return [conv(f) for conv, f in zip(self.down, feats)], self.mid(mid)


def _zero_conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class GuidanceEncoder(nn.Module):
    """Time-aware encoder on ``[z_t ; z_c]`` producing zero-conv residuals for the frozen UNet.

    Args:
        cfg: encoder shape.
        unet_config: the frozen UNet's config (``unet.config``, a dict or any object with
            attributes ``block_out_channels`` and ``layers_per_block``).

    Attributes:
        zero_convs: the :class:`ZeroConvs` (count its parameters separately from the encoder's).
        gradient_checkpointing: recompute each block in backward when training.
    """

    def __init__(self, cfg: GuidanceConfig, unet_config: Any):
        # diffusers here, not at the top: infer.py's DCM-only paths (the preview model) start without it
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block

        super().__init__()
        _validate(cfg, unet_config)
        self.cfg = cfg
        base = cfg.base_channels
        widths = [base * m for m in cfg.channel_mult]
        temb_dim = 4 * base

        self.time_proj = Timesteps(base, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(base, temb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, base, kernel_size=3, padding=1)

        feat_channels = [base]  # conv_in output, then what each block appends (as in the UNet)
        self.down_blocks = nn.ModuleList()
        c_in = base
        for i, (c_out, attn) in enumerate(zip(widths, cfg.attention_levels)):
            add_downsample = i < len(widths) - 1
            self.down_blocks.append(
                get_down_block(
                    "AttnDownBlock2D" if attn else "DownBlock2D",
                    num_layers=cfg.layers_per_block,
                    in_channels=c_in,
                    out_channels=c_out,
                    temb_channels=temb_dim,
                    add_downsample=add_downsample,
                    resnet_eps=_NORM_EPS,
                    resnet_act_fn=_ACT,
                    resnet_groups=cfg.norm_num_groups,
                    downsample_padding=1,
                    attention_head_dim=c_out // cfg.num_heads,
                )
            )
            feat_channels += [c_out] * (cfg.layers_per_block + add_downsample)
            c_in = c_out
        self.mid_block = UNetMidBlock2D(
            in_channels=widths[-1],
            temb_channels=temb_dim,
            resnet_eps=_NORM_EPS,
            resnet_act_fn=_ACT,
            resnet_groups=cfg.norm_num_groups,
            add_attention=True,
            attention_head_dim=widths[-1] // cfg.num_heads,
        )

        skips, mid = unet_skip_channels(unet_config)
        self.zero_convs = ZeroConvs(feat_channels, skips, widths[-1], mid)
        self.gradient_checkpointing = False

    def param_counts(self) -> dict[str, int]:
        """``{"guidance": encoder parameters without zero convs, "zero_convs": ...}``."""
        zero = sum(p.numel() for p in self.zero_convs.parameters())
        return {"guidance": sum(p.numel() for p in self.parameters()) - zero, "zero_convs": zero}

    def _run(self, block: nn.Module, *args: Tensor) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self, z_t: Tensor, z_c: Tensor, timestep: Tensor | float | int
    ) -> tuple[list[Tensor], Tensor]:
        """Residuals for the UNet.

        Args:
            z_t: noisy latent, (N, 4, h, w).
            z_c: condition latent, (N, 4, h, w).
            timestep: (N,) or a scalar (tensor or number), broadcast to the batch.

        Returns:
            ``(down, mid)``: ``down`` has one tensor per UNet skip with exactly the shape of the
            UNet's ``down_block_res_samples``; ``mid`` has the UNet mid-block output's shape.
        """
        n = z_t.shape[0]
        t = torch.as_tensor(timestep, device=z_t.device)
        t = t.reshape(-1).expand(n) if t.numel() == 1 else t  # (N,)
        temb = self.time_proj(t).to(z_t.dtype)  # (N, base), float32 from Timesteps
        temb = self.time_embedding(temb)  # (N, 4*base)

        h = self.conv_in(torch.cat([z_t, z_c], dim=1))  # (N, 8, h, w) -> (N, base, h, w)
        feats = [h]
        for block in self.down_blocks:
            # (N, C_in, H, W) -> (N, C_out, H/2, W/2) (ceil; no downsample on the last level)
            # diffusers' Attention returns a transposed view (channels_last strides): in the standard layout
            # here, or the 1x1 zero convs' weight gradients come back with other strides than the weights'
            h, res = self._run(block, h, temb)
            h = h.contiguous()
            feats += [f.contiguous() for f in res]  # layers_per_block resnet outputs (+ the downsampled h)
        h = self._run(self.mid_block, h, temb).contiguous()  # (N, C_last, h/2^(L-1), w/2^(L-1))
        return self.zero_convs(feats, h)


def _validate(cfg: GuidanceConfig, unet_config: Any) -> None:
    """Raise GuidanceConfigError unless ``cfg`` is consistent and lines up with the UNet's skips."""
    n_unet = len(_get(unet_config, "block_out_channels"))
    if len(cfg.channel_mult) != n_unet:
        raise GuidanceConfigError(
            f"guidance levels (len(channel_mult)={len(cfg.channel_mult)}) must equal the UNet's "
            f"(len(block_out_channels)={n_unet})"
        )
    if len(cfg.attention_levels) != len(cfg.channel_mult):
        raise GuidanceConfigError(
            f"attention_levels has {len(cfg.attention_levels)} entries, channel_mult "
            f"{len(cfg.channel_mult)}"
        )
    unet_layers = _unet_layers(unet_config)
    if any(n != cfg.layers_per_block for n in unet_layers):
        unet_value = _get(unet_config, "layers_per_block")
        raise GuidanceConfigError(
            f"guidance layers_per_block={cfg.layers_per_block} must equal the UNet's "
            f"layers_per_block={unet_value}"
        )
    for m in cfg.channel_mult:
        c = cfg.base_channels * m
        if c % cfg.num_heads or c % cfg.norm_num_groups:
            raise GuidanceConfigError(
                f"guidance width {c} must be divisible by num_heads={cfg.num_heads} and "
                f"norm_num_groups={cfg.norm_num_groups}"
            )

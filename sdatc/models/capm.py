"""Compression-Aware Prompt Module (CAPM): PromptIR-style prompts weighted by an auxiliary encoder.

For a feature map ``F`` of ``C`` channels::

    v  = Linear(AdaptiveAvgPool(CNN(F)))              # (N, L) prompt weights (optionally normalised)
    P  = Conv3x3(Resize_HxW(sum_k v_k * P_k))         # (N, C_p, H, W), P_k learnable (C_p, S, S)
    F' = F + ZeroConv1x1(TB(Conv1x1([F ; P])))        # TB: Restormer transformer block of width d

with ``d = min(C + C_p, max_width)``. The last 1x1 conv is zero-initialised (weight and bias), so
``CAPM(F) == F`` exactly at init and the wrapped pretrained network is unchanged.

The transformer block is the Restormer / PromptIR one: ``x + MDTA(LN(x))`` then
``x + GDFN(LN(x))`` (multi-Dconv-head transposed attention, gated-Dconv feed-forward). Its convs
have no bias, as in Restormer and PromptIR.

    capm = CAPM(1280, CAPMConfig())
    y = capm(x)  # (N, 1280, H, W) -> (N, 1280, H, W)

Three steps see the whole map, not one pixel's neighbourhood: the pooled prompt weights, the prompt
resized to ``H x W``, and MDTA's L2 norms and ``q k^T`` over the pixels (the tiled VAE computes them
over the whole frame in passes over its tiles: ``sdatc/pipelines/tiled_vae.py``, ``TiledCAPM``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

WeightNorm = Literal["none", "softmax", "sigmoid"]
_WEIGHT_NORMS = ("none", "softmax", "sigmoid")


@dataclasses.dataclass
class CAPMConfig:
    """CAPM hyper-parameters.

    Args:
        prompt_len: number of prompt components L.
        prompt_dim: channels C_p of each prompt component.
        prompt_size: spatial size S of each (S x S) prompt component before resizing.
        max_width: cap on the transformer block width d = min(C + C_p, max_width).
        cnn_width: hidden width of the two-conv CNN that predicts the prompt weights.
        num_heads: attention heads of the transformer block. When it does not divide d, the
            largest divisor of d that is <= num_heads is used (see :func:`fit_heads`).
        ffn_expansion: GDFN hidden width / d (hidden = int(d * ffn_expansion)).
        weight_norm: how the prompt weights v are normalised: "none" (raw linear output),
            "softmax" (over the L components, sums to 1) or "sigmoid" (each in (0, 1)).
    """

    prompt_len: int = 5
    prompt_dim: int = 32
    prompt_size: int = 32
    max_width: int = 512
    cnn_width: int = 144  # sized so the trainable total lands on the paper's 135.1 M (docs/architecture.md 4)
    num_heads: int = 8
    ffn_expansion: float = 2.66
    weight_norm: WeightNorm = "none"

    def __post_init__(self) -> None:
        for name in (
            "prompt_len",
            "prompt_dim",
            "prompt_size",
            "max_width",
            "cnn_width",
            "num_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CAPMConfig.{name} must be a positive int, got {value!r}")
        if self.ffn_expansion <= 0:
            raise ValueError(f"CAPMConfig.ffn_expansion must be > 0, got {self.ffn_expansion}")
        if self.weight_norm not in _WEIGHT_NORMS:
            raise ValueError(
                f"CAPMConfig.weight_norm must be one of {_WEIGHT_NORMS}, got {self.weight_norm!r}"
            )


def fit_heads(dim: int, num_heads: int) -> int:
    """The largest divisor of ``dim`` that is <= ``num_heads`` (``num_heads`` itself if it divides)."""
    if dim < 1 or num_heads < 1:
        raise ValueError(
            f"dim and num_heads must be positive, got dim={dim}, num_heads={num_heads}"
        )
    return next(h for h in range(min(num_heads, dim), 0, -1) if dim % h == 0)


class ChannelLayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels with weight and bias (Restormer ``WithBias_LayerNorm``).

    Args:
        dim: channels.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, C, H, W) -> (N, H, W, C) -> normalise over C -> (N, C, H, W), a channels_last view
        y = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if cl or not torch.is_grad_enabled():
            # inference keeps the view: a contiguous copy raised the tiny SDATC's untiled decode peak from
            # 280 to 372 MB (tests/pipelines/test_tiled_vae_memory.py, the planner's VAE_COEF; A43)
            return y
        # with grad, x's memory layout: a depthwise conv fed channels_last returns its (C, 1, 3, 3) weight's
        # gradient with other strides than the weight's, which DDP's gradient buckets warn about
        return y.contiguous()


class MDTA(nn.Module):
    """Multi-Dconv-head transposed attention: attention across channels, per head.

    Args:
        dim: channels d.
        num_heads: heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, d, H, W)
        h, w = x.shape[-2:]
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)  # 3 x (N, d, H, W)
        q, k, v = (rearrange(t, "n (g c) h w -> n g c (h w)", g=self.num_heads) for t in (q, k, v))
        q = F.normalize(q, dim=-1)  # (N, g, d/g, HW), L2 over the spatial axis
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # (N, g, d/g, d/g)
        out = attn.softmax(dim=-1) @ v  # (N, g, d/g, HW)
        out = rearrange(out, "n g c (h w) -> n (g c) h w", h=h, w=w)  # (N, d, H, W)
        return self.project_out(out)


class GDFN(nn.Module):
    """Gated-Dconv feed-forward network.

    Args:
        dim: channels d.
        expansion: hidden width / d.
    """

    def __init__(self, dim: int, expansion: float):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, d, H, W) -> 2 x (N, hidden, H, W) -> (N, d, H, W)
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    """Restormer / PromptIR block: ``x + MDTA(LN(x))``, then ``x + GDFN(LN(x))``.

    Args:
        dim: channels d.
        num_heads: attention heads (must divide ``dim``).
        ffn_expansion: GDFN hidden width / d.
    """

    def __init__(self, dim: int, num_heads: int, ffn_expansion: float):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = MDTA(dim, num_heads)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = GDFN(dim, ffn_expansion)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, d, H, W) -> (N, d, H, W)
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class CAPM(nn.Module):
    """Compression-aware prompt module around a feature map of ``channels`` channels.

    Args:
        channels: channels C of the feature map it refines.
        cfg: hyper-parameters.
    """

    def __init__(self, channels: int, cfg: CAPMConfig):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"CAPM: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.cfg = cfg
        h, n_prompts, c_p = cfg.cnn_width, cfg.prompt_len, cfg.prompt_dim
        # Auxiliary encoder predicting the prompt weights v.
        self.weight_cnn = nn.Sequential(
            nn.Conv2d(channels, h, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(h, h, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.weight_linear = nn.Linear(h, n_prompts)
        # Prompt components (PromptIR initialises them uniformly in [0, 1)).
        self.prompts = nn.Parameter(torch.rand(n_prompts, c_p, cfg.prompt_size, cfg.prompt_size))
        self.prompt_conv = nn.Conv2d(c_p, c_p, 3, padding=1)
        # Fusion: reduce [F ; P] to width d, transformer block, zero-initialised projection to C.
        self.width = min(channels + c_p, cfg.max_width)
        self.num_heads = fit_heads(self.width, cfg.num_heads)
        self.reduce = nn.Conv2d(channels + c_p, self.width, 1)
        self.block = TransformerBlock(self.width, self.num_heads, cfg.ffn_expansion)
        self.zero_out = nn.Conv2d(self.width, channels, 1)
        nn.init.zeros_(self.zero_out.weight)
        nn.init.zeros_(self.zero_out.bias)

    def prompt_weights(self, x: Tensor) -> Tensor:
        """The (normalised) prompt weights v for a feature map.

        Args:
            x: (N, C, H, W) feature map.

        Returns:
            (N, L) weights; rows sum to 1 with ``weight_norm="softmax"``.
        """
        pooled = self.weight_cnn(x)  # (N, h, 1, 1)
        v = self.weight_linear(pooled.flatten(1))  # (N, h) -> (N, L)
        if self.cfg.weight_norm == "softmax":
            return v.softmax(dim=-1)
        if self.cfg.weight_norm == "sigmoid":
            return v.sigmoid()
        return v

    def prompt(self, x: Tensor) -> Tensor:
        """The prompt P for a feature map, resized to its H x W.

        Args:
            x: (N, C, H, W) feature map.

        Returns:
            (N, C_p, H, W) prompt.
        """
        v = self.prompt_weights(x)  # (N, L)
        p = torch.einsum("nl,lchw->nchw", v, self.prompts.to(v.dtype))  # (N, C_p, S, S)
        p = F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.prompt_conv(p)  # (N, C_p, H, W)

    def forward(self, x: Tensor, ctx=None) -> Tensor:
        # x: (N, C, H, W); ctx (a Site's per-call inputs) is not used
        p = self.prompt(x)  # (N, C_p, H, W)
        fused = self.reduce(torch.cat([x, p], dim=1))  # (N, C + C_p, H, W) -> (N, d, H, W)
        fused = self.block(fused)  # (N, d, H, W)
        return x + self.zero_out(fused)  # (N, C, H, W)


def capm_params(channels: list[int], cfg: CAPMConfig) -> int:
    """Total parameter count of one CAPM per width in ``channels`` (built on the meta device).

    Args:
        channels: feature widths, one CAPM each.
        cfg: hyper-parameters shared by all of them.
    """
    with torch.device("meta"):
        return sum(p.numel() for c in channels for p in CAPM(c, cfg).parameters())

"""Spatio-Temporal Attention Module (STAM) for the VAE decoder.

Placed after a frozen ResnetBlock whose output ``F_s`` holds the frames of B clips stacked as
(B*T, C, H, W)::

    F_c = a * Conv3d_(k,1,1)(F_s) + (1 - a) * F_s    # temporal conv over (B, C, T, H, W)
    F_o = b * TAB(F_c) + (1 - b) * F_c               # TAB: LayerNorm + self-attention over T

``a`` and ``b`` are learnable scalars initialised to 0, so ``STAM(F_s) == F_s`` exactly at init;
the conv and attention keep their default init so that ``a`` and ``b`` get gradients at once.
The attention runs per pixel over the T frames (tokens (B*H*W, T, C)), in chunks of
``chunk_size`` pixels so that memory stays bounded on large decodes.

    stam = STAM(512, STAMConfig())
    y = stam(x, num_frames=5)  # (B*5, 512, H, W) -> (B*5, 512, H, W)
"""

from __future__ import annotations

import dataclasses

import torch
from einops import rearrange
from torch import Tensor, nn

from sdatc.models.capm import fit_heads


@dataclasses.dataclass
class STAMConfig:
    """STAM hyper-parameters.

    Args:
        kernel_t: temporal kernel size of the Conv3d (odd; padded with zeros to keep T).
        head_dim: attention head width; heads = max(1, C // head_dim), lowered to the largest
            divisor of C when that does not divide C.
        chunk_size: pixels (attention sequences of length T) processed at once.
    """

    kernel_t: int = 3
    head_dim: int = 64
    chunk_size: int = 65536

    def __post_init__(self) -> None:
        if not isinstance(self.kernel_t, int) or self.kernel_t < 1 or self.kernel_t % 2 == 0:
            raise ValueError(
                f"STAMConfig.kernel_t must be a positive odd int, got {self.kernel_t!r}"
            )
        if not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"STAMConfig.head_dim must be a positive int, got {self.head_dim!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(
                f"STAMConfig.chunk_size must be a positive int, got {self.chunk_size!r}"
            )


class TemporalAttention(nn.Module):
    """Pre-norm multi-head self-attention over the frame axis of (S, T, C) token sequences.

    Same parameters as ``nn.MultiheadAttention`` (fused qkv projection and output projection,
    with biases). The attention is written out with matmuls: T is a handful of frames, and this
    avoids fused-kernel limits on very large batches of short sequences.

    Args:
        dim: channels C.
        num_heads: heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # x: (S, T, C)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)  # 3 x (S, T, C)
        q, k, v = (rearrange(t, "s t (g c) -> s g t c", g=self.num_heads) for t in (q, k, v))
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (S, g, T, T)
        out = attn.softmax(dim=-1) @ v  # (S, g, T, C/g)
        return self.proj(rearrange(out, "s g t c -> s t (g c)"))  # (S, T, C)


class STAM(nn.Module):
    """Temporal conv + temporal attention, blended in by learnable scalars a, b (0 at init).

    Args:
        channels: channels C of the feature map.
        cfg: hyper-parameters.
    """

    def __init__(self, channels: int, cfg: STAMConfig):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"STAM: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.cfg = cfg
        k = cfg.kernel_t
        self.conv = nn.Conv3d(channels, channels, (k, 1, 1), padding=(k // 2, 0, 0))
        self.attn = TemporalAttention(
            channels, fit_heads(channels, max(1, channels // cfg.head_dim))
        )
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, num_frames: int | None = None, ctx=None) -> Tensor:
        # x: (B*T, C, H, W), T = num_frames (or ctx.num_frames at a Site; the model's decode checks it divides B*T)
        t = ctx.num_frames if num_frames is None else num_frames
        clip = rearrange(x, "(b t) c h w -> b c t h w", t=t)  # (B, C, T, H, W)
        conv = rearrange(self.conv(clip), "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
        f_c = self.a * conv + (1 - self.a) * x  # (B*T, C, H, W)
        f_o = self.b * self._attend(f_c, t) + (1 - self.b) * f_c  # (B*T, C, H, W)
        # Keep x's memory layout (the blend may inherit the Conv3d's): the next frozen conv then
        # runs exactly as in plain SD, so the identity at init holds bit for bit.
        return f_o if f_o.stride() == x.stride() else torch.empty_like(x).copy_(f_o)

    def _attend(self, x: Tensor, num_frames: int) -> Tensor:
        """Temporal attention per pixel, ``chunk_size`` pixels at a time."""
        # x: (B*T, C, H, W) -> tokens (B*H*W, T, C)
        h, w = x.shape[-2:]
        tokens = rearrange(x, "(b t) c h w -> (b h w) t c", t=num_frames)
        out = torch.cat([self.attn(chunk) for chunk in tokens.split(self.cfg.chunk_size)])
        return rearrange(out, "(b h w) t c -> (b t) c h w", h=h, w=w)  # (B*T, C, H, W)

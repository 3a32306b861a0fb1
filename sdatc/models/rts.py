"""RTS, UltraVSR's recurrent temporal shift: two residual units that let each frame see its neighbours.

For x (B*T, C, H, W), frames of a window adjacent on the batch axis (T = ``num_frames``)::

    RTS-conv:  y = x + W_out(SiLU(Conv3x3(shift(W_in x))))           W_in: C -> Cb, W_out: Cb -> C (zero init)
               shift: first third of Cb from frame t-1, last third from t+1, middle third ZERO; ends see zeros
    RTS-attn:  q, k, v = split(DWConv3x3(W_qkv x))                    W_qkv: C -> Ca (Ca/3 each)
               per head (8): A_s = softmax(T_h * norm(q_t) norm(k_{t+s})^T), s = -1, +1 (channel x channel)
               y = x + W_o(A_-1 v_{t-1} + A_+1 v_{t+1})               W_o: Ca/3 -> C (zero init)

with Cb = (C // 30) * 3 and Ca = (C // 96) * 24 (at least 3 and 24: tiny test models). The released
code also adds a "current frame" attention term whose keys and values are zeros, so it adds exactly
zero; it is left out. Zero-initialised outputs: an untrained unit is the identity. Frame t's output
depends on frames t-1, t, t+1 only (tests/models/test_rts.py).

    rts = RTS(320, RTSConfig())
    y = rts(x, num_frames=5)      # (B*5, 320, H, W) -> same
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclasses.dataclass
class RTSConfig:
    """RTS widths: conv branch Cb = (C // (3 conv_ratio)) * 3, attention Ca = (C // (3 heads attn_ratio)) * 3 heads."""

    conv_ratio: int = 10
    attn_ratio: int = 4
    num_heads: int = 8

    def __post_init__(self):
        for k in ("conv_ratio", "attn_ratio", "num_heads"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"RTSConfig.{k} must be a positive int, got {getattr(self, k)!r}")


def neighbour(x: Tensor, num_frames: int, offset: int) -> Tensor:
    """Frame t takes frame t + offset's values (offset -1 or +1) within its window; zeros past the ends."""
    clip = rearrange(x, "(b t) ... -> b t ...", t=num_frames)
    out = torch.zeros_like(clip)
    if offset == -1:
        out[:, 1:] = clip[:, :-1]
    else:
        out[:, :-1] = clip[:, 1:]
    return rearrange(out, "b t ... -> (b t) ...")


def _frames(ctx, num_frames: int | None) -> int:
    """Frames per clip on the batch axis: the argument, else the Site's ``ctx.num_frames`` (the model's decode
    checks that it divides the batch)."""
    return ctx.num_frames if num_frames is None else num_frames


class RTSConv(nn.Module):
    """The shift unit: channel thirds from t-1 and t+1 (middle third zero), 3x3 conv + SiLU, zero-init out."""

    def __init__(self, channels: int, cfg: RTSConfig):
        super().__init__()
        hidden = max(1, channels // (3 * cfg.conv_ratio)) * 3
        self.proj_in = nn.Conv2d(channels, hidden, 1, bias=False)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.proj_out = nn.Conv2d(hidden, channels, 1, bias=False)
        nn.init.zeros_(self.proj_out.weight)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        # x: (B*T, C, H, W)
        h = self.proj_in(x)  # (B*T, Cb, H, W)
        third = h.shape[1] // 3
        shifted = torch.cat([neighbour(h[:, :third], num_frames, -1), torch.zeros_like(h[:, third:-third]),
                             neighbour(h[:, -third:], num_frames, +1)], dim=1)  # (B*T, Cb, H, W)
        return x + self.proj_out(F.silu(self.conv(shifted)))


class RTSAttention(nn.Module):
    """Transposed (channel) attention of frame t's queries over frames t-1 and t+1's keys and values."""

    def __init__(self, channels: int, cfg: RTSConfig):
        super().__init__()
        h = cfg.num_heads
        width = max(1, channels // (3 * h * cfg.attn_ratio)) * 3 * h
        self.num_heads = h
        self.temperature = nn.Parameter(torch.ones(h, 1, 1))
        self.qkv = nn.Conv2d(channels, width, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.proj_out = nn.Conv2d(width // 3, channels, 1, bias=False)
        nn.init.zeros_(self.proj_out.weight)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        # x: (B*T, C, H, W)
        hh, ww = x.shape[-2:]
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)  # 3 x (B*T, Ca/3, H, W)
        q, k, v = (rearrange(a, "n (g c) h w -> n g c (h w)", g=self.num_heads) for a in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # L2 over the spatial axis
        out = 0
        for s in (-1, +1):
            k_s, v_s = neighbour(k, num_frames, s), neighbour(v, num_frames, s)  # zeros past the ends
            attn = (q @ k_s.transpose(-2, -1) * self.temperature).softmax(dim=-1)  # (B*T, g, c, c)
            out = out + attn @ v_s  # (B*T, g, c, HW)
        out = rearrange(out, "n g c (h w) -> n (g c) h w", h=hh, w=ww)  # (B*T, Ca/3, H, W)
        return x + self.proj_out(out)


class RTS(nn.Module):
    """One RTS module: the conv unit, then the attention unit. Called at a Site as ``rts(h, ctx=ctx)``."""

    def __init__(self, channels: int, cfg: RTSConfig):
        super().__init__()
        self.channels = channels
        self.conv = RTSConv(channels, cfg)
        self.attn = RTSAttention(channels, cfg)

    def forward(self, x: Tensor, num_frames: int | None = None, ctx=None) -> Tensor:
        # x: (B*T, C, H, W) -> (B*T, C, H, W)
        t = _frames(ctx, num_frames)
        return self.attn(self.conv(x, t), t)

"""Distortion Control Module (DCM): a SwinIR classical-SR network (pixelshuffle upsampler).

The layout and parameter names follow SwinIR (Liang et al., 2021) so that its released
classical x4 checkpoint (``001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth``) loads directly::

    dcm = DCM(DCMConfig())
    load_swinir_checkpoint(dcm, "weights/001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth")
    hr = dcm(lr)  # (B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w)

The Swin blocks are timm's ``SwinTransformerBlock`` with ``always_partition=True`` (the window
is never shrunk and the shift never dropped, as in SwinIR at inference) and
``dynamic_mask=True`` (the shifted-window mask is built for each input size).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from sdatc.errors import SdatcError
from sdatc.utils import read_state_dict

SWINIR_X4_NAME = "001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth"


@dataclasses.dataclass
class DCMConfig:
    """SwinIR classical-SR hyper-parameters (defaults: SwinIR-M x4, 11.9 M parameters).

    Args:
        in_channels: image channels (input and output).
        embed_dim: feature width C of the transformer body.
        depths: number of Swin blocks in each residual Swin transformer block (RSTB).
        num_heads: attention heads in each RSTB (divides ``embed_dim``).
        window_size: attention window; inputs are padded to a multiple of it.
        mlp_ratio: MLP hidden width / C.
        upscale: super-resolution factor: 3 or a power of 2 (2, 4, ...).
        num_feat: channels of the upsampler.
        img_range: pixel range the network works in (1.0 for SwinIR classical SR).
        rgb_mean: per-channel mean subtracted before the network (used when in_channels == 3).
    """

    in_channels: int = 3
    embed_dim: int = 180
    depths: list[int] = dataclasses.field(default_factory=lambda: [6] * 6)
    num_heads: list[int] = dataclasses.field(default_factory=lambda: [6] * 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    upscale: int = 4
    num_feat: int = 64
    img_range: float = 1.0
    rgb_mean: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(
                f"depths {self.depths} and num_heads {self.num_heads} must be non-empty lists "
                "of the same length (one entry per RSTB)"
            )
        for heads in self.num_heads:
            if heads < 1 or self.embed_dim % heads:
                raise ValueError(
                    f"embed_dim {self.embed_dim} is not divisible by num_heads {heads}"
                )
        if self.window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {self.window_size}")
        if not _is_supported_scale(self.upscale):
            raise ValueError(f"upscale must be 3 or a power of 2 (2, 4, ...), got {self.upscale}")
        if self.in_channels == 3 and len(self.rgb_mean) != 3:
            raise ValueError(f"rgb_mean needs 3 values, got {self.rgb_mean}")


def _is_supported_scale(scale: int) -> bool:
    return scale == 3 or (scale >= 2 and scale & (scale - 1) == 0)


def _upsampler(scale: int, num_feat: int) -> nn.Sequential:
    """SwinIR ``Upsample``: [conv, PixelShuffle(2)] x log2(scale), or [conv, PixelShuffle(3)]."""
    layers: list[nn.Module] = []
    if scale == 3:
        layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
    else:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


def _upsampler_chain(x: torch.Tensor, convs: list[tuple[torch.Tensor, torch.Tensor | None, int]],
                     last: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """The upsampler and conv_last as SwinIR runs them: [conv 3x3, PixelShuffle(r)]..., conv 3x3."""
    for weight, bias, r in convs:
        x = F.pixel_shuffle(F.conv2d(x, weight, bias, padding=1), r)
    return F.conv2d(x, *last, padding=1)


@dataclasses.dataclass(frozen=True)
class _FoldedTail:
    """The linear part of the upsampler, [conv 3x3, PixelShuffle]... then conv_last, as one convolution
    on the LR grid followed by a sub-pixel rearrangement (A45).

    Nothing non-linear lies between ``upsample`` and ``conv_last`` (SwinIR's LeakyReLU is in
    ``conv_before_upsample``), and every conv and shuffle commutes with LR-pixel shifts, so the
    chain is a convolution from the (C, H, W) features to (s*s*out, H, W) sub-pixel channels, ordered
    (i, j, o), with a kernel of radius ``radius`` LR pixels (2 at x4). It equals the chain everywhere
    except within ``radius`` LR pixels of the border, where the chain's zero padding of its
    intermediate (2x, 4x) maps differs from padding the features; those strips are recomputed with
    the chain. At x4 the fold does 4.4 of the chain's 22.8 GFLOP per 720p frame (num_feat 32).
    """

    weight: torch.Tensor  # (s*s*out, C, 2r+1, 2r+1), /img_range folded in
    bias: torch.Tensor  # (s*s*out,): the chain's response to zero features, /img_range
    radius: int
    key: tuple


def _fold_tail(convs, last, scale: int, img_range: float, key: tuple) -> _FoldedTail:
    """Fold the chain into :class:`_FoldedTail` (computed in float64 from impulse responses)."""
    c = convs[0][0].shape[1]
    out_c = last[0].shape[0]
    convs64 = [(w.double(), None, r) for w, _, r in convs]
    last64 = (last[0].double(), None)
    big = 2 * len(convs) + 3  # canvas half-size in LR pixels, more than the kernel radius
    n = 2 * big + 1
    impulse = torch.zeros(c, c, n, n, dtype=torch.float64, device=last[0].device)
    impulse[torch.arange(c), torch.arange(c), big, big] = 1.0
    resp = _upsampler_chain(impulse, convs64, last64)  # (C, out, s*n, s*n): response to each channel
    resp = resp.view(c, out_c, n, scale, n, scale).permute(3, 5, 1, 0, 2, 4)  # (i, j, out, C, y, x)
    weight = resp.flip(-2, -1).reshape(scale * scale * out_c, c, n, n)  # cross-correlation: offset = big - y
    # An HR pixel reaches 1 + 1/2 + ... + 1/s LR pixels (3x3 convs at 1x, 2x, ..., s x) beyond its sub-pixel
    # offset (< 1): under 3 LR pixels for every scale, so radius 2 (tests check the kernel against the chain).
    radius = 2
    weight = weight[:, :, big - radius:big + radius + 1, big - radius:big + radius + 1]
    zeros = torch.zeros(1, c, n, n, dtype=torch.float64, device=last[0].device)
    full = [(w.double(), None if b is None else b.double(), r) for w, b, r in convs]
    bias = _upsampler_chain(zeros, full, (last[0].double(), None if last[1] is None else last[1].double()))
    bias = bias[0, :, big * scale:(big + 1) * scale, big * scale:(big + 1) * scale]  # (out, s, s), interior
    bias = bias.permute(1, 2, 0).reshape(-1) / img_range
    return _FoldedTail(weight / img_range, bias, radius, key)


def _register_cpu_sdpa_flops() -> None:
    """Count the CPU flash-attention kernel in ``torch.utils.flop_counter`` as its CUDA siblings are."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_counter.flop_registry:  # sdpa_flop is registered already shape-wrapped
        flop_counter.register_flop_formula(op, get_raw=True)(flop_counter.sdpa_flop)


_register_cpu_sdpa_flops()


class PatchEmbed(nn.Module):
    """SwinIR ``PatchEmbed`` with patch size 1: (B, C, H, W) map -> LayerNorm-ed tokens.

    Tokens are kept as a (B, H, W, C) grid, the layout timm's Swin blocks take.

    Args:
        dim: channels C.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, H, W, C)
        return self.norm(x.permute(0, 2, 3, 1))


class BasicLayer(nn.Module):
    """A stack of Swin blocks with alternating shift 0 / window_size // 2 (SwinIR ``BasicLayer``).

    Args:
        dim: channels C.
        depth: number of blocks.
        num_heads: attention heads.
        window_size: attention window (never shrunk).
        mlp_ratio: MLP hidden width / C.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution=(8 * window_size, 8 * window_size),  # unused: see flags below
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                always_partition=True,  # keep window/shift whatever input_resolution says
                dynamic_mask=True,  # build the shift mask for the actual (H, W)
                mlp_ratio=mlp_ratio,
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C), H and W multiples of window_size
        if not torch.is_grad_enabled():  # inference: the same function, fewer copies, fused attention
            return _blocks_inference(self.blocks, x)
        for block in self.blocks:
            x = block(x)
        return x  # (B, H, W, C)


@dataclasses.dataclass(frozen=True)
class _WindowLayout:
    """The tokens of B (H, W) grids ordered window by window for one (window, shift).

    ``order[k]`` is the index in the (B*H*W) row-major tokens of the k-th token: each grid is
    cyclically shifted by ``-shift`` (timm's ``torch.roll``) and cut into windows; the windows whose
    shifted-window mask is not all zero (the last window row and column, where the roll wraps) come
    after all the others, frame by frame: the last ``n_masked`` windows, the j-th of them with the
    mask ``mask[j % len(mask)]`` (timm's 0 / -100 values).
    """

    order: torch.Tensor  # (B*H*W,) long
    inverse: torch.Tensor  # (B*H*W,) long: order[inverse[i]] == i
    mask: torch.Tensor | None  # (masked windows per frame, N, N) float32; None without shift
    n_masked: int  # windows with a mask, all frames


_LAYOUTS: dict[tuple, _WindowLayout] = {}
CHUNK_WINDOWS = 32  # windows per chunk of a block's forward without grad, on the CPU (32 x 64 tokens)


def _window_layout(b: int, h: int, w: int, ws: int, shift: tuple[int, int], device: torch.device) -> _WindowLayout:
    key = (b, h, w, ws, shift, str(device))
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    sh, sw = shift
    nh, nw = h // ws, w // ws
    r, c = torch.arange(h), torch.arange(w)
    src = ((r[:, None] + sh) % h) * w + (c[None, :] + sw) % w  # (h, w): grid index of each shifted pixel
    win = src.view(nh, ws, nw, ws).transpose(1, 2).reshape(nh, nw, ws * ws)  # (nh, nw, N)
    frames = torch.arange(b)[:, None, None] * (h * w)  # (B, 1, 1)
    if sh or sw:
        def labels(n: int, s: int) -> torch.Tensor:  # timm's regions (0, -ws), (-ws, -s), (-s, None)
            lab = torch.zeros(n, dtype=torch.long)
            lab[n - ws:] = 1
            if s:
                lab[n - s:] = 2
            return lab

        lab = (labels(h, sh)[:, None] * 3 + labels(w, sw)[None, :]).view(nh, ws, nw, ws).transpose(1, 2)
        last = torch.zeros(nh, nw, dtype=torch.bool)
        last[-1, :] = True
        last[:, -1] = True
        lab = lab[last].flatten(1)  # (masked windows per frame, N)
        mask = ((lab[:, :, None] != lab[:, None, :]).float() * -100.0).to(device)  # (n, N, N)
        order = torch.cat([(win[~last] + frames).reshape(-1), (win[last] + frames).reshape(-1)])
        n_masked = b * len(lab)
    else:
        order, mask, n_masked = (win + frames[:, None]).reshape(-1), None, 0
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    if len(_LAYOUTS) >= 64:
        _LAYOUTS.clear()
    _LAYOUTS[key] = _WindowLayout(order.to(device), inverse.to(device), mask, n_masked)
    return _LAYOUTS[key]


def _block_inference(block: SwinTransformerBlock, t: torch.Tensor, layout: _WindowLayout) -> torch.Tensor:
    """timm's ``SwinTransformerBlock.forward`` (eval) on tokens already in ``layout`` order, without grad.

    t: (B*H*W, C) tokens, window by window; it is updated in place, ``CHUNK_WINDOWS`` windows at a
    time so that the activations of a chunk stay in cache, and returned.
    """
    attn, mlp = block.attn, block.mlp
    n, heads = attn.window_area, attn.num_heads
    n_win = t.shape[0] // n
    n_plain = n_win - layout.n_masked
    bias = attn._get_rel_pos_bias().to(t.dtype)  # (1, heads, N, N)
    masks = None if layout.mask is None else bias + layout.mask.to(t.dtype)[:, None]  # (n, heads, N, N)
    chunk = CHUNK_WINDOWS if t.device.type == "cpu" else n_win  # a GPU takes all windows at once
    bounds = [*range(0, n_plain, chunk), *range(n_plain, n_win, chunk), n_win]
    for w0, w1 in zip(bounds[:-1], bounds[1:]):
        w1 = min(w1, n_plain) if w0 < n_plain else w1
        x = t[w0 * n:w1 * n]  # (nw*N, C), a view: updated in place
        nw = w1 - w0
        qkv = attn.qkv(block.norm1(x)).view(nw, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (nw, heads, N, head_dim) each
        if w0 < n_plain:
            m = bias
        else:
            idx = torch.arange(w0 - n_plain, w1 - n_plain, device=t.device) % masks.shape[0]
            m = masks.index_select(0, idx)  # (nw, heads, N, N)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=attn.scale)  # (nw, heads, N, hd)
        x += attn.proj(o.transpose(1, 2).reshape(nw * n, -1))
        x += mlp(block.norm2(x))
    return t


def _blocks_inference(blocks: nn.ModuleList, x: torch.Tensor, buffers: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The blocks of a :class:`BasicLayer`, without grad: (B, H, W, C) -> (B, H, W, C).

    The same function as timm's blocks in sequence (up to float rounding) with fewer memory passes:
    the tokens stay window by window between blocks (one gather per block instead of a roll, a
    partition, a reverse and a roll back), each block runs on chunks of windows that stay in cache,
    attention is ``scaled_dot_product_attention`` with the relative position bias as its mask, and
    the shifted-window mask is added only where it is not all zero. ``buffers``: two (B*H*W, C)
    tensors the gathers write to in turn (the result is a view of one of them); new ones if None.
    """
    b, h, w, c = x.shape
    if not len(blocks):
        return x
    if buffers is None:
        buffers = [torch.empty(b * h * w, c, device=x.device, dtype=x.dtype) for _ in range(2)]
    t, prev = x.reshape(b * h * w, c), None
    for i, block in enumerate(blocks):
        ws = block.window_size
        if ws[0] != ws[1] or h % ws[0] or w % ws[0]:
            raise ValueError(f"{h}x{w} tokens do not tile into {ws} windows")
        layout = _window_layout(b, h, w, ws[0], tuple(block.shift_size), x.device)
        index = layout.order if prev is None else prev.inverse[layout.order]
        t = _block_inference(block, torch.index_select(t, 0, index, out=buffers[i % 2]), layout)
        prev = layout
    return torch.index_select(t, 0, prev.inverse, out=buffers[len(blocks) % 2]).view(b, h, w, c)


class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin blocks, a 3x3 conv, and a residual add.

    Args:
        dim: channels C.
        depth: Swin blocks in the group.
        num_heads: attention heads.
        window_size: attention window.
        mlp_ratio: MLP hidden width / C.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float):
        super().__init__()
        self.residual_group = BasicLayer(dim, depth, num_heads, window_size, mlp_ratio)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C)
        y = self.residual_group(x).permute(0, 3, 1, 2)  # (B, C, H, W)
        y = self.conv(y).permute(0, 2, 3, 1)  # (B, H, W, C)
        return x + y


class DCM(nn.Module):
    """SwinIR classical SR (``upsampler='pixelshuffle'``) used as the distortion control module.

    Args:
        cfg: network hyper-parameters.
    """

    def __init__(self, cfg: DCMConfig | None = None):
        super().__init__()
        cfg = cfg or DCMConfig()
        self.cfg = cfg
        c, nf = cfg.embed_dim, cfg.num_feat
        mean = cfg.rgb_mean if cfg.in_channels == 3 else (0.0,) * cfg.in_channels
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

        self.conv_first = nn.Conv2d(cfg.in_channels, c, 3, 1, 1)
        self.patch_embed = PatchEmbed(c)
        self.layers = nn.ModuleList(
            RSTB(c, depth, heads, cfg.window_size, cfg.mlp_ratio)
            for depth, heads in zip(cfg.depths, cfg.num_heads)
        )
        self.norm = nn.LayerNorm(c)
        self.conv_after_body = nn.Conv2d(c, c, 3, 1, 1)
        self.conv_before_upsample = nn.Sequential(
            nn.Conv2d(c, nf, 3, 1, 1), nn.LeakyReLU(inplace=True)
        )
        self.upsample = _upsampler(cfg.upscale, nf)
        self.conv_last = nn.Conv2d(nf, cfg.in_channels, 3, 1, 1)
        self.apply(_init_weights)
        self.gradient_checkpointing = False  # recompute each RSTB in backward when training

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad bottom/right to a multiple of window_size (reflect; replicate if too small)."""
        h, w = x.shape[-2:]
        ws = self.cfg.window_size
        ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
        if ph == 0 and pw == 0:
            return x
        mode = "reflect" if ph < h and pw < w else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer body. x: (B, C, H, W) -> (B, C, H, W)."""
        t = self.patch_embed(x)  # (B, H, W, C)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                t = torch.utils.checkpoint.checkpoint(layer, t, use_reentrant=False)  # (B, H, W, C)
            else:
                t = layer(t)  # (B, H, W, C)
        return self.norm(t).permute(0, 3, 1, 2)  # (B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-resolve. x: (B, in_channels, h, w) in [0, 1] -> (B, in_channels, s*h, s*w)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"DCM expects (B, {self.cfg.in_channels}, h, w) input, got {tuple(x.shape)}"
            )
        if not torch.is_grad_enabled():
            return self._forward_inference(x)
        h, w = x.shape[-2:]
        s = self.cfg.upscale
        x = self._pad(x)  # (B, 3, H, W), H, W multiples of window_size
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.cfg.img_range

        feat = self.conv_first(x)  # (B, C, H, W)
        feat = self.conv_after_body(self.forward_features(feat)) + feat  # (B, C, H, W)
        feat = self.conv_before_upsample(feat)  # (B, num_feat, H, W)
        out = self.conv_last(self.upsample(feat))  # (B, 3, s*H, s*W)

        out = out / self.cfg.img_range + mean
        return out[:, :, : s * h, : s * w]  # (B, 3, s*h, s*w)

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` without grad: the same function (up to float rounding) in fewer memory passes and FLOPs.

        Feature maps are channels-last throughout, so the (B, H, W, C) token views of the body and
        the (B, C, H, W) maps of the convolutions are the same memory (no permute copies); the Swin
        blocks run window by window (:func:`_blocks_inference`); the upsampler runs as one convolution on
        the LR grid (:meth:`_tail_inference`, :class:`_FoldedTail`). The result is channels-last (B, in_channels, s*h, s*w).
        """
        h, w = x.shape[-2:]
        s = self.cfg.upscale
        x = self._pad(x)  # (B, 3, H, W), H, W multiples of window_size
        mean = self.mean.to(x.dtype)
        x = ((x - mean) * self.cfg.img_range).contiguous(memory_format=torch.channels_last)

        feat = self.conv_first(x)  # (B, C, H, W) channels-last
        t = self.patch_embed.norm(feat.permute(0, 2, 3, 1))  # (B, H, W, C)
        buffers = [torch.empty(t.numel() // t.shape[-1], t.shape[-1], device=t.device, dtype=t.dtype) for _ in range(2)]
        for layer in self.layers:  # RSTB: t + conv(blocks(t))
            y = _blocks_inference(layer.residual_group.blocks, t, buffers)  # (B, H, W, C)
            t += layer.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        feat = self.conv_after_body(self.norm(t).permute(0, 3, 1, 2)).add_(feat)  # (B, C, H, W)
        return self._tail_inference(feat, mean)[:, :, : s * h, : s * w]  # (B, 3, s*h, s*w)

    def _folded_tail(self) -> _FoldedTail:
        """The upsampler folded into one convolution (:class:`_FoldedTail`), kept until a weight changes."""
        convs = [(conv.weight, conv.bias, shuffle.upscale_factor)
                 for conv, shuffle in zip(list(self.upsample)[0::2], list(self.upsample)[1::2])]
        last = (self.conv_last.weight, self.conv_last.bias)
        params = [t for w, b, _ in convs for t in (w, b)] + list(last)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in params if t is not None)
        fold = self.__dict__.get("_fold")
        if fold is None or fold.key != key:
            fold = _fold_tail(convs, last, self.cfg.upscale, self.cfg.img_range, key)
            self.__dict__["_fold"] = fold  # a plain attribute: not a buffer, not in the state dict
        return fold

    def _tail_inference(self, feat: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """conv_before_upsample, upsample, conv_last, + mean: (B, C, H, W) -> channels-last (B, 3, sH, sW).

        The upsampler and conv_last run as one convolution on the LR grid (:class:`_FoldedTail`), whose
        sub-pixel channels are rearranged into the output; the ``radius``-pixel border strips are
        recomputed with the upsampler as it is (its zero padding at 2x and 4x).
        """
        z = self.conv_before_upsample(feat)  # (B, nf, H, W)
        fold = self._folded_tail()
        b, _, h, w = z.shape
        s, oc, r = self.cfg.upscale, self.cfg.in_channels, fold.radius
        y = F.conv2d(z, fold.weight.to(z.dtype), fold.bias.to(z.dtype), padding=r)  # (B, s*s*oc, H, W)
        dtype = torch.promote_types(y.dtype, mean.dtype)  # (the reference adds the mean in x's dtype)
        out = torch.empty(b, h, s, w, s, oc, device=z.device, dtype=dtype)  # (B, H, i, W, j, oc)
        out.copy_(y.permute(0, 2, 3, 1).reshape(b, h, w, s, s, oc).transpose(2, 3))
        out = out.view(b, s * h, s * w, oc)  # (B, sH, sW, oc)
        m = mean.to(dtype).view(oc)
        out.add_(m)

        def exact(zc: torch.Tensor) -> torch.Tensor:  # the upsampler as it is: (B, nf, a, c) -> (B, sa, sc, oc)
            return (self.conv_last(self.upsample(zc)) / self.cfg.img_range).permute(0, 2, 3, 1) + m

        if min(h, w) <= 2 * r:
            return exact(z).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        sr = s * r
        out[:, :sr] = exact(z[:, :, :2 * r])[:, :sr]  # top strip
        out[:, -sr:] = exact(z[:, :, -2 * r:])[:, -sr:]  # bottom
        out[:, sr:-sr, :sr] = exact(z[:, :, :, :2 * r])[:, sr:-sr, :sr]  # left (rows between)
        out[:, sr:-sr, -sr:] = exact(z[:, :, :, -2 * r:])[:, sr:-sr, -sr:]  # right
        return out.permute(0, 3, 1, 2)  # (B, oc, sH, sW) channels-last


def _init_weights(m: nn.Module) -> None:
    """SwinIR's init: truncated-normal Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- checkpoints

# Buffers SwinIR saves that timm recomputes (relative position index, shifted-window mask).
_DROPPED_SUFFIXES = (".attn.relative_position_index", ".attn_mask")


def _checkpoint_kind(state: dict[str, torch.Tensor]) -> tuple[str, int | None]:
    """Guess (upsampler, scale) of a SwinIR state dict from its upsampler weights."""
    if "conv_up1.weight" in state:
        return "real-world SwinIR (nearest+conv upsampler)", None
    if "conv_before_upsample.0.weight" not in state:
        if "upsample.0.weight" in state:
            return "lightweight SwinIR (pixelshuffledirect upsampler)", None
        return "SwinIR without an upsampler (denoising / JPEG artifact removal)", 1
    convs = [state[k] for i in range(0, 16, 2) if (k := f"upsample.{i}.weight") in state]
    if not convs:
        return "SwinIR", None
    if len(convs) == 1 and convs[0].shape[0] == 9 * convs[0].shape[1]:
        return "SwinIR", 3
    return "SwinIR", 2 ** len(convs)


def _unwrap(state: dict) -> dict[str, torch.Tensor]:
    """params_ema > params > bare state dict; strip a DataParallel ``module.`` prefix."""
    if not isinstance(state, dict):
        raise SdatcError(f"a SwinIR checkpoint must be a dict, got {type(state).__name__}")
    for key in ("params_ema", "params"):
        if key in state:
            state = state[key]
            break
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SdatcError(f"not a SwinIR state dict: entries {bad[:5]} are not tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_swinir_state_dict(dcm: DCM, state: dict, verbose: bool = True) -> None:
    """Load SwinIR weights into ``dcm`` strictly.

    Args:
        dcm: the module to fill.
        state: a SwinIR checkpoint dict (``params_ema`` preferred over ``params``) or a bare
            state dict. SwinIR's saved ``relative_position_index`` / ``attn_mask`` buffers are
            ignored (timm recomputes them).
        verbose: print the first missing / unexpected keys before raising.

    Raises:
        SdatcError: wrong scale or SwinIR variant, missing / unexpected keys, shape mismatch.
    """
    state = _unwrap(state)
    state = {k: v for k, v in state.items() if not k.endswith(_DROPPED_SUFFIXES)}

    kind, scale = _checkpoint_kind(state)
    want = dcm.cfg.upscale
    if kind != "SwinIR":
        raise SdatcError(f"checkpoint is a {kind}, the DCM is a classical x{want} SwinIR")
    if scale is not None and scale != want:
        raise SdatcError(f"checkpoint is a x{scale} SwinIR, the DCM is x{want}")

    expected = dcm.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if verbose and (missing or unexpected):
        print(
            f"SwinIR checkpoint: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    if missing or unexpected:
        raise SdatcError(
            f"SwinIR checkpoint does not match the DCM ({dcm.cfg.embed_dim} channels, "
            f"depths {dcm.cfg.depths}): missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs DCM {tuple(expected[k].shape)}"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise SdatcError(f"SwinIR checkpoint has {len(wrong)} shape mismatches: {wrong[:3]}")
    dcm.load_state_dict(state, strict=True)


def load_swinir_checkpoint(dcm: DCM, path: str | Path) -> None:
    """Load a SwinIR checkpoint file (``.safetensors`` or a torch pickle) into ``dcm``.

    Args:
        dcm: the module to fill.
        path: checkpoint file, e.g. ``001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth``.

    Raises:
        SdatcError: missing or unreadable file, or weights that do not fit (see
            :func:`load_swinir_state_dict`).
    """
    path = Path(path)
    if not path.is_file():
        raise SdatcError(
            f"DCM checkpoint not found: {path} (expected a SwinIR classical "
            f"x{dcm.cfg.upscale} checkpoint, e.g. {SWINIR_X4_NAME})"
        )
    load_swinir_state_dict(dcm, read_state_dict(path, "DCM checkpoint"))


# --------------------------------------------------------------------------- interpolation start

# Keys cubic (a = -0.5) weights of a 2x upsampler for output phase 0 (input coordinate y - 1/4) on the
# taps y-1, y, y+1; the far tap at y+2 (-0.0234) is dropped and the rest renormalised. Phase 1 mirrors it.
_HALF = torch.tensor([0.2266, 0.8672, -0.0703], dtype=torch.float64)
_HALF = _HALF / _HALF.sum()


@torch.no_grad()
def init_as_interpolation(dcm: DCM) -> DCM:
    """Set a x2 / x4 DCM to start as plain cubic interpolation, so training refines an upscaler
    instead of first learning to upscale at all (a cheap CPU-trained preview model needs this).

    The image passes through unchanged: RGB identity in the first 3 channels of ``conv_first``; the
    transformer body's contribution starts at zero (``conv_after_body`` zero-initialised, so its
    weights still get gradients, as a ControlNet zero conv); ``conv_before_upsample`` carries
    +x and -x (6 channels, so the LeakyReLU loses nothing); each [conv, PixelShuffle(2)] stage
    upsamples those channels with separable cubic 2x kernels; ``conv_last`` recombines +x / -x. All
    other weights keep their random values, and the weights that would mix them into the image path
    start at zero. The architecture is unchanged; this is only a starting point.
    """
    cfg = dcm.cfg
    if cfg.upscale not in (2, 4) or cfg.in_channels != 3 or cfg.num_feat < 6 or cfg.embed_dim < 3:
        raise SdatcError("interpolation start needs an RGB x2/x4 DCM with num_feat >= 6 and embed_dim >= 3")
    first = dcm.conv_first
    first.weight[:3].zero_()
    first.bias[:3].zero_()
    for k in range(3):
        first.weight[k, k, 1, 1] = 1.0 / cfg.img_range  # undo img_range: features carry x - mean
    nn.init.zeros_(dcm.conv_after_body.weight)
    nn.init.zeros_(dcm.conv_after_body.bias)
    before = dcm.conv_before_upsample[0]
    before.weight[:6].zero_()
    before.bias[:6].zero_()
    for k in range(3):
        before.weight[2 * k, k, 1, 1], before.weight[2 * k + 1, k, 1, 1] = 1.0, -1.0
    phases = [torch.outer(a, b) for a in (_HALF, _HALF.flip(0)) for b in (_HALF, _HALF.flip(0))]  # (i, j) order
    for conv in (m for m in dcm.upsample if isinstance(m, nn.Conv2d)):
        conv.weight[:24].zero_()  # output channels 4k + phase of the 6 image channels
        conv.bias[:24].zero_()
        conv.weight[24:, :6].zero_()  # the other channels do not read the image path ...
        for k in range(6):
            for p, kern in enumerate(phases):
                conv.weight[4 * k + p, k] = kern.to(conv.weight.dtype)
    last = dcm.conv_last
    last.weight.zero_()  # ... and only the image path reaches the output, at first
    last.bias.zero_()
    slope = 0.01  # LeakyReLU: lrelu(a) - lrelu(-a) = (1 + slope) a
    for k in range(3):
        last.weight[k, 2 * k, 1, 1], last.weight[k, 2 * k + 1, 1, 1] = 1 / (1 + slope), -1 / (1 + slope)
    return dcm

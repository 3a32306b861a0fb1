"""The DCM (``sdatc/models/dcm.py``) without grad: the same function in fewer memory passes and FLOPs.

    from sdatc.models.dcm_fast import dcm_inference
    with torch.inference_mode():
        hr = dcm_inference(dcm, lr)  # (B, 3, h, w) in [0, 1] -> channels-last (B, 3, 4h, 4w)

The pipelines call it explicitly for inference (the DCM's own ``forward`` is the reference: SwinIR as
written, with autograd; training always runs that). Equal to ``dcm(x)`` up to float rounding
(``tests/models/test_dcm_speed.py``: float32 within 2e-5 of the output's range, float64 to 1e-12):

* feature maps are channels-last throughout, so the (B, H, W, C) token views of the body and the
  (B, C, H, W) maps of the convolutions are the same memory (no permute copies);
* the Swin blocks run window by window (:func:`blocks_inference`): the tokens stay in window order
  between blocks (one gather per block instead of a roll, a partition, a reverse and a roll back), each
  block runs on chunks of ``CHUNK_WINDOWS`` windows that stay in cache, attention is
  ``scaled_dot_product_attention`` with the relative position bias as its mask, and the shifted-window
  mask is added only on the windows where it is not all zero;
* the upsampler and conv_last run as one convolution on the LR grid (:class:`FoldedTail`, A45), with
  the border strips recomputed exactly.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from sdatc.models.dcm import DCM


def upsampler_chain(x: torch.Tensor, convs: list[tuple[torch.Tensor, torch.Tensor | None, int]],
                     last: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """The upsampler and conv_last as SwinIR runs them: [conv 3x3, PixelShuffle(r)]..., conv 3x3."""
    for weight, bias, r in convs:
        x = F.pixel_shuffle(F.conv2d(x, weight, bias, padding=1), r)
    return F.conv2d(x, *last, padding=1)


@dataclasses.dataclass(frozen=True)
class FoldedTail:
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


def fold_tail(convs, last, scale: int, img_range: float, key: tuple) -> FoldedTail:
    """Fold the chain into :class:`FoldedTail` (computed in float64 from impulse responses)."""
    c = convs[0][0].shape[1]
    out_c = last[0].shape[0]
    convs64 = [(w.double(), None, r) for w, _, r in convs]
    last64 = (last[0].double(), None)
    big = 2 * len(convs) + 3  # canvas half-size in LR pixels, more than the kernel radius
    n = 2 * big + 1
    impulse = torch.zeros(c, c, n, n, dtype=torch.float64, device=last[0].device)
    impulse[torch.arange(c), torch.arange(c), big, big] = 1.0
    resp = upsampler_chain(impulse, convs64, last64)  # (C, out, s*n, s*n): response to each channel
    resp = resp.view(c, out_c, n, scale, n, scale).permute(3, 5, 1, 0, 2, 4)  # (i, j, out, C, y, x)
    weight = resp.flip(-2, -1).reshape(scale * scale * out_c, c, n, n)  # cross-correlation: offset = big - y
    # An HR pixel reaches 1 + 1/2 + ... + 1/s LR pixels (3x3 convs at 1x, 2x, ..., s x) beyond its sub-pixel
    # offset (< 1): under 3 LR pixels for every scale, so radius 2 (tests check the kernel against the chain).
    radius = 2
    weight = weight[:, :, big - radius:big + radius + 1, big - radius:big + radius + 1]
    zeros = torch.zeros(1, c, n, n, dtype=torch.float64, device=last[0].device)
    full = [(w.double(), None if b is None else b.double(), r) for w, b, r in convs]
    bias = upsampler_chain(zeros, full, (last[0].double(), None if last[1] is None else last[1].double()))
    bias = bias[0, :, big * scale:(big + 1) * scale, big * scale:(big + 1) * scale]  # (out, s, s), interior
    bias = bias.permute(1, 2, 0).reshape(-1) / img_range
    return FoldedTail(weight / img_range, bias, radius, key)


@dataclasses.dataclass(frozen=True)
class WindowLayout:
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


_LAYOUTS: dict[tuple, WindowLayout] = {}
_FOLDS: weakref.WeakKeyDictionary[DCM, FoldedTail] = weakref.WeakKeyDictionary()  # per DCM, until a weight changes
CHUNK_WINDOWS = 32  # windows per chunk of a block's forward without grad, on the CPU (32 x 64 tokens)


def window_layout(b: int, h: int, w: int, ws: int, shift: tuple[int, int], device: torch.device) -> WindowLayout:
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
    _LAYOUTS[key] = WindowLayout(order.to(device), inverse.to(device), mask, n_masked)
    return _LAYOUTS[key]


def block_inference(block: SwinTransformerBlock, t: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
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


def blocks_inference(blocks: nn.ModuleList, x: torch.Tensor, buffers: list[torch.Tensor] | None = None) -> torch.Tensor:
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
        ws = block.window_size  # square, dividing h and w (the DCM pads its input to a multiple)
        layout = window_layout(b, h, w, ws[0], tuple(block.shift_size), x.device)
        index = layout.order if prev is None else prev.inverse[layout.order]
        t = block_inference(block, torch.index_select(t, 0, index, out=buffers[i % 2]), layout)
        prev = layout
    return torch.index_select(t, 0, prev.inverse, out=buffers[len(blocks) % 2]).view(b, h, w, c)


@torch.no_grad()
def dcm_inference(dcm: DCM, x: torch.Tensor) -> torch.Tensor:
    """``dcm(x)`` without grad, in fewer memory passes and FLOPs (see the module docstring).

    x: (B, in_channels, h, w) in [0, 1] -> (B, in_channels, s*h, s*w), channels-last.
    """
    h, w = x.shape[-2:]
    s = dcm.cfg.upscale
    x = dcm.pad_to_window(x)  # (B, 3, H, W), H, W multiples of window_size
    mean = dcm.mean.to(x.dtype)
    x = ((x - mean) * dcm.cfg.img_range).contiguous(memory_format=torch.channels_last)

    feat = dcm.conv_first(x)  # (B, C, H, W) channels-last
    t = dcm.patch_embed.norm(feat.permute(0, 2, 3, 1))  # (B, H, W, C)
    buffers = [torch.empty(t.numel() // t.shape[-1], t.shape[-1], device=t.device, dtype=t.dtype) for _ in range(2)]
    for layer in dcm.layers:  # RSTB: t + conv(blocks(t))
        y = blocks_inference(layer.residual_group.blocks, t, buffers)  # (B, H, W, C)
        t += layer.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    feat = dcm.conv_after_body(dcm.norm(t).permute(0, 3, 1, 2)).add_(feat)  # (B, C, H, W)
    return tail_inference(dcm, feat, mean)[:, :, : s * h, : s * w]  # (B, 3, s*h, s*w)

def folded_tail(dcm: DCM) -> FoldedTail:
    """The upsampler folded into one convolution (:class:`FoldedTail`), kept until a weight changes."""
    convs = [(conv.weight, conv.bias, shuffle.upscale_factor)
             for conv, shuffle in zip(list(dcm.upsample)[0::2], list(dcm.upsample)[1::2])]
    last = (dcm.conv_last.weight, dcm.conv_last.bias)
    params = [t for w, b, _ in convs for t in (w, b)] + list(last)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in params if t is not None)
    fold = _FOLDS.get(dcm)
    if fold is None or fold.key != key:
        fold = fold_tail(convs, last, dcm.cfg.upscale, dcm.cfg.img_range, key)
        _FOLDS[dcm] = fold  # beside the module, not in it: not a buffer, not in the state dict
    return fold


def tail_inference(dcm: DCM, feat: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """conv_before_upsample, upsample, conv_last, + mean: (B, C, H, W) -> channels-last (B, 3, sH, sW).

    The upsampler and conv_last run as one convolution on the LR grid (:class:`FoldedTail`), whose
    sub-pixel channels are rearranged into the output; the ``radius``-pixel border strips are
    recomputed with the upsampler as it is (its zero padding at 2x and 4x).
    """
    z = dcm.conv_before_upsample(feat)  # (B, nf, H, W)
    fold = folded_tail(dcm)
    b, _, h, w = z.shape
    s, oc, r = dcm.cfg.upscale, dcm.cfg.in_channels, fold.radius
    y = F.conv2d(z, fold.weight.to(z.dtype), fold.bias.to(z.dtype), padding=r)  # (B, s*s*oc, H, W)
    dtype = torch.promote_types(y.dtype, mean.dtype)  # (the reference adds the mean in x's dtype)
    out = torch.empty(b, h, s, w, s, oc, device=z.device, dtype=dtype)  # (B, H, i, W, j, oc)
    out.copy_(y.permute(0, 2, 3, 1).reshape(b, h, w, s, s, oc).transpose(2, 3))
    out = out.view(b, s * h, s * w, oc)  # (B, sH, sW, oc)
    m = mean.to(dtype).view(oc)
    out.add_(m)

    def exact(zc: torch.Tensor) -> torch.Tensor:  # the upsampler as it is: (B, nf, a, c) -> (B, sa, sc, oc)
        return (dcm.conv_last(dcm.upsample(zc)) / dcm.cfg.img_range).permute(0, 2, 3, 1) + m

    if min(h, w) <= 2 * r:
        return exact(z).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    sr = s * r
    out[:, :sr] = exact(z[:, :, :2 * r])[:, :sr]  # top strip
    out[:, -sr:] = exact(z[:, :, -2 * r:])[:, -sr:]  # bottom
    out[:, sr:-sr, :sr] = exact(z[:, :, :, :2 * r])[:, sr:-sr, :sr]  # left (rows between)
    out[:, sr:-sr, -sr:] = exact(z[:, :, :, -2 * r:])[:, sr:-sr, -sr:]  # right
    return out.permute(0, 3, 1, 2)  # (B, oc, sH, sW) channels-last

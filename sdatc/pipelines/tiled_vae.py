"""Tiled VAE decode / encode: whole-frame tensors between layers, tile-wise kernels inside them.

    x = decode_tiled(model, z, feats, num_frames=5, w=0.75, tile=64)   # (T, 3, 8h, 8w)
    z, feats = encode_tiled(model, img, levels=[1, 2], tile=512)      # z (T, 4, H/8, W/8)

What a VAE forward holds at once is the activation between two layers (and a residual) plus the
temporaries inside the layer that runs: a resnet's normalised and activated copies, an upsampler's
interpolated map, CAPM's prompt, ``qkv`` and feed-forward maps (over six times the width at the
decoder's full resolution), CFW's dense concatenations. Here the unmodified forward (``model.decode`` /
``model.encode``, the drivers, the Sites) runs on the whole frames, and for the duration of the call
the layers with large temporaries are swapped for versions that compute their output tile by tile
(restored in a ``finally``; no torch hooks):

* a *local* layer (upsampler, downsampler, CFW's residual dense blocks, STAM, RTS's shift unit) runs
  on each tile cut with a halo of its receptive radius, and keeps the tile's centre;
* a ``ResnetBlock2D`` takes each GroupNorm's statistics over the whole frame (a pass over the tiles),
  then runs ``norm -> SiLU -> conv`` tile by tile; its middle activation and its output are whole-frame;
* the self-attention of the mid blocks takes keys and values of the whole frame, queries by tile;
* CAPM: the pooled prompt weights (a pass over tiles), ``q k^T`` and MDTA's L2 norms (a second pass),
  then the output tile by tile; its prompt is each tile's window of the prompt resized to the frame;
* RTS's attention unit (UltraVSR): its L2 norms and ``q_t k_{t+-1}^T`` over the whole frame in a first pass;
* ``conv_norm_out -> SiLU -> conv_out`` runs as one tiled layer.

Tiles are a partition of the frame (no overlaps, no blending): every pixel is computed from the same
inputs as untiled, so the result equals the untiled forward up to float rounding, and normalisation
statistics are those of the whole frame by construction. Memory: the whole-frame activations between
layers (about three at the widest level) plus one tile's temporaries, falling with the tile size;
FLOPs: the untiled ones plus the halos and CAPM's second pass (a few %). Every frame of the batch is in
every tile (STAM and RTS see the whole window). Only the calling thread sees the swapped layers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdatc.models.capm import CAPM
from sdatc.models.cfw import ResidualDenseBlock
from sdatc.models.rts import RTSAttention, RTSConv, neighbour
from sdatc.models.stam import STAM

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1)


class _Grid:
    """The tiles of one call: ``tile`` pixels of the input (``frame`` (H, W)); a (h, w) activation is cut
    into tiles of ``tile * h / H`` pixels (at least ``align``, a multiple of it)."""

    def __init__(self, frame: tuple[int, int], tile: int):
        self.frame, self.tile, self.owner = frame, tile, threading.get_ident()

    def active(self) -> bool:
        return threading.get_ident() == self.owner

    def boxes(self, h: int, w: int, align: int = 1) -> list[Box]:
        t = max(align, int(self.tile * Fraction(h, self.frame[0])) // align * align)
        return [(y, min(y + t, h), x, min(x + t, w)) for y in range(0, h, t) for x in range(0, w, t)]


def _local(fn: Callable[..., Tensor], xs: tuple[Tensor, ...], boxes: list[Box], halo: int) -> Tensor:
    """``fn(*crops)`` per box, each input cut to the box grown by ``halo`` pixels (clipped at the frame);
    the output's part over the box (the output may be at another scale, e.g. 2 or 1/2) written into one
    whole-frame output. Exact when ``halo`` covers ``fn``'s receptive radius."""
    h, w = xs[0].shape[-2:]
    out = None
    for y0, y1, x0, x1 in boxes:
        a0, a1, b0, b1 = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
        o = fn(*(x[..., a0:a1, b0:b1] for x in xs))  # (N, C', s (a1 - a0), s (b1 - b0))
        s = Fraction(o.shape[-2], a1 - a0)
        if out is None:
            out = o.new_empty(*o.shape[:-2], int(h * s), int(w * s))
        oy, ox = int((y0 - a0) * s), int((x0 - b0) * s)
        sy, sx = int((y1 - y0) * s), int((x1 - x0) * s)
        out[..., int(y0 * s):int(y0 * s) + sy, int(x0 * s):int(x0 * s) + sx] = o[..., oy:oy + sy, ox:ox + sx]
    return out


def _group_stats(gn: nn.GroupNorm, x: Tensor, boxes: list[Box]) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel (scale, shift) (N, C) fp32 of ``gn`` over the whole frame of ``x``: each tile's
    mean and variance (fp32, no copy of an fp32 tile), merged in float64 (Chan et al.).
    ``gn(x) == x * scale + shift``."""
    c, g = x.shape[1], gn.num_groups
    count = mean = m2 = 0
    for y0, y1, x0, x1 in boxes:
        t = x[..., y0:y1, x0:x1].unflatten(1, (g, c // g)).float()  # (N, G, C/G, h_t, w_t)
        var_t, mean_t = (v.double() for v in torch.var_mean(t, dim=(2, 3, 4), correction=0))  # 2 x (N, G)
        k = t[0, 0].numel()
        delta, total = mean_t - mean, count + k
        mean = mean + delta * (k / total)
        m2 = m2 + var_t * k + delta.square() * (count * k / total)
        count = total
    rstd = torch.rsqrt(m2 / count + gn.eps).float().repeat_interleave(c // g, dim=1)  # (N, C)
    scale, shift = rstd, -mean.float().repeat_interleave(c // g, dim=1) * rstd
    if gn.affine:
        scale, shift = scale * gn.weight.float(), shift * gn.weight.float() + gn.bias.float()
    return scale, shift


def _normed(x: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
    """GroupNorm of a tile with whole-frame ``stats``: fp32 under autocast (as autocast runs group_norm),
    else x's dtype."""
    scale, shift = stats
    y = torch.addcmul(shift[..., None, None], x.float(), scale[..., None, None])
    return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


# ---------------------------------------------------------------------------------------- tiled layers


class _Tiled(nn.Module):
    """A layer (``inner``, its weights) computed tile by tile in the thread that swapped it in; elsewhere ``inner``."""

    def __init__(self, inner: nn.Module, grid: _Grid):
        super().__init__()
        self.inner, self.grid = inner, grid

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not self.grid.active() or x.dim() != 4:
            return self.inner(x, *args, **kwargs)
        return self.tiled(x, *args, **kwargs)


class TiledLocal(_Tiled):
    """A layer whose output pixel depends on inputs within ``halo`` pixels (per frame or over the batch's frames)."""

    def __init__(self, inner: nn.Module, grid: _Grid, halo: int, align: int = 1):
        super().__init__(inner, grid)
        self.halo, self.align = halo, align

    def tiled(self, x: Tensor, *args, **kwargs) -> Tensor:
        boxes = self.grid.boxes(*x.shape[-2:], self.align)
        return _local(lambda t: self.inner(t, *args, **kwargs), (x,), boxes, self.halo)


class TiledResnet(_Tiled):
    """diffusers' ``ResnetBlock2D`` without time embedding or resampling (the VAE's and CFW's): whole-frame
    GroupNorm statistics, ``norm -> SiLU -> conv`` by tiles."""

    def tiled(self, x: Tensor, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        r = self.inner
        if temb is not None or args or kwargs or r.upsample is not None or r.downsample is not None:
            return r(x, temb, *args, **kwargs)
        boxes = self.grid.boxes(*x.shape[-2:])
        n1 = _group_stats(r.norm1, x, boxes)
        h = _local(lambda t: r.conv1(r.nonlinearity(_normed(t, n1))), (x,), boxes, 1)  # (N, C_out, H, W)
        n2 = _group_stats(r.norm2, h, boxes)

        def second(ht: Tensor, xt: Tensor) -> Tensor:
            out = r.conv2(r.dropout(r.nonlinearity(_normed(ht, n2))))
            sc = r.conv_shortcut(xt) if r.conv_shortcut is not None else xt
            return (sc + out) / r.output_scale_factor

        return _local(second, (h, x), boxes, 1)


class TiledNormActConv(_Tiled):
    """``conv(act(norm(x)))`` by tiles with the norm's whole-frame statistics (the VAE's conv_norm_out -> conv_out)."""

    def __init__(self, norm: nn.GroupNorm, act: nn.Module, conv: nn.Conv2d, grid: _Grid):
        super().__init__(conv, grid)
        self.norm, self.act = norm, act

    def forward(self, x: Tensor) -> Tensor:
        if not self.grid.active():
            return self.inner(self.act(self.norm(x)))
        boxes = self.grid.boxes(*x.shape[-2:])
        stats = _group_stats(self.norm, x, boxes)
        return _local(lambda t: self.inner(self.act(_normed(t, stats))), (x,), boxes, self.inner.kernel_size[0] // 2)


class TiledAttention(_Tiled):
    """A diffusers spatial self-attention (the mid blocks'): group-normed keys and values of the whole frame,
    queries and output by tiles. Follows diffusers' ``AttnProcessor2_0``."""

    def tiled(self, x: Tensor, *args, **kwargs) -> Tensor:
        attn = self.inner
        if args or any(v is not None for v in kwargs.values()):
            return attn(x, *args, **kwargs)
        boxes = self.grid.boxes(*x.shape[-2:])
        stats = _group_stats(attn.group_norm, x, boxes) if attn.group_norm is not None else None

        def tokens(t: Tensor) -> Tensor:  # (N, C, h, w) -> (N, h*w, C), group-normed
            return (_normed(t, stats) if stats is not None else t).flatten(2).transpose(1, 2)

        def heads(t: Tensor) -> Tensor:  # (N, L, C') -> (N, heads, L, C'/heads)
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        crops = [tokens(x[..., y0:y1, x0:x1]) for y0, y1, x0, x1 in boxes]
        k = heads(torch.cat([attn.to_k(c) for c in crops], dim=1))  # (N, heads, P_frame, C'/heads)
        v = heads(torch.cat([attn.to_v(c) for c in crops], dim=1))
        del crops

        def one(t: Tensor) -> Tensor:  # (N, C, h, w) -> (N, C, h, w)
            n, c, h, w = t.shape
            q = heads(attn.to_q(tokens(t)))
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2).to(q.dtype)  # (N, h*w, C')
            out = attn.to_out[1](attn.to_out[0](out)).transpose(1, 2).reshape(n, c, h, w)
            if attn.residual_connection:
                out = out + t
            return out / attn.rescale_output_factor

        return _local(one, (x,), boxes, 0)


def _resize_rows(p: Tensor, frame: tuple[int, int], box: Box) -> Tensor:
    """Rows / columns ``box`` of ``F.interpolate(p, size=frame, mode="bilinear")``, separably. p: (N, C, S, S)."""

    def rows(src: int, dst: int, start: int, stop: int) -> Tensor:  # (src, n) weights, like F.interpolate
        eye = torch.eye(src, device=p.device, dtype=p.dtype)[None]  # (1, src, src)
        return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0, :, start:stop]

    ay, ax = rows(p.shape[-2], frame[0], box[0], box[1]), rows(p.shape[-1], frame[1], box[2], box[3])
    return torch.einsum("ncst,sy,tx->ncyx", p, ay, ax)


class TiledCAPM(_Tiled):
    """CAPM (``sdatc/models/capm.py``) by tiles: pass 1 the pooled prompt weights, pass 2 MDTA's L2 norms and
    ``q k^T`` over the whole frame, pass 3 the output. Halos: 2 (weight CNN), 2 (prompt conv + MDTA's
    depthwise conv), 3 (and GDFN's)."""

    def tiled(self, x: Tensor, ctx=None) -> Tensor:
        m = self.inner
        h, w = x.shape[-2:]
        boxes = self.grid.boxes(h, w)
        blk, mdta = m.block, m.block.attn

        def centre(t: Tensor, box: Box, crop: Box) -> Tensor:
            return t[..., box[0] - crop[0]:box[1] - crop[0], box[2] - crop[2]:box[3] - crop[2]]

        def crops(halo: int) -> Iterator[tuple[Box, Box]]:
            for b in boxes:
                yield b, (max(0, b[0] - halo), min(h, b[1] + halo), max(0, b[2] - halo), min(w, b[3] + halo))

        # pass 1: v = Linear(mean of CNN(x) over the frame); the prompt p (N, C_p, S, S)
        total, dtype = 0, x.dtype
        for box, c in crops(2):
            f = m.weight_cnn[:-1](x[..., c[0]:c[1], c[2]:c[3]])  # (N, h, h_c, w_c)
            total, dtype = total + centre(f, box, c).float().sum((-2, -1)), f.dtype
        v = m.weight_linear((total / (h * w)).to(dtype))  # (N, L), as AdaptiveAvgPool2d(1) in the CNN's dtype
        v = v.softmax(-1) if m.cfg.weight_norm == "softmax" else v.sigmoid() if m.cfg.weight_norm == "sigmoid" else v
        p = torch.einsum("nl,lchw->nchw", v, m.prompts.to(v.dtype))  # (N, C_p, S, S)

        def qkv(c: Box) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fused, q, k, v over crop c (borders wrong)
            pc = m.prompt_conv(_resize_rows(p, (h, w), c))  # (N, C_p, h_c, w_c)
            fused = m.reduce(torch.cat([x[..., c[0]:c[1], c[2]:c[3]], pc], dim=1))  # (N, d, h_c, w_c)
            q, k, vv = mdta.qkv_dwconv(mdta.qkv(blk.norm1(fused))).chunk(3, dim=1)  # 3 x (N, d, h_c, w_c)
            return fused, q, k, vv

        # pass 2: the whole frame's L2 norms of q, k over pixels and q k^T, per head
        g = mdta.num_heads
        sq = sk = gram = 0
        for box, c in crops(2):
            _, q, k, _ = qkv(c)
            qo, ko = (centre(t, box, c).unflatten(1, (g, -1)).flatten(-2).float() for t in (q, k))  # (N, g, c, P)
            sq, sk, gram, dtype = (sq + qo.square().sum(-1), sk + ko.square().sum(-1),
                                   gram + qo @ ko.transpose(-2, -1), q.dtype)
        eps = 1e-12  # F.normalize's
        attn = gram / (sq.sqrt().clamp_min(eps)[..., :, None] * sk.sqrt().clamp_min(eps)[..., None, :])
        attn = (attn.to(dtype) * mdta.temperature).softmax(dim=-1)  # (N, g, d/g, d/g)

        # pass 3: the output by tiles
        out = None
        for box, c in crops(3):
            fused, _, _, vv = qkv(c)
            o = attn @ vv.unflatten(1, (g, -1)).flatten(-2)  # (N, g, d/g, P_c)
            y = fused + mdta.project_out(o.flatten(1, 2).unflatten(-1, fused.shape[-2:]))
            y = y + blk.ffn(blk.norm2(y))
            y = centre(x[..., c[0]:c[1], c[2]:c[3]] + m.zero_out(y), box, c)  # (N, C, h_b, w_b)
            if out is None:
                out = y.new_empty(*y.shape[:-2], h, w)
            out[..., box[0]:box[1], box[2]:box[3]] = y
        return out


class TiledRTSAttention(_Tiled):
    """RTS's attention unit (``sdatc/models/rts.py``) by tiles holding all frames: pass 1 the whole frame's L2
    norms of q, k and ``q_t k_{t+s}^T`` (s = -1, +1), pass 2 the output. Halo 1 (the depthwise conv)."""

    def tiled(self, x: Tensor, num_frames: int) -> Tensor:
        m, g = self.inner, self.inner.num_heads
        h, w = x.shape[-2:]
        boxes = self.grid.boxes(h, w)

        def qkv(box: Box) -> tuple[Tensor, ...]:  # 3 x (N, g, c, P_box): the box's q, k, v
            c = (max(0, box[0] - 1), min(h, box[1] + 1), max(0, box[2] - 1), min(w, box[3] + 1))
            t = m.qkv_dwconv(m.qkv(x[..., c[0]:c[1], c[2]:c[3]]))  # the box and its 1-pixel halo
            t = t[..., box[0] - c[0]:box[1] - c[0], box[2] - c[2]:box[3] - c[2]]
            return tuple(a.unflatten(1, (g, -1)).flatten(-2) for a in t.chunk(3, dim=1))

        sq = sk = 0
        grams = {-1: 0, 1: 0}
        for box in boxes:
            q, k, _ = qkv(box)
            dtype, qf, kf = q.dtype, q.float(), k.float()
            sq, sk = sq + qf.square().sum(-1), sk + kf.square().sum(-1)  # (N, g, c)
            for s in grams:
                grams[s] = grams[s] + qf @ neighbour(kf, num_frames, s).transpose(-2, -1)  # (N, g, c, c)
        eps = 1e-12  # F.normalize's
        nq = sq.sqrt().clamp_min(eps)
        attn = {s: ((gr / (nq[..., :, None] * neighbour(sk.sqrt(), num_frames, s).clamp_min(eps)[..., None, :]))
                    .to(dtype) * m.temperature).softmax(dim=-1)
                for s, gr in grams.items()}  # (N, g, c, c) per offset

        def one(box: Box) -> Tensor:
            _, _, v = qkv(box)
            out = sum(attn[s] @ neighbour(v, num_frames, s) for s in attn)  # (N, g, c, P_box)
            out = out.flatten(1, 2).unflatten(-1, (box[1] - box[0], box[3] - box[2]))  # (N, Ca/3, h_b, w_b)
            return x[..., box[0]:box[1], box[2]:box[3]] + m.proj_out(out)

        out = None
        for box in boxes:
            y = one(box)
            if out is None:
                out = y.new_empty(*y.shape[:-2], h, w)
            out[..., box[0]:box[1], box[2]:box[3]] = y
        return out


# ---------------------------------------------------------------------------------------- the swap


def _shareable(attn: nn.Module) -> bool:
    """A diffusers self-attention TiledAttention can run: no spatial / q-k norms, no cross-attention."""
    from diffusers.models.attention_processor import Attention

    return (isinstance(attn, Attention) and not attn.is_cross_attention and attn.spatial_norm is None
            and attn.norm_q is None and attn.norm_k is None and attn.norm_cross is None)


def _tiled_version(child: nn.Module, grid: _Grid) -> nn.Module | None:
    # diffusers here, not at the top: infer.py's DCM-only paths (the preview model) start without it
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    if isinstance(child, ResnetBlock2D):
        return TiledResnet(child, grid)
    if isinstance(child, Upsample2D) and child.use_conv and not child.use_conv_transpose and child.norm is None:
        return TiledLocal(child, grid, halo=1)
    if isinstance(child, Downsample2D) and child.use_conv and child.norm is None:
        return TiledLocal(child, grid, halo=2, align=2)
    if _shareable(child):
        return TiledAttention(child, grid)
    if isinstance(child, CAPM):
        return TiledCAPM(child, grid)
    if isinstance(child, ResidualDenseBlock):
        return TiledLocal(child, grid, halo=len(child.convs) + 1)
    if isinstance(child, STAM):
        return TiledLocal(child, grid, halo=0)  # per pixel over the frames, which every tile holds
    if isinstance(child, RTSConv):
        return TiledLocal(child, grid, halo=1)  # every tile holds the window's frames: the shift is exact
    if isinstance(child, RTSAttention):
        return TiledRTSAttention(child, grid)
    return None


@contextlib.contextmanager
def tiled_layers(root: nn.Module, frame: tuple[int, int], tile: int) -> Iterator[None]:
    """Within the block, the layers under ``root`` with large temporaries compute by tiles of ``tile`` pixels of
    an input of ``frame`` (H, W) pixels, in this thread; put back on exit, whatever happens."""
    grid = _Grid(frame, tile)
    todo = [(parent, name, new) for parent in list(root.modules()) for name, child in parent.named_children()
            if (new := _tiled_version(child, grid)) is not None]
    if (isinstance(getattr(root, "conv_norm_out", None), nn.GroupNorm) and isinstance(root.conv_out, nn.Conv2d)
            and isinstance(root.conv_act, nn.Module)):  # conv_out(conv_act(conv_norm_out(h))) as one tiled layer
        todo += [(root, "conv_out", TiledNormActConv(root.conv_norm_out, root.conv_act, root.conv_out, grid)),
                 (root, "conv_norm_out", nn.Identity()), (root, "conv_act", nn.Identity())]
    done = []
    try:
        for parent, name, new in todo:
            done.append((parent, name, getattr(parent, name)))
            setattr(parent, name, new)
        yield
    finally:
        for parent, name, old in reversed(done):
            setattr(parent, name, old)


# ---------------------------------------------------------------------------------------- entry points


def _covers(tile: int, h: int, w: int) -> bool:
    return tile >= max(h, w)


def decode_tiled(model, z: Tensor, feats: dict[int, Tensor] | None, num_frames: int, w: float, tile: int) -> Tensor:
    """``model.decode`` computed by tiles of ``tile`` latent pixels (``tile * 8`` at the output).

    Args:
        model: an ``sdatc.models.sdatc.SDATC``.
        z: (T, 4, h, w) scaled latents (T = B * num_frames; every tile holds all T frames).
        feats: CFW encoder features by level, (T, C_l, 8h / 2^l, 8w / 2^l), or None.
        num_frames, w: as ``model.decode``.

    Returns:
        (T, 3, 8h, 8w) in [-1, 1]: ``model.decode(z, feats, num_frames=..., w=...)`` up to float rounding;
        exactly it when one tile covers the latent.
    """
    if _covers(tile, *z.shape[-2:]):
        return model.decode(z, feats, num_frames=num_frames, w=w)
    with tiled_layers(model.vae.decoder, tuple(z.shape[-2:]), tile):
        return model.decode(z, feats, num_frames=num_frames, w=w)


def encode_tiled(model, img: Tensor, levels, tile: int, posterior: bool = False):
    """``model.encode`` (``posterior``: ``model.encode_posterior``) computed by tiles of ``tile`` image pixels.

    Args:
        model: an ``sdatc.models.sdatc.SDATC``.
        img: (T, 3, H, W) in [0, 1], H and W multiples of the VAE factor (8).
        levels: encoder levels whose features to return (a subset of ``model.cfg.cfw_levels``).
        posterior: also return the posterior's log-variance.

    Returns:
        z (T, 4, H/8, W/8) scaled latents (with ``posterior``: the unscaled mean and log-variance, as
        ``model.encode_posterior``) and {level: (T, C_l, H / 2^l, W / 2^l)}: ``model.encode(img)`` up to float
        rounding; exactly it when one tile covers the image.
    """
    levels = list(levels)
    ctx = (tiled_layers(model.vae.encoder, tuple(img.shape[-2:]), tile)
           if not _covers(tile, *img.shape[-2:]) else contextlib.nullcontext())
    with ctx:
        if posterior:
            z, logvar, feats = model.encode_posterior(img)
            return z, logvar, {lv: feats[lv] for lv in levels}
        z, feats = model.encode(img)
    return z, {lv: feats[lv] for lv in levels}


def tiled_shared(root: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor, tile: int) -> Tensor:
    """Any VAE forward ``fn(x)`` of (N, C, H, W) with the layers under ``root`` computed by tiles of ``tile``
    pixels of ``x`` (UltraVSR's encoder and decoder). ``fn(x)`` as is when one tile covers ``x``."""
    if _covers(tile, *x.shape[-2:]):
        return fn(x)
    with tiled_layers(root, tuple(x.shape[-2:]), tile):
        return fn(x)

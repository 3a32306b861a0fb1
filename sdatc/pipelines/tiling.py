"""Spatial tiling with blended overlaps, shared by every stage (UNet latents, VAE encoder/decoder, DCM).

    eps = tiled_apply(lambda zt, box: unet(zt, z_c[..., box[0]:box[1], box[2]:box[3]]), z_t, 64, 32)
    z, f2, f4 = tiled_apply(encode, img, 512, 64, align=8)     # outputs at 1/8, 1/2 and 1/4 scale

Conventions:

* Tiles on an axis all have the same size ``min(tile, size)`` (rounded down to ``align``); starts are
  spread evenly from 0 to ``size - tile`` so that every overlap is at least ``overlap`` and the last
  tile ends exactly at ``size``.
* ``fn(x_tile, box)`` gets ``box = (y0, y1, x0, x1)`` in ``x``'s coordinates. Each output's scale
  (e.g. 8, 4, 1, 1/2, 1/8) is read from the first tile and must map every box to whole pixels.
* Overlaps are merged as ``sum(w * out) / sum(w)`` with ``blend_weights`` of the output tile size.
  Gaussian weights follow StableSR / MultiDiffusion: per axis ``exp(-((i - (L-1)/2) / L)^2 / (2 * 0.01))``
  for pixel ``i`` of a tile of length ``L`` (their ``1/sqrt(2 pi var)`` factor cancels in the ratio),
  scaled to a peak of 1 and clamped to >= 1e-6.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor

GAUSSIAN_VAR = 0.01  # StableSR's variance, in tile-normalised coordinates
MIN_WEIGHT = 1e-6  # every pixel keeps a non-zero weight, even at a tile corner

Box = tuple[int, int, int, int]
TileFn = Callable[[Tensor, Box], "Tensor | tuple[Tensor, ...] | list[Tensor]"]


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of equal tiles covering ``[0, size)``.

    Args:
        size: length of the axis; must be a multiple of ``align`` (pad first).
        tile: tile length; clamped to ``size`` and rounded down to a multiple of ``align``.
        overlap: minimum overlap between consecutive tiles (rounded up to a multiple of ``align``).
        align: every start and the tile length are multiples of this.

    Returns:
        Increasing starts; the first is 0 and the last is ``size - tile``. ``[0]`` when one tile fits.
    """
    if size < 1:
        raise ValueError(f"cannot tile an axis of size {size}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if size % align:
        raise ValueError(f"size {size} is not a multiple of align={align}: pad the input first")
    if tile < align:
        raise ValueError(f"tile {tile} is smaller than align={align}")
    # Work in units of `align`.
    n_units, tile_units = size // align, min(tile // align, size // align)
    if tile_units >= n_units:
        return [0]
    overlap_units = math.ceil(overlap / align)
    if overlap_units >= tile_units:
        raise ValueError(
            f"overlap {overlap} (rounded up to align={align}: {overlap_units * align}) "
            f"must be smaller than the tile {tile_units * align}")
    span, step = n_units - tile_units, tile_units - overlap_units
    gaps = math.ceil(span / step)  # fewest gaps whose starts differ by at most `step`
    return [(i * span // gaps) * align for i in range(gaps + 1)]


def _ramp(length: int, kind: str) -> Tensor:
    """(length,) float64 profile along one axis, peak 1 at the middle, symmetric."""
    i = torch.arange(length, dtype=torch.float64)
    if kind == "gaussian":
        d = (i - (length - 1) / 2) / length  # distance to the middle in tile-normalised units
        return torch.exp(-d * d / (2 * GAUSSIAN_VAR))
    if kind == "linear":
        return torch.minimum(i + 1, length - i) / ((length + 1) // 2)  # 1/m, 2/m, ... 1 ... 2/m, 1/m
    raise ValueError(f"unknown blend kind {kind!r} (expected 'gaussian' or 'linear')")


@functools.lru_cache(maxsize=32)
def blend_weights(h: int, w: int, kind: str = "gaussian", device=None, dtype=None) -> Tensor:
    """(h, w) blending weights of one tile: separable, symmetric, peak 1 in the centre, all >= 1e-6.

    Args:
        h, w: tile size.
        kind: ``"gaussian"`` (StableSR: var 0.01 in tile-normalised coordinates) or ``"linear"``
            (a tent: each axis ramps linearly from the edges to the centre; the 2-D weight is the product).
        device, dtype: of the result (default: CPU, the default float dtype).
    """
    if h < 1 or w < 1:
        raise ValueError(f"blend weights need a positive size, got {h}x{w}")
    weights = torch.outer(_ramp(h, kind), _ramp(w, kind)).clamp_min(MIN_WEIGHT)  # (h, w)
    return weights.to(device=device, dtype=dtype or torch.get_default_dtype())


def _as_tuple(out) -> tuple[Tensor, ...]:
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if not outs or not all(isinstance(o, Tensor) and o.dim() >= 2 for o in outs):
        raise ValueError("the tile function must return a tensor or a tuple/list of tensors (..., h, w)")
    return outs


def _scale(out: Tensor, th: int, tw: int, k: int) -> Fraction:
    """Scale factor of output ``k`` from a (th, tw) input tile; the same on both axes."""
    sy, sx = Fraction(out.shape[-2], th), Fraction(out.shape[-1], tw)
    if sy != sx:
        raise ValueError(f"output {k}: a {th}x{tw} tile gave {tuple(out.shape[-2:])}, "
                         f"not the same scale on both axes ({sy} vs {sx})")
    return sy


def _scaled(v: int, s: Fraction, k: int) -> int:
    p = v * s
    if p.denominator != 1:
        raise ValueError(f"output {k} has scale {s}: coordinate {v} maps to {p}, not a whole pixel "
                         "(use a larger align or pad the input)")
    return int(p)


def _accumulators(outs: tuple[Tensor, ...], th: int, tw: int, H: int, W: int, kind: str,
                  frames: int | None = None, blend: bool = True,
                  ) -> tuple[list[Fraction], list[torch.dtype], list[Tensor], list[Tensor], list[Tensor]]:
    """From the first call's outputs (from a (th, tw) tile): per output its scale, dtype, zeroed weighted sum
    (its leading dims, or ``frames`` then its dims after the batch; (H * s, W * s) last), zeroed weight sum
    (H * s, W * s) and tile weights (``blend_weights``, or ones when ``blend`` is False)."""
    scales, dtypes, acc, norm, weights = [], [], [], [], []
    for k, o in enumerate(outs):
        s = _scale(o, th, tw, k)
        oh, ow = _scaled(H, s, k), _scaled(W, s, k)
        dt, dev = torch.promote_types(o.dtype, torch.float32), o.device
        lead = o.shape[:-2] if frames is None else (frames, *o.shape[1:-2])
        scales.append(s)
        dtypes.append(o.dtype)
        acc.append(torch.zeros(*lead, oh, ow, device=dev, dtype=dt))
        norm.append(torch.zeros(oh, ow, device=dev, dtype=dt))
        weights.append(blend_weights(*o.shape[-2:], kind, device=dev, dtype=dt) if blend
                       else torch.ones(*o.shape[-2:], device=dev, dtype=dt))
    return scales, dtypes, acc, norm, weights


def tiled_apply(fn: TileFn, x: Tensor, tile: int, overlap: int, kind: str = "gaussian",
                align: int = 1) -> Tensor | tuple[Tensor, ...]:
    """Apply ``fn`` over overlapping spatial tiles of ``x`` and blend the outputs.

    Args:
        fn: ``fn(x_tile, box)`` with ``x_tile = x[..., y0:y1, x0:x1]`` and ``box = (y0, y1, x0, x1)``;
            returns a tensor or a tuple/list of tensors (..., h_k, w_k), each the tile size times a
            fixed scale s_k (an integer like 4 or 8, or a fraction like 1/2 or 1/8).
        x: (N, C, H, W) input.
        tile: tile size (square) in ``x``'s pixels.
        overlap: minimum overlap between neighbouring tiles in ``x``'s pixels.
        kind: blending weights, see ``blend_weights``.
        align: tile starts and sizes are multiples of this (e.g. 8 for an encoder whose output is at
            1/8); H and W must be multiples of it.

    Returns:
        The blended outputs, (..., H * s_k, W * s_k): a tensor, or a tuple when ``fn`` returns several.
        When one tile covers ``x``, ``fn(x, (0, H, 0, W))`` is returned as is.
    """
    if x.dim() != 4:
        raise ValueError(f"tiled_apply expects (N, C, H, W), got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    ys, xs = tile_starts(H, tile, overlap, align), tile_starts(W, tile, overlap, align)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x, (0, H, 0, W))
    th, tw = min(tile // align * align, H), min(tile // align * align, W)  # the same for every tile

    scales: list[Fraction] = []  # per output; with dtypes, acc (sum of w * out), norm (sum of w), weights
    single = True
    for y0 in ys:
        for x0 in xs:
            box = (y0, y0 + th, x0, x0 + tw)
            raw = fn(x[..., box[0]:box[1], box[2]:box[3]], box)
            outs = _as_tuple(raw)
            if not scales:  # first tile: read each output's scale, allocate the accumulators
                single = not isinstance(raw, (tuple, list))
                scales, dtypes, acc, norm, weights = _accumulators(outs, th, tw, H, W, kind)
                lead = [o.shape[:-2] for o in outs]
            if len(outs) != len(scales):
                raise ValueError(f"the tile function returned {len(outs)} outputs for box {box}, "
                                 f"{len(scales)} for the first tile")
            for k, o in enumerate(outs):
                s = scales[k]
                oy0, oy1, ox0, ox1 = (_scaled(v, s, k) for v in box)
                if o.shape[:-2] != lead[k] or o.shape[-2:] != (oy1 - oy0, ox1 - ox0):
                    raise ValueError(f"output {k} for box {box} has shape {tuple(o.shape)}, expected "
                                     f"{(*lead[k], oy1 - oy0, ox1 - ox0)} (scale {s})")
                acc[k][..., oy0:oy1, ox0:ox1] += o * weights[k]
                norm[k][oy0:oy1, ox0:ox1] += weights[k]
    merged = tuple((a / n).to(dt) for a, n, dt in zip(acc, norm, dtypes))
    return merged[0] if single else merged


def tiled_batched(fn: Callable[..., Tensor | tuple[Tensor, ...]], xs: tuple[Tensor, ...], tile: int | None,
                  overlap: int, batch: int, kind: str = "gaussian", align: int = 1,
                  group: int = 1, per_frame: tuple[Tensor, ...] = ()) -> Tensor | tuple[Tensor, ...]:
    """Like :func:`tiled_apply`, with tiles and frames stacked on the batch axis, ``batch`` items per call.

    Args:
        fn: ``fn(*x_items)``: each input cut to the same items, (B, C_i, th, tw) -> a tensor or a tuple of
            tensors (B, ..., th * s_k, tw * s_k).
        xs: inputs (N, C_i, H, W) of the same N, H and W (e.g. the latents and the condition latents).
        tile: tile size in input pixels, or None: whole frames (one box).
        overlap, kind, align: as in :func:`tiled_apply`.
        batch: items (tile x frame pairs) per call; rounded down to a multiple of ``group`` (at least one
            group). Items are tile-major: tile 0's N frames, then tile 1's, ... so a group of frames that must
            be seen together (``group`` = frames per window) stays in one call.
        group: frames that must share a call; N must be a multiple of it.
        per_frame: inputs (N, ...) that are not cut into tiles (e.g. text states (N, 77, D)): each call gets
            the rows of its items' frames, after the tiled inputs.

    Returns:
        Blended outputs (N, ..., H * s_k, W * s_k). With one box and ``batch >= N``: ``fn(*xs)`` as is.
    """
    x = xs[0]
    if x.dim() != 4 or any(y.shape[0] != x.shape[0] or y.shape[-2:] != x.shape[-2:] for y in xs):
        raise ValueError("tiled_batched expects inputs (N, C, H, W) of one N, H, W, "
                         f"got {[tuple(y.shape) for y in xs]}")
    n, (H, W) = x.shape[0], x.shape[-2:]
    if n % group:
        raise ValueError(f"{n} items are not whole groups of {group}")
    batch = max(group, batch // group * group)
    if tile is None:
        ys = xs_ = [0]
        th, tw = H, W
    else:
        ys, xs_ = tile_starts(H, tile, overlap, align), tile_starts(W, tile, overlap, align)
        th, tw = min(tile // align * align, H), min(tile // align * align, W)
    boxes = [(y0, y0 + th, x0, x0 + tw) for y0 in ys for x0 in xs_]
    if any(e.shape[0] != n for e in per_frame):
        raise ValueError(f"per_frame inputs need {n} rows, got {[tuple(e.shape) for e in per_frame]}")
    if len(boxes) == 1 and batch >= n:
        return fn(*xs, *per_frame)
    items = [(b, i) for b in range(len(boxes)) for i in range(n)]  # tile-major
    scales: list[Fraction] = []  # per output; with dtypes, acc (sum of w * out), norm (sum of w), weights
    single = True
    for c in range(0, len(items), batch):
        chunk = items[c:c + batch]
        cut = [torch.stack([y[i, :, boxes[b][0]:boxes[b][1], boxes[b][2]:boxes[b][3]] for b, i in chunk]) for y in xs]
        cut += [e[[i for _, i in chunk]] for e in per_frame]
        raw = fn(*cut)
        outs = _as_tuple(raw)
        if not scales:  # first call: read each output's scale, allocate the accumulators
            single = not isinstance(raw, (tuple, list))
            scales, dtypes, acc, norm, weights = _accumulators(outs, th, tw, H, W, kind, frames=n, blend=len(boxes) > 1)
        for k, o in enumerate(outs):
            s = scales[k]
            for j, (b, i) in enumerate(chunk):
                oy0, oy1, ox0, ox1 = (_scaled(v, s, k) for v in boxes[b])
                acc[k][i, ..., oy0:oy1, ox0:ox1] += o[j] * weights[k]
                if i == 0:
                    norm[k][oy0:oy1, ox0:ox1] += weights[k]
    merged = tuple((a / nm).to(dt) for a, nm, dt in zip(acc, norm, dtypes))
    return merged[0] if single else merged

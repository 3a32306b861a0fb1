"""Colour correction of restored frames against their (low-resolution) input, as in StableSR.

    out = colour_correct(sr, lq, "adain")   # sr: (N, 3, 4h, 4w), lq: (N, 3, h, w)

* ``adain``: per frame and channel, give ``x`` the mean and standard deviation of ``ref``, with
  StableSR's statistics (``calc_mean_std``: unbiased variance, eps = 1e-5 added to both variances, on
  images in [-1, 1]).
* ``wavelet``: keep the high frequencies of ``x`` and take the low frequencies from ``ref``
  (bicubically resized to ``x``'s size and clamped to the image range, as StableSR clamps its bicubic
  reference). The low-pass is an a-trous ("with holes") pyramid: blur
  ``levels`` times with a 3x3 binomial kernel ([1, 2, 1] / 4 on each axis) whose taps are spread
  2^i pixels apart at level i, edges replicated. The detail layers between levels add up to
  ``x - low(x)``, so the result is ``x - low(x) + low(ref)``.

Both take the decoder's output unclamped (the peers fix, then clamp: the caller clamps). Statistics and
filtering run in float32 (at least); results come back in ``x``'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COLOUR_MODES = ("adain", "wavelet", "none")


def _check_pair(x: Tensor, ref: Tensor) -> None:
    if x.dim() != 4 or ref.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) tensors, got {tuple(x.shape)} and {tuple(ref.shape)}")
    if x.shape[:2] != ref.shape[:2]:
        raise ValueError(f"x {tuple(x.shape)} and ref {tuple(ref.shape)} differ in frames or channels")


def _float(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def adain(x: Tensor, ref: Tensor, eps: float = 1e-5) -> Tensor:
    """Match the per-frame, per-channel mean and std of ``x`` to ``ref`` (StableSR's
    ``adaptive_instance_normalization``).

    Args:
        x: (N, C, H, W) frames to correct, in [0, 1] (unclamped).
        ref: (N, C, h, w) reference frames in [0, 1], any spatial size.
        eps: added to both variances, in the peers' units (images in [-1, 1]).

    Returns:
        ``(x' - mean_x') / sqrt(var_x' + eps) * sqrt(var_ref' + eps) + mean_ref'`` on ``x' = 2 x - 1``
        (unbiased variances), mapped back to [0, 1]; (N, C, H, W).
    """
    _check_pair(x, ref)
    xf = 2 * _float(x) - 1  # (N, C, H, W) in [-1, 1], the peers' range
    rf = 2 * _float(ref).to(xf.dtype) - 1
    var_x, mean_x = torch.var_mean(xf, dim=(-2, -1), keepdim=True, correction=1)  # (N, C, 1, 1)
    var_r, mean_r = torch.var_mean(rf, dim=(-2, -1), keepdim=True, correction=1)
    out = (xf - mean_x) / torch.sqrt(var_x + eps) * torch.sqrt(var_r + eps) + mean_r
    return ((out + 1) / 2).to(x.dtype)


def _low_pass(img: Tensor, levels: int) -> Tensor:
    """(N, C, H, W) -> its low-frequency residual after ``levels`` dilated 3x3 binomial blurs."""
    c = img.shape[1]
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=img.dtype, device=img.device) / 4
    kernel = torch.outer(k1, k1).expand(c, 1, 3, 3).contiguous()  # depthwise (C, 1, 3, 3)
    for i in range(levels):
        d = 2**i
        padded = F.pad(img, (d, d, d, d), mode="replicate")
        img = F.conv2d(padded, kernel, dilation=d, groups=c)
    return img


def wavelet_fix(x: Tensor, ref: Tensor, levels: int = 5) -> Tensor:
    """Low frequencies of ``ref`` + high frequencies of ``x`` (StableSR's wavelet colour fix).

    Args:
        x: (N, C, H, W) frames to correct.
        ref: (N, C, h, w) reference frames in [0, 1]; resized to (H, W) with bicubic interpolation if
            needed, then clamped to [0, 1].
        levels: blur levels (dilations 1, 2, ..., 2^(levels-1)); more levels leave more to ``x``.

    Returns:
        ``x - low(x) + low(ref)``, (N, C, H, W).
    """
    _check_pair(x, ref)
    if levels < 1:
        raise ValueError(f"wavelet levels must be >= 1, got {levels}")
    xf, rf = _float(x), _float(ref)
    rf = rf.to(xf.dtype)
    if rf.shape[-2:] != xf.shape[-2:]:
        rf = F.interpolate(rf, size=xf.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    return (xf - _low_pass(xf, levels) + _low_pass(rf, levels)).to(x.dtype)


def colour_correct(x: Tensor, ref: Tensor, mode: str) -> Tensor:
    """Colour-correct ``x`` (N, C, H, W) against ``ref`` (N, C, h, w).

    Args:
        mode: ``"adain"``, ``"wavelet"`` or ``"none"`` (``x`` is returned as is).
    """
    if mode == "adain":
        return adain(x, ref)
    if mode == "wavelet":
        return wavelet_fix(x, ref)
    if mode == "none":
        return x
    raise ValueError(f"unknown colour correction {mode!r} (expected one of {', '.join(COLOUR_MODES)})")

"""MATLAB-compatible ``imresize(img, scale, 'bicubic')`` (antialiased), for numpy and torch.

Each dimension is resized by a dense (out, in) float64 weight matrix, with MATLAB's symmetric
border padding folded in, applied as matmuls over the last two dims: ``out = Wh @ x @ Ww.T``.
Differences from MATLAB itself: uint8 images are rounded once at the end (float64 in between), and
``ceil(scale * n)`` tolerates floating-point error (``0.1 * 30`` gives 3, not 4).
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import torch


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5 (MATLAB's)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))


@functools.lru_cache(maxsize=64)
def _weights(in_len: int, out_len: int, scale: float) -> torch.Tensor:
    """(out_len, in_len) float64 CPU matrix W such that out = W @ x along one dimension."""
    width = 4.0 / scale if scale < 1 else 4.0  # antialiasing widens the kernel when shrinking
    x = np.arange(1, out_len + 1, dtype=np.float64)  # 1-based output coordinates
    u = x / scale + 0.5 * (1 - 1 / scale)  # (out,) matching 1-based input coordinate
    left = np.floor(u - width / 2)
    taps = left[:, None] + np.arange(math.ceil(width) + 2)  # (out, P) 1-based input indices
    d = u[:, None] - taps
    w = scale * _cubic(scale * d) if scale < 1 else _cubic(d)
    w /= w.sum(axis=1, keepdims=True)
    # MATLAB 'symmetric' padding (mirror including the edge pixel): 0-based -1 -> 0, n -> n-1.
    idx = np.mod(taps.astype(np.int64) - 1, 2 * in_len)
    idx = np.where(idx >= in_len, 2 * in_len - 1 - idx, idx)
    mat = np.zeros((out_len, in_len))
    np.add.at(mat, (np.repeat(np.arange(out_len), w.shape[1]), idx.ravel()), w.ravel())
    return torch.from_numpy(mat)


def _plan(in_hw: tuple[int, int], scale, size) -> list[tuple[int, int, int, float]]:
    """[(dim, in, out, scale)] for H (-2) and W (-1), in MATLAB's order (smaller scale first)."""
    if (scale is None) == (size is None):
        raise ValueError("imresize: give exactly one of scale= or size=(out_h, out_w)")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (0 < scale < math.inf):
            raise ValueError(f"imresize: scale must be a positive number, got {scale!r}")
        scales = (float(scale), float(scale))
        outs = tuple(math.ceil(scale * n - 1e-9 * max(1.0, scale * n)) for n in in_hw)
    else:
        if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
            raise ValueError(f"imresize: size must be two positive ints (out_h, out_w), got {size!r}")
        outs = tuple(int(s) for s in size)
        scales = tuple(o / n if n else math.inf for o, n in zip(outs, in_hw))
    if min(in_hw) == 0 or min(outs) == 0:
        raise ValueError(f"imresize: empty input or output (input {in_hw}, output {outs})")
    order = sorted(range(2), key=lambda i: scales[i])  # stable: rows first on ties
    return [(i - 2, in_hw[i], outs[i], scales[i]) for i in order]


def imresize(img, scale: float | None = None, size: tuple[int, int] | None = None):
    """MATLAB imresize(img, scale, 'bicubic') with antialiasing.

    img: numpy (H, W) or (H, W, C), or torch tensor (..., H, W) with any leading dims ((C,H,W),
    (B,C,H,W), (B,T,C,H,W)). Exactly one of scale / size=(out_h, out_w); output size is
    ceil(scale * in) per dim. Returns the same container type, layout and dtype. Integer images
    (uint8) are computed in float64, rounded half up and clipped to the dtype's range; float
    images are computed in their own dtype (float16/bfloat16 in float32) and not clipped.
    """
    is_numpy = isinstance(img, np.ndarray)
    if is_numpy:
        if img.ndim not in (2, 3):
            raise ValueError(f"imresize: numpy input must be (H, W) or (H, W, C), got shape {img.shape}")
        x = torch.from_numpy(np.ascontiguousarray(img))
        x = x.permute(2, 0, 1) if img.ndim == 3 else x  # (C, H, W) or (H, W)
    elif isinstance(img, torch.Tensor):
        if img.ndim < 2:
            raise ValueError(f"imresize: input needs at least 2 dims (..., H, W), got shape {tuple(img.shape)}")
        x = img
    else:
        raise TypeError(f"imresize: expected a numpy array or torch tensor, got {type(img).__name__}")
    dtype = x.dtype
    if dtype == torch.bool or dtype.is_complex:
        raise TypeError(f"imresize: unsupported dtype {dtype}")
    work = (dtype if dtype in (torch.float32, torch.float64)
            else torch.float32 if dtype.is_floating_point else torch.float64)

    y = x.to(work)  # (..., H, W)
    for dim, n_in, n_out, s in _plan(tuple(x.shape[-2:]), scale, size):
        if n_in == n_out and s == 1:
            continue  # identity weights
        w = _weights(n_in, n_out, s).to(device=y.device, dtype=work)  # (out, in)
        y = w @ y if dim == -2 else y @ w.T  # (..., out, W) or (..., H, out)

    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        y = torch.floor(y + 0.5).clamp_(info.min, info.max)  # MATLAB: round half away from zero
    y = y.to(dtype)
    if is_numpy:
        y = y.permute(1, 2, 0) if img.ndim == 3 else y
        return np.ascontiguousarray(y.numpy())
    return y


def bicubic_down(img, factor: int = 4):
    """Downscale by an integer ``factor`` (MATLAB bicubic); H and W must be divisible by it."""
    h, w = (img.shape[:2] if isinstance(img, np.ndarray) else img.shape[-2:])
    if h % factor or w % factor:
        raise ValueError(f"bicubic_down: size {h}x{w} (HxW) is not divisible by {factor}")
    out = imresize(img, scale=1 / factor)
    got = tuple(out.shape[:2] if isinstance(out, np.ndarray) else out.shape[-2:])
    assert got == (h // factor, w // factor), f"bicubic_down: got {got}, expected {(h // factor, w // factor)}"
    return out


def bicubic_up(img, factor: int = 4):
    """Upscale by ``factor`` (MATLAB bicubic)."""
    return imresize(img, scale=factor)

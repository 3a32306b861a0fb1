"""PSNR / SSIM on the BT.601 limited-range Y channel, BasicSR convention (``test_y_channel=True``).

Y = 16 + 65.481 R + 128.553 G + 24.966 B (RGB in [0, 1]), in [16, 235], float64 and unrounded.
PSNR = 10 log10(255^2 / MSE). SSIM: 11x11 Gaussian window (sigma 1.5), C1 = (0.01*255)^2,
C2 = (0.03*255)^2, mean of the SSIM map over the 'valid' region (no padding), as BasicSR's
``calculate_psnr`` / ``calculate_ssim`` (which convert RGB/255 through float32; we stay in float64).
"""

from __future__ import annotations

import cv2
import numpy as np

_Y_COEFFS = np.array([65.481, 128.553, 24.966])  # R, G, B
_GAUSS = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
_GAUSS /= _GAUSS.sum()  # == cv2.getGaussianKernel(11, 1.5)
_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def rgb_to_y(img) -> np.ndarray:
    """(H, W, 3) RGB, uint8 [0, 255] or float [0, 1] -> (H, W) float64 Y in [16, 235], unrounded."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"rgb_to_y: expected an (H, W, 3) RGB image, got shape {img.shape}")
    if img.dtype == np.uint8:
        rgb = img.astype(np.float64) / 255.0
    elif np.issubdtype(img.dtype, np.floating):
        rgb = img.astype(np.float64)
        if rgb.size and rgb.max() > 1.5:
            raise ValueError(f"rgb_to_y: float images must be in [0, 1], got max {rgb.max():.3g} "
                             "(pass uint8 for [0, 255])")
    else:
        raise ValueError(f"rgb_to_y: expected uint8 [0, 255] or float [0, 1], got dtype {img.dtype}")
    return rgb @ _Y_COEFFS + 16.0


def _y_pair(sr, gt, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, crop ``crop_border`` pixels off each edge, convert both to Y."""
    sr, gt = np.asarray(sr), np.asarray(gt)
    if sr.shape != gt.shape:
        raise ValueError(f"image shapes differ: sr {sr.shape} vs gt {gt.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        sr = sr[crop_border:-crop_border, crop_border:-crop_border]
        gt = gt[crop_border:-crop_border, crop_border:-crop_border]
    return rgb_to_y(sr), rgb_to_y(gt)


def psnr_y(sr, gt, crop_border: int = 0) -> float:
    """PSNR (dB) between two (H, W, 3) RGB frames on Y; identical frames give ``float('inf')``."""
    y1, y2 = _y_pair(sr, gt, crop_border)
    mse = float(np.mean((y1 - y2) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable 11x11 Gaussian, 'valid' region: (H, W) -> (H - 10, W - 10)."""
    return cv2.sepFilter2D(img, cv2.CV_64F, _GAUSS, _GAUSS, borderType=cv2.BORDER_REFLECT_101)[5:-5, 5:-5]


def ssim_y(sr, gt, crop_border: int = 0) -> float:
    """SSIM between two (H, W, 3) RGB frames on Y (mean of the valid-region SSIM map)."""
    y1, y2 = _y_pair(sr, gt, crop_border)
    if min(y1.shape) < 11:
        raise ValueError(f"ssim_y needs at least 11x11 pixels (after crop), got {y1.shape}")
    mu1, mu2 = _blur(y1), _blur(y2)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = _blur(y1 * y1) - mu1_sq
    s2 = _blur(y2 * y2) - mu2_sq
    s12 = _blur(y1 * y2) - mu12
    ssim_map = ((2 * mu12 + _C1) * (2 * s12 + _C2)) / ((mu1_sq + mu2_sq + _C1) * (s1 + s2 + _C2))
    return float(ssim_map.mean())

"""The metrics shipped with sdatc, registered by name (see registry.py)."""

from sdatc.metrics.psnr_ssim import psnr_y, ssim_y
from sdatc.metrics.registry import register


@register("psnr_y", higher_is_better=True, aliases=("psnr",))
def _psnr_y(device: str = "cpu"):
    """PSNR on BT.601 limited-range Y, float64, BasicSR convention (identical frames: inf)."""
    return psnr_y


@register("ssim_y", higher_is_better=True, aliases=("ssim",))
def _ssim_y(device: str = "cpu"):
    """SSIM on BT.601 limited-range Y: Gaussian 11x11, sigma 1.5, valid region (BasicSR)."""
    return ssim_y

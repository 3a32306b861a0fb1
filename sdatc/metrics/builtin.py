"""The metrics shipped with sdatc, registered by name (see registry.py).

Table metrics, in the order of the paper's tables: psnr_y, ssim_y, lpips, dists, fid, niqe, maniqa,
clipiqa, vmaf. Temporal extras: warping_error, tlp, tof. Learned metrics need their weights in the
offline weights folder (sdatc.weights); without them they are reported as missing.
"""

from sdatc.metrics.psnr_ssim import psnr_y, ssim_y
from sdatc.metrics.registry import MetricContext, register


@register("psnr_y", higher_is_better=True, aliases=("psnr",),
          variant="own: BT.601 limited-range Y (16 + 65.481 R + 128.553 G + 24.966 B), float64, full frame")
def _psnr_y(ctx: MetricContext):
    """PSNR on BT.601 limited-range Y, float64, BasicSR convention (identical frames: inf)."""
    return psnr_y


@register("ssim_y", higher_is_better=True, aliases=("ssim",),
          variant="own: BT.601 limited-range Y, Gaussian 11x11 sigma 1.5, valid region (BasicSR)")
def _ssim_y(ctx: MetricContext):
    """SSIM on BT.601 limited-range Y: Gaussian 11x11, sigma 1.5, valid region (BasicSR)."""
    return ssim_y


def _pyiqa(name: str, higher_is_better: bool, variant: str, doc: str) -> None:
    """Register a per-frame pyiqa metric ``name`` (its weights come from the offline weights folder)."""

    def factory(ctx: MetricContext):
        from sdatc.metrics.learned import pyiqa_frame_metric

        return pyiqa_frame_metric(name, ctx)

    factory.__doc__ = doc
    register(name, higher_is_better=higher_is_better, variant=variant)(factory)


_pyiqa("lpips", False, "pyiqa lpips: AlexNet, v0.1, RGB [0, 1], full frame",
       "LPIPS (AlexNet, v0.1) through pyiqa.")
_pyiqa("dists", False, "pyiqa dists: VGG16, RGB [0, 1], full frame",
       "DISTS through pyiqa.")


@register("fid", higher_is_better=False, kind="set",
          variant="pyiqa fid network (Inception-V3 pool3, FID weights), clean-fid resize to 299, all SR vs all GT frames of a set")
def _fid(ctx: MetricContext):
    """FID per set: all SR frames vs all GT frames (clean mode)."""
    from sdatc.metrics.learned import FID

    return FID(ctx)


_pyiqa("niqe", False, "pyiqa niqe: original parameters, Y channel, full frame",
       "NIQE through pyiqa (no reference).")
_pyiqa("maniqa", True, "pyiqa maniqa: KonIQ-10k checkpoint, 20 uniform 224x224 crops",
       "MANIQA (KonIQ weights) through pyiqa (no reference).")
_pyiqa("clipiqa", True, "pyiqa clipiqa: CLIP RN50, pyiqa's 5 antonym prompt pairs, full frame",
       "CLIP-IQA through pyiqa (no reference).")


@register("vmaf", higher_is_better=True, kind="clip",
          variant="libvmaf vmaf_v0.6.1 (imageio-ffmpeg's ffmpeg), SR vs GT on 8-bit BT.601 limited Y, mean over frames")
def _vmaf(ctx: MetricContext):
    """VMAF (vmaf_v0.6.1) per clip through ffmpeg's libvmaf filter."""
    from sdatc.metrics.vmaf import VMAF

    return VMAF()


@register("warping_error", higher_is_better=False, kind="clip", aliases=("ewarp",),
          variant="RAFT-large (C_T_SKHT_V2, 12 iters) on output frames, occlusion-masked MSE x1e3")
def _warping_error(ctx: MetricContext):
    """Warping error of the output (x1e3) with RAFT flows between its consecutive frames."""
    from sdatc.metrics.temporal import WarpingError

    return WarpingError.with_raft(ctx)


@register("tlp", higher_is_better=False, kind="clip",
          variant="|LPIPS(GT_t-1, GT_t) - LPIPS(SR_t-1, SR_t)| x100, pyiqa lpips AlexNet v0.1 (TecoGAN)")
def _tlp(ctx: MetricContext):
    """tLP x100: LPIPS between consecutive frames, SR vs GT (TecoGAN)."""
    from sdatc.metrics.temporal import TLP

    return TLP(ctx)


@register("tof", higher_is_better=False, kind="clip",
          variant="mean L2 norm of Farneback flow differences SR vs GT (OpenCV, TecoGAN settings), full frame")
def _tof(ctx: MetricContext):
    """tOF: Farneback flow between consecutive frames, SR vs GT (TecoGAN)."""
    from sdatc.metrics.temporal import TOF

    return TOF()

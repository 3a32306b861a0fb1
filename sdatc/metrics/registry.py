"""Every metric of ``scripts/evaluate.py`` and ``scripts/reproduce_tables.py`` by name: a plain mapping.

    metric = build_metric("lpips", MetricContext(device="cuda", weights=Path("weights")))
    scorer = metric.scorer()                # one per clip: update(sr, gt) per frame pair, result()

Each entry of :data:`METRICS` holds a *factory* taking a MetricContext, so learned metrics load their network
once; it returns a :class:`~sdatc.metrics.base.Metric`, or for simple frame metrics a plain function
``fn(sr, gt) -> float`` of (H, W, 3) uint8 RGB frames. A new metric is one more entry.

Table metrics, in the order of the paper's tables: psnr_y, ssim_y, lpips, dists, fid, niqe, maniqa, clipiqa,
vmaf. Temporal extras: warping_error, tlp, tof. Kinds: ``frame`` (per frame pair, mean per clip, then mean over
clips), ``clip`` (one value per clip, e.g. VMAF, temporal metrics; then mean over clips), ``set`` (one value per
set from every clip's frames, e.g. FID). A factory that cannot run here (weights missing) raises
MetricUnavailable, whose message names the file to get and where to put it; callers mark the metric missing
and go on. Learned metrics need their weights in the offline weights folder (sdatc.weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from sdatc.errors import SdatcError
from sdatc.metrics.base import FrameMetric, Metric, MetricContext
from sdatc.metrics.psnr_ssim import psnr_y, ssim_y

KINDS = ("frame", "clip", "set")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    factory: Callable[[MetricContext], object]
    higher_is_better: bool
    kind: str = "frame"
    description: str = ""
    variant: str = ""  # the exact implementation, recorded beside the results

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"metric kind must be one of {KINDS}, got {self.kind!r}")


def _pyiqa(name: str):
    """The factory of a per-frame pyiqa metric ``name`` (its weights come from the offline weights folder)."""

    def factory(ctx: MetricContext):
        from sdatc.metrics.learned import pyiqa_frame_metric

        return pyiqa_frame_metric(name, ctx)

    return factory


def _fid(ctx: MetricContext):
    from sdatc.metrics.learned import FID

    return FID(ctx)


def _vmaf(ctx: MetricContext):
    from sdatc.metrics.vmaf import VMAF

    return VMAF()


def _warping_error(ctx: MetricContext):
    from sdatc.metrics.temporal import WarpingError

    return WarpingError.with_raft(ctx)


def _tlp(ctx: MetricContext):
    from sdatc.metrics.temporal import TLP

    return TLP(ctx)


def _tof(ctx: MetricContext):
    from sdatc.metrics.temporal import TOF

    return TOF()


METRICS: dict[str, MetricSpec] = {s.name: s for s in [
    MetricSpec("psnr_y", lambda ctx: psnr_y, True,
               description="PSNR on BT.601 limited-range Y, float64, BasicSR convention (identical frames: inf).",
               variant="own: BT.601 limited-range Y (16 + 65.481 R + 128.553 G + 24.966 B), float64, full frame"),
    MetricSpec("ssim_y", lambda ctx: ssim_y, True,
               description="SSIM on BT.601 limited-range Y: Gaussian 11x11, sigma 1.5, valid region (BasicSR).",
               variant="own: BT.601 limited-range Y, Gaussian 11x11 sigma 1.5, valid region (BasicSR)"),
    MetricSpec("lpips", _pyiqa("lpips"), False, description="LPIPS (AlexNet, v0.1) through pyiqa.",
               variant="pyiqa lpips: AlexNet, v0.1, RGB [0, 1], full frame"),
    MetricSpec("dists", _pyiqa("dists"), False, description="DISTS through pyiqa.",
               variant="pyiqa dists: VGG16, RGB [0, 1], full frame"),
    MetricSpec("fid", _fid, False, kind="set", description="FID per set: all SR frames vs all GT frames (clean mode).",
               variant="pyiqa fid network (Inception-V3 pool3, FID weights), clean-fid resize to 299, "
                       "all SR vs all GT frames of a set"),
    MetricSpec("niqe", _pyiqa("niqe"), False, description="NIQE through pyiqa (no reference).",
               variant="pyiqa niqe: original parameters, Y channel, full frame"),
    MetricSpec("maniqa", _pyiqa("maniqa"), True, description="MANIQA (KonIQ weights) through pyiqa (no reference).",
               variant="pyiqa maniqa: KonIQ-10k checkpoint, 20 uniform 224x224 crops"),
    MetricSpec("clipiqa", _pyiqa("clipiqa"), True, description="CLIP-IQA through pyiqa (no reference).",
               variant="pyiqa clipiqa: CLIP RN50, pyiqa's 5 antonym prompt pairs, full frame"),
    MetricSpec("vmaf", _vmaf, True, kind="clip",
               description="VMAF (vmaf_v0.6.1) per clip through ffmpeg's libvmaf filter.",
               variant="libvmaf vmaf_v0.6.1 (imageio-ffmpeg's ffmpeg), SR vs GT on 8-bit BT.601 limited Y, "
                       "mean over frames"),
    MetricSpec("warping_error", _warping_error, False, kind="clip",
               description="Warping error of the output (x1e3) with RAFT flows between its consecutive frames.",
               variant="RAFT-large (C_T_SKHT_V2, 12 iters) on output frames, occlusion-masked MSE x1e3"),
    MetricSpec("tlp", _tlp, False, kind="clip",
               description="tLP x100: LPIPS between consecutive frames, SR vs GT (TecoGAN).",
               variant="|LPIPS(GT_t-1, GT_t) - LPIPS(SR_t-1, SR_t)| x100, pyiqa lpips AlexNet v0.1 (TecoGAN)"),
    MetricSpec("tof", _tof, False, kind="clip",
               description="tOF: Farneback flow between consecutive frames, SR vs GT (TecoGAN).",
               variant="mean L2 norm of Farneback flow differences SR vs GT (OpenCV, TecoGAN settings), full frame"),
]}
ALIASES = {"psnr": "psnr_y", "ssim": "ssim_y", "ewarp": "warping_error"}


def metric_names() -> list[str]:
    return list(METRICS)


def get_metric(name: str) -> MetricSpec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in METRICS:
        raise SdatcError(f"unknown metric {name!r} (known: {', '.join(METRICS)}; aliases: {', '.join(ALIASES)})")
    return METRICS[key]


def build_metric(name: str, ctx: MetricContext | None = None):
    """The ready-to-use Metric of ``name``; MetricUnavailable when it cannot run here."""
    spec = get_metric(name)
    obj = spec.factory(ctx or MetricContext())
    if isinstance(obj, Metric):
        return obj
    if spec.kind != "frame" or not callable(obj):
        raise TypeError(f"factory of {spec.name!r} returned {type(obj).__name__}, expected a Metric")
    return FrameMetric(spec.name, obj)

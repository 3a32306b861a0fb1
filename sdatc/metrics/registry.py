"""Metric registry: every metric of ``scripts/evaluate.py`` and ``scripts/reproduce_tables.py`` by name.

A metric is registered as a *factory* taking a MetricContext, so learned metrics load their network
once; it returns a :class:`~sdatc.metrics.base.Metric`, or for simple frame metrics a plain function:

    @register("psnr_y", higher_is_better=True, aliases=("psnr",), variant="BT.601 limited Y, float64")
    def _psnr(ctx):
        return psnr_y                       # callable(sr, gt) -> float, frames (H, W, 3) uint8 RGB

    metric = build_metric("lpips", MetricContext(device="cuda", weights=Path("weights")))
    scorer = metric.scorer()                # one per clip: update(sr, gt) per frame pair, result()

Kinds: ``frame`` (per frame pair, mean per clip, then mean over clips), ``clip`` (one value per clip,
e.g. VMAF, temporal metrics; then mean over clips), ``set`` (one value per set from every clip's
frames, e.g. FID). A factory that cannot run here (weights missing) raises MetricUnavailable, whose
message names the file to get and where to put it; callers mark the metric missing and go on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from sdatc.errors import SdatcError

KINDS = ("frame", "clip", "set")


class MetricUnavailable(SdatcError):
    """A metric that cannot run here (e.g. its weights are missing); the message says what to get."""


@dataclasses.dataclass(frozen=True)
class MetricContext:
    """What a factory may use: the device, the offline weights folder, the batch size."""

    device: str = "cpu"
    weights: Path | None = None  # resolved weights root (sdatc.weights.resolve_root)
    batch_size: int = 4


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    factory: Callable[[MetricContext], object]
    higher_is_better: bool
    kind: str = "frame"
    description: str = ""
    variant: str = ""  # the exact implementation, recorded beside the results


_REGISTRY: dict[str, MetricSpec] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *, higher_is_better: bool, kind: str = "frame", aliases: tuple[str, ...] = (),
             description: str = "", variant: str = ""):
    if kind not in KINDS:
        raise ValueError(f"metric kind must be one of {KINDS}, got {kind!r}")

    def deco(factory):
        doc = description or (factory.__doc__ or "").strip()
        _REGISTRY[name] = MetricSpec(name, factory, higher_is_better, kind, doc, variant or doc)
        for a in aliases:
            _ALIASES[a] = name
        return factory

    return deco


def metric_names() -> list[str]:
    _load_builtin()
    return list(_REGISTRY)


def get_metric(name: str) -> MetricSpec:
    _load_builtin()
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise SdatcError(f"unknown metric {name!r} (known: {', '.join(metric_names())}; aliases: {', '.join(_ALIASES)})")
    return _REGISTRY[key]


def build_metric(name: str, ctx: MetricContext | None = None):
    """The ready-to-use Metric of ``name``; MetricUnavailable when it cannot run here."""
    from sdatc.metrics.base import FrameMetric, Metric

    spec = get_metric(name)
    obj = spec.factory(ctx or MetricContext())
    if isinstance(obj, Metric):
        return obj
    if spec.kind != "frame" or not callable(obj):
        raise TypeError(f"factory of {spec.name!r} returned {type(obj).__name__}, expected a Metric")
    return FrameMetric(spec.name, obj)


def _load_builtin() -> None:
    from sdatc.metrics import builtin  # noqa: F401  (registers on import)

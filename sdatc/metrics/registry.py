"""Metric registry: every metric of ``scripts/evaluate.py`` is looked up here by name.

A metric is registered as a *factory* so that learned metrics can load their network once:

    @register("psnr_y", higher_is_better=True, aliases=("psnr",))
    def _psnr(device="cpu"):
        return psnr_y                       # callable(sr, gt) -> float, frames (H, W, 3) uint8 RGB

Kinds: ``frame`` (scored per frame pair, averaged per clip, then over clips). Later kinds (``set``
for FID, ``clip`` for VMAF / temporal metrics) plug in beside it. A factory that cannot run (weights
missing) raises MetricUnavailable with the file to get and where to put it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from sdatc.errors import SdatcError


class MetricUnavailable(SdatcError):
    """A metric that cannot run here (e.g. its weights are missing); the message says what to get."""


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    factory: Callable[..., Callable]
    higher_is_better: bool
    kind: str = "frame"
    description: str = ""


_REGISTRY: dict[str, MetricSpec] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *, higher_is_better: bool, kind: str = "frame", aliases: tuple[str, ...] = (),
             description: str = ""):
    def deco(factory):
        _REGISTRY[name] = MetricSpec(name, factory, higher_is_better, kind, description or (factory.__doc__ or "").strip())
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


def _load_builtin() -> None:
    from sdatc.metrics import builtin  # noqa: F401  (registers on import)

"""Image/video quality metrics behind one registry (``get_metric(name)``, ``build_metric(name, ctx)``)."""

from sdatc.metrics.registry import (
    MetricContext,
    MetricSpec,
    MetricUnavailable,
    build_metric,
    get_metric,
    metric_names,
    register,
)

__all__ = ["MetricContext", "MetricSpec", "MetricUnavailable", "build_metric", "get_metric", "metric_names", "register"]

"""Image/video quality metrics in one mapping (``METRICS``; ``get_metric(name)``, ``build_metric(name, ctx)``)."""

from sdatc.errors import MetricUnavailable
from sdatc.metrics.base import MetricContext
from sdatc.metrics.registry import METRICS, MetricSpec, build_metric, get_metric, metric_names

__all__ = ["METRICS", "MetricContext", "MetricSpec", "MetricUnavailable", "build_metric", "get_metric", "metric_names"]

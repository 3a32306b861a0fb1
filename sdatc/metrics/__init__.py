"""Image/video quality metrics behind one registry (``get_metric(name)``)."""

from sdatc.metrics.registry import MetricSpec, MetricUnavailable, get_metric, metric_names, register

__all__ = ["MetricSpec", "MetricUnavailable", "get_metric", "metric_names", "register"]

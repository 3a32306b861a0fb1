"""Checks of single settings shared by several config dataclasses (called from their ``__post_init__``;
a ValueError there becomes one line naming the config file and key)."""

from __future__ import annotations

import math


def check_device(value: str, key: str = "device") -> None:
    """``auto`` or a device torch knows (``cpu``, ``cuda``, ``cuda:1``, ``mps``...)."""
    if value == "auto":
        return
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{key}: unknown device {value!r} (auto, cpu, cuda or cuda:N)") from None


def check_fps(value: float, key: str = "fps") -> None:
    """A frame rate: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a frame rate > 0, got {value!r}")

"""A tiny captioner plug-in for tests (``prompt.captioner: "captioner_plugin:tags"``): one tag per frame from its
mean brightness, as RAM / DAPE would give tags per frame. Not a test module."""

import numpy as np

WEIGHTS_HELP = "the tiny test captioner's weights (any file: its content is read as a tag prefix)"


def tags(frames: np.ndarray, weights) -> list[str]:
    prefix = weights.read_text().strip()
    return [f"{prefix} {'bright' if f.mean() > 100 else 'dark'}" for f in frames]

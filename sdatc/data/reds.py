"""Regroup the official REDS download into the BasicSR training layout (val merged as clips 240-269).

    regroup_reds("datasets/REDS", "datasets/REDS/train_sharp_all")   # links; copy=True copies

Input: ``<root>/train_sharp/000..239/%08d.png`` and ``<root>/val_sharp/000..029/%08d.png`` (as
unzipped from the REDS site). Output: ``<out>/000..269/``, where 240-269 are val 000-029. Inputs are
never modified; the output folder is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sdatc.data.video import list_frame_files
from sdatc.errors import SdatcError
from sdatc.utils import atomic_dir


def regroup_reds(root: str | Path, out: str | Path, copy: bool = False, frames: int = 100) -> dict[str, Path]:
    """Build ``out`` with 270 clip folders (symlinks, or copies); returns {clip: source}."""
    root, out = Path(root), Path(out)
    plan: dict[str, Path] = {}
    for sub, first, count in (("train_sharp", 0, 240), ("val_sharp", 240, 30)):
        for i in range(count):
            src = root / sub / f"{i:03d}"
            if not src.is_dir():
                raise SdatcError(f"REDS clip missing: {src} "
                                 f"(expected {root}/train_sharp/000-239 and {root}/val_sharp/000-029)")
            n = len(list_frame_files(src))
            if n != frames:
                raise SdatcError(f"{src} holds {n} frames, REDS clips have {frames}")
            plan[f"{first + i:03d}"] = src
    if out.exists():
        raise SdatcError(f"{out} exists already; remove it or choose another output folder")
    with atomic_dir(out) as tmp:
        for name, src in plan.items():
            if copy:
                shutil.copytree(src, tmp / name)
            else:
                os.symlink(src.resolve(), tmp / name, target_is_directory=True)
    return plan

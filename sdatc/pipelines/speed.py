"""The speed path of the denoiser: channels_last weights, TF32 on CUDA, and an optional ``torch.compile``.

    predict = speed_up(model, device, compile=True)   # once, after the model is on its device, in eval mode
    out = predict(z_t, t, z_c)                          # SDATC: exactly model.predict's arguments
    out = predict(z, t, num_frames, chunk)              # UltraVSR: likewise

What :func:`speed_up` does (docs/decisions.md A44):

* ``channels_last`` for the UNet (with its Sites' CAPM / RTS modules and LoRA layers) and the guidance
  encoder; on CUDA the VAE too. Values are unchanged; convolution kernels differ, so outputs move by float
  rounding only (tested).
* on CUDA, TF32 for fp32 matmuls and convolutions (``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32``): process-wide flags, set once with a printed note. It changes fp32
  results at TF32's precision (about 1e-3 relative); bf16 / fp16 autocast runs are unaffected. ``tf32=False``
  keeps full fp32.
* ``compile=True``: the denoiser is ``torch.compile(model.predict, dynamic=False)``, one graph with no graph
  break (``tests/models/test_compile.py``). Each new input shape (tile or window size, frame count) or
  autocast / grad mode compiles once more; timesteps never do: they enter the graph as a tensor (N,).
  Inputs are made contiguous first, so views of different tiles share one graph. Mode: inductor's default;
  ``"max-autotune-no-cudagraphs"`` is accepted. Modes with CUDA graphs are refused: their outputs are
  overwritten by the next call, and the pipelines keep outputs across calls (tile blending, trajectories).

The compiled function runs whatever autocast the caller has entered (``SDATCPipeline`` calls the denoiser
inside ``torch.autocast``); it is guarded on that state, so fp32 and bf16 calls each get their own graph.
The model's parameters change memory layout in place (``save_pretrained`` still writes contiguous tensors).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from sdatc.errors import SdatcError

COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call (``$CXX``, else g++ / clang++ on macOS), or None."""
    name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    return shutil.which(name)


def c_compiler() -> str | None:
    """The C compiler Triton builds its launchers with (``$CC``, else cc / gcc / clang), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def enable_tf32() -> bool:
    """TF32 for fp32 matmuls and cuDNN convolutions, process-wide; prints a note when it switches them on.
    Returns whether anything changed."""
    if torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print("note: TF32 on for fp32 matmuls and convolutions on CUDA "
          "(process-wide; speed_up(tf32=False) keeps full fp32)")
    return True


@torch.no_grad()
def to_channels_last(module: nn.Module) -> None:
    """Every 4-D parameter and buffer of ``module`` in channels_last, in place (``module.to(memory_format=...)``
    would fail on the 5-D Conv3d weights of STAM)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.ndim == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def speed_up_undone(model: nn.Module):
    """What :func:`speed_up` changes, undone when the block ends: the process-wide TF32 flags (and float32
    matmul precision) and the memory layout of every parameter and buffer of ``model`` (values untouched).
    For a pipeline built on a model that keeps training (the trainer's validation)."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    layouts = [(t, t.stride()) for t in (*model.parameters(), *model.buffers())]
    try:
        yield model
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[:2]
        torch.set_float32_matmul_precision(flags[2])
        with torch.no_grad():
            for t, stride in layouts:
                if t.stride() != stride:  # same values, the strides it had (Parameter objects kept)
                    t.data = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def _timesteps(t, z: Tensor) -> Tensor:
    """t (a number, a 0-d / (1,) tensor or one per sample) as a contiguous (N,) tensor on z's device, as
    ``predict`` would broadcast it; a Python int would otherwise be a constant of the graph (one compile per
    timestep)."""
    t = torch.as_tensor(t, device=z.device)
    return (t.reshape(-1).expand(z.shape[0]) if t.numel() == 1 else t).contiguous()


def speed_up(model: nn.Module, device: str | torch.device, compile: bool = False, *,
             mode: str | None = None, channels_last: bool = True, tf32: bool = True,
             backend: str | Callable = "inductor") -> Callable[..., Tensor]:
    """Prepare ``model`` (SDATC or UltraVSR, on ``device``) for fast denoising; returns its denoiser.

    Args:
        model: has ``unet`` (and ``guidance``, ``vae``, where present) and ``predict``; changed in place
            (memory layout only).
        device: where the model runs; CUDA-only settings (TF32, the VAE's layout) follow it.
        compile: return a ``torch.compile`` d ``model.predict`` (dynamic=False); else the plain one.
        mode: ``None`` / ``"default"`` or ``"max-autotune-no-cudagraphs"`` (long autotuning at the first
            call of each shape).
        channels_last: put the convolution weights in channels_last.
        tf32: on CUDA, allow TF32 for fp32 matmuls and convolutions (process-wide).
        backend: the ``torch.compile`` backend (tests pass cheap ones).

    Returns:
        ``fn`` with ``model.predict``'s arguments and output.
    """
    device = torch.device(device)
    if mode not in COMPILE_MODES:
        raise SdatcError(f"compile mode {mode!r} is not supported (one of {', '.join(map(str, COMPILE_MODES))}); "
                         "modes with CUDA graphs overwrite outputs the pipelines still hold")
    if compile and backend == "inductor":
        if device.type == "cpu" and cpp_compiler() is None:
            raise SdatcError("compile on the CPU needs a C++ compiler for inductor (g++, or $CXX): none found; "
                             "install one or run without compile")
        if device.type == "cuda" and c_compiler() is None:
            raise SdatcError("compile on CUDA needs a C compiler for Triton (cc / gcc, or $CC): none found; "
                             "install one or run without compile")
    if device.type == "cuda" and tf32:
        enable_tf32()
    if channels_last:
        parts = ["unet", "guidance"] + (["vae"] if device.type == "cuda" else [])
        for name in parts:
            part = getattr(model, name, None)
            if part is not None:
                to_channels_last(part)
    if not compile:  # model.predict itself (a partial adds no Python frame)
        denoise = functools.partial(model.predict)
        denoise.compiled = False
        return denoise
    predict = torch.compile(model.predict, dynamic=False, backend=backend,
                            **({"mode": mode} if mode not in (None, "default") else {}))

    @functools.wraps(model.predict)
    def denoise(z: Tensor, t, *args, **kwargs) -> Tensor:
        args = tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
        return predict(z.contiguous(), _timesteps(t, z), *args, **kwargs)

    denoise.compiled = True
    return denoise

"""Restore a folder of compressed clips: model loading, per-clip I/O, clips claimed by several processes.

    python scripts/infer.py --config configs/infer/sdatc.yaml --input clips/ --output out/ \
        pretrained=weights/stable-diffusion-2-1-base checkpoint=weights/sdatc
    accelerate launch --num_processes 8 scripts/infer.py --config ... # 8 GPUs take clips one at a time

Each clip becomes ``OUT/<name>.mp4`` (same frame count and frame times, 4x size, audio copied; the
input's sample aspect ratio, rotation, colour tags and bit depth kept) and, with ``save_frames=true``,
``OUT/<name>/%08d.png``; both are written under temporary names. A failing clip is reported and the
others go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from sdatc.config import load_config, resolve_config_path
from sdatc.data.video import (
    X264_PRESETS,
    FrameWriter,
    VideoMeta,
    VideoReader,
    VideoWriter,
    list_clips,
)
from sdatc.errors import SdatcError, os_error, os_reason
from sdatc.models.backbone import ENV_SD21, SD21_HELP, resolve_pretrained
from sdatc.models.dcm import DCM
from sdatc.models.saving import CONFIG_NAME
from sdatc.models.sdatc import SDATC, WEIGHTS_NAME, ModelConfig
from sdatc.models.ultravsr import WEIGHTS_NAME as ULTRAVSR_WEIGHTS
from sdatc.models.ultravsr import UltraVSR, UltraVSRConfig
from sdatc.pipelines.dcm_pipeline import Bicubic, DCMPipeline
from sdatc.pipelines.prompt import PromptConfig, clip_prompt, load_captioner, sidecar_path
from sdatc.pipelines.restore import PipelineConfig, RestorePipeline, cast_weights
from sdatc.pipelines.sampler import respaced_timesteps
from sdatc.pipelines.sdatc_pipeline import SDATCPipeline
from sdatc.pipelines.ultravsr import UltraVSRPipelineConfig, UltraVSRRunner
from sdatc.utils import ClipClaim, natural_key, process_state, shared_run_id, tqdm


@dataclasses.dataclass
class InferConfig:
    """Settings of ``scripts/infer.py``."""

    mode: Literal["sdatc", "ultravsr", "dcm", "bicubic"] = "sdatc"  # dcm: the DCM alone (preview, DCM-only baseline)
    input: str | None = None  # a video file, a frame folder, or a folder of clips
    output: str | None = None
    model_config: str = "configs/model/sdatc_sd21.yaml"  # used when the checkpoint carries no config.yaml
    model_overrides: list[str] = dataclasses.field(default_factory=list)
    pretrained: str | None = None  # SD 2.1-base diffusers folder (else $SDATC_SD21_PATH)
    checkpoint: str | None = None  # trained SDATC modules: a save_pretrained folder or a .safetensors file
    allow_random_weights: bool = False  # run without SD 2.1 / checkpoint weights (tests, smoke runs)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)  # the UNet's text (sdatc, ultravsr)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)  # mode sdatc (dcm: its tiling)
    ultravsr: UltraVSRPipelineConfig = dataclasses.field(default_factory=UltraVSRPipelineConfig)  # mode ultravsr
    device: str = "auto"  # auto: this process's GPU if any, else CPU
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU; bf16 also on CPU
    save_frames: bool = False
    overwrite: bool = False
    output_crf: int = 15  # x264 quality of the restored mp4 (lower is better)
    output_preset: str = "medium"
    output_pix_fmt: Literal["auto", "yuv420p", "yuv420p10le"] = "auto"  # auto: 10-bit for >8-bit input
    fps: float = 25.0  # frame rate given to clips that are frame folders
    copy_audio: bool = True
    compile: bool = False  # torch.compile the denoiser (modes sdatc / ultravsr); channels_last and TF32 either way

    def __post_init__(self):  # settings that would fail only after a clip is restored are checked at load
        from sdatc.checks import check_device, check_fps

        check_device(self.device)
        check_fps(self.fps)
        if self.output_preset not in X264_PRESETS:
            raise ValueError(f"output_preset {self.output_preset!r} is not an x264 preset ({', '.join(X264_PRESETS)})")
        if self.mode in ("dcm", "bicubic") and not self.prompt.empty:
            raise ValueError(f"prompt.* conditions the diffusion UNet: mode {self.mode} has none "
                             "(modes sdatc, ultravsr)")


PREVIEW_CONFIG = "configs/infer/preview.yaml"
SDATC_CONFIG = "configs/infer/sdatc.yaml"


def default_config() -> str:
    """infer.py's config when none is given: full SDATC when SD 2.1 weights are configured
    ($SDATC_SD21_PATH), else the built-in preview model (a light DCM, no downloads)."""
    return SDATC_CONFIG if os.environ.get(ENV_SD21) else PREVIEW_CONFIG


NO_PUBLISHED_WEIGHTS = ("no trained SDATC or UltraVSR weights are published: train them (docs/training.md) or use "
                        "the preview model (infer.py without --config)")
RANDOM_WEIGHTS_HINT = ("allow_random_weights=true runs random weights, for smoke tests; with --config "
                       "configs/infer/tiny.yaml it takes seconds on a CPU (the full-size model takes hours per clip)")


def _checkpoint_kind(ckpt: Path) -> str | None:
    """Which system's modules ``ckpt`` (a folder or a .safetensors file) holds: "sdatc", "ultravsr" or None."""
    from safetensors import safe_open

    if ckpt.is_dir():
        names = (("sdatc", WEIGHTS_NAME), ("ultravsr", ULTRAVSR_WEIGHTS))
        has = [kind for kind, name in names if (ckpt / name).is_file()]
        return has[0] if len(has) == 1 else None
    try:
        with safe_open(str(ckpt), "pt") as f:
            fmt = (f.metadata() or {}).get("format", "")
    except Exception:
        return None  # not readable: the load below says so
    return "ultravsr" if fmt.startswith("ultravsr/") else "sdatc" if fmt.startswith("sdatc/") else None


def _weights_file(ckpt: Path, name: str) -> Path:
    """The weights file of checkpoint ``ckpt`` (a folder holding ``name``, or the file), verified against the
    ``checksums.json`` that lists it; a folder without one loads unverified, with a note."""
    from sdatc.models.saving import CHECKSUMS_NAME, verify_weights

    weights = ckpt / name if ckpt.is_dir() else ckpt
    if not weights.is_file():
        raise SdatcError(f"no {name} in {ckpt}")
    if not verify_weights(weights):
        print(f"note: {weights} is not listed in a {CHECKSUMS_NAME} (written by an older sdatc, or by hand): "
              "loaded unverified")
    return weights


def _load_weights(weights: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(weights))
    except Exception as e:  # a damaged or foreign file
        raise SdatcError(f"cannot read {weights}: {(str(e).splitlines() or [''])[0][:200]}") from None


def check_model(cfg: InferConfig) -> tuple[ModelConfig | UltraVSRConfig | None, Path | None]:
    """Validate the model settings without building anything: the checkpoint and its weights file exist,
    the model config parses. Runs before any clip is looked at, so a broken setting is an error even when
    every output exists already. Returns (model config, checkpoint); (None, None) for bicubic."""
    if cfg.mode == "bicubic":
        return None, None
    ckpt = resolve_config_path(cfg.checkpoint) if cfg.checkpoint else None
    weights_name = ULTRAVSR_WEIGHTS if cfg.mode == "ultravsr" else WEIGHTS_NAME
    if ckpt is not None and not ckpt.exists():
        raise SdatcError(f"checkpoint not found: {ckpt} (config key checkpoint: a folder holding {weights_name} "
                         f"and {CONFIG_NAME}, as written by train.py, or a .safetensors file); {NO_PUBLISHED_WEIGHTS}")
    if ckpt is not None:
        kind = _checkpoint_kind(ckpt)
        want = "ultravsr" if cfg.mode == "ultravsr" else "sdatc"
        if kind is not None and kind != want:
            hint = ("mode=sdatc (configs/infer/sdatc.yaml, or mode=dcm for its DCM)" if kind == "sdatc"
                    else "mode=ultravsr (configs/infer/ultravsr.yaml)")
            raise SdatcError(f"{ckpt} is an {'SDATC' if kind == 'sdatc' else 'UltraVSR'} checkpoint, this config "
                             f"runs mode={cfg.mode}: use {hint}")
    if ckpt is not None and ckpt.is_dir() and not (ckpt / weights_name).is_file():
        raise SdatcError(f"no {weights_name} in {ckpt}")
    config_file = ckpt / CONFIG_NAME if ckpt is not None and ckpt.is_dir() and (ckpt / CONFIG_NAME).is_file() else cfg.model_config
    overrides = list(cfg.model_overrides) + ([f"backbone.pretrained={cfg.pretrained}"] if cfg.pretrained else [])
    return load_config(UltraVSRConfig if cfg.mode == "ultravsr" else ModelConfig, config_file, overrides), ckpt


def build_model(cfg: InferConfig) -> SDATC | DCM:
    """The SDATC model with SD 2.1 and the trained modules (or the DCM alone with ``mode=dcm``), or
    an error saying what is missing."""
    if cfg.mode == "bicubic":
        return Bicubic(4)
    model_cfg, ckpt = check_model(cfg)
    if cfg.mode == "ultravsr":
        return _build_diffusion(cfg, UltraVSR, model_cfg, ckpt, ULTRAVSR_WEIGHTS)
    if cfg.mode == "dcm":
        return _build_dcm(cfg, model_cfg, ckpt)
    return _build_diffusion(cfg, SDATC, model_cfg, ckpt, WEIGHTS_NAME)


def _build_diffusion(cfg: InferConfig, cls, model_cfg, ckpt: Path | None, weights_name: str):
    """SDATC or UltraVSR on SD 2.1 with its trained modules, or the error saying what is missing."""
    if resolve_pretrained(model_cfg.backbone) is None and not cfg.allow_random_weights:
        raise SdatcError(f"no SD 2.1 weights: set pretrained=PATH or ${ENV_SD21} ({SD21_HELP}); {RANDOM_WEIGHTS_HINT}")
    if ckpt is None and not cfg.allow_random_weights:
        name = "SDATC" if cls is SDATC else "UltraVSR"
        raise SdatcError(f"no trained {name} modules: set checkpoint=PATH (a folder with {weights_name} and "
                         f"{CONFIG_NAME} from train.py; {NO_PUBLISHED_WEIGHTS}); allow_random_weights=true runs "
                         "untrained modules")
    weights = _weights_file(ckpt, weights_name) if ckpt is not None else None
    model = cls.from_config(model_cfg)
    if weights is not None:
        model.load_trainable_state_dict(_load_weights(weights), str(weights))
    return model.eval()


def _build_dcm(cfg: InferConfig, model_cfg: ModelConfig, ckpt: Path | None) -> DCM:
    if ckpt is None and not cfg.allow_random_weights:
        raise SdatcError(f"no DCM weights: set checkpoint=PATH (a folder with {WEIGHTS_NAME} and {CONFIG_NAME} from "
                         "train.py stage 0 or 1, e.g. assets/preview); allow_random_weights=true runs an untrained DCM")
    dcm = DCM(model_cfg.dcm)
    if ckpt is not None:
        weights = _weights_file(ckpt, WEIGHTS_NAME)
        state = {k[4:]: v for k, v in _load_weights(weights).items() if k.startswith("dcm.")}
        if not state:
            raise SdatcError(f"{weights} holds no DCM weights (keys dcm.*)")
        result = dcm.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise SdatcError(f"{weights}: the DCM weights do not match the DCM config ({len(result.missing_keys)} missing, "
                             f"e.g. {result.missing_keys[:3]}; {len(result.unexpected_keys)} unexpected, e.g. "
                             f"{result.unexpected_keys[:3]})")
    return dcm.eval()


def describe_model(cfg: InferConfig, model, device: torch.device | None = None, dtype: torch.dtype | None = None) -> str:
    """One line saying which model runs (printed by infer.py), and in which dtype when given."""
    n = sum(p.numel() for p in model.parameters())
    weights = cfg.checkpoint or "untrained (random weights)"
    if cfg.mode == "bicubic":
        return "model: bicubic x4 (MATLAB imresize), the baseline: no weights"
    if cfg.mode == "dcm":
        line = f"model: DCM only ({n / 1e6:.2f} M parameters, no diffusion), weights {weights}"
    elif cfg.mode == "ultravsr":
        u = cfg.ultravsr
        line = (f"model: UltraVSR (one step), SD 2.1 from {model.backbone_source}, modules {weights}, DRS "
                f"{u.drs.estimator}, windows of {u.window.length}, chunks of {u.chunk_frames or 'all'} frames")
    else:
        s = cfg.pipeline.sampler
        line = (f"model: SDATC, SD 2.1 from {model.backbone_source}, modules {weights}, "
                f"{len(respaced_timesteps(s.start_t, s.steps))} {s.kind} steps")
    if dtype is None:
        return line
    where = f" on {device}" if device is not None else ""
    if dtype == torch.float32:
        return f"{line}; fp32{where}"
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    decoder = " (VAE decoder fp32)" if dtype == torch.float16 and cfg.mode in ("sdatc", "ultravsr") else ""
    return f"{line}; {name} weights and autocast{where}{decoder}"


def make_pipeline(model, cfg: InferConfig, device, dtype, progress: bool = True):
    if cfg.mode == "bicubic":  # exact MATLAB bicubic: never tiled
        untiled = dataclasses.replace(cfg.pipeline, tiling=dataclasses.replace(cfg.pipeline.tiling, mode="off"))
        return DCMPipeline(model, untiled, device=device, dtype=torch.float32, progress=progress)
    if cfg.mode == "dcm":
        return DCMPipeline(model, cfg.pipeline, device=device, dtype=dtype, progress=progress)
    if cfg.mode == "ultravsr":
        return UltraVSRRunner(model, cfg.ultravsr, device=device, dtype=dtype, progress=progress, compile=cfg.compile)
    return RestorePipeline(model, cfg.pipeline, device=device, dtype=dtype, progress=progress, compile=cfg.compile)


def pick_device(cfg: InferConfig, state) -> tuple[torch.device, torch.dtype]:
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdatcError(f"device {device} requested but CUDA is not available")
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if cfg.dtype != "auto":
        dtype = names[cfg.dtype]
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    if device.type == "cpu" and dtype == torch.float16:
        raise SdatcError("dtype fp16 needs a GPU; use bf16 (CPU autocast) or fp32 on the CPU")
    return device, dtype


def outputs_of(cfg: InferConfig, name: str) -> list[Path]:
    out = Path(cfg.output)
    return [out / f"{name}.mp4"] + ([out / name] if cfg.save_frames else [])


# --------------------------------------------------------------------------- inputs are never written


def _resolve(path: Path, what: str) -> Path:
    try:
        return path.resolve()
    except RuntimeError:  # Python < 3.13 says "Symlink loop" this way
        raise SdatcError(f"{what} {path}: a symlink loop") from None
    except OSError as e:
        raise os_error(path, e, f"{what}") from None


def _contains(folder: Path, path: Path) -> bool:
    """``path`` is ``folder`` or lies inside it (both resolved); also through a bind mount or a hard-linked
    file, by comparing the identity (device, inode) of ``path`` and its existing parents with ``folder``'s."""
    if path == folder or folder in path.parents:
        return True
    try:
        target = folder.stat()
    except OSError:
        return False
    for p in (path, *path.parents):
        try:
            st = p.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


def check_output(cfg: InferConfig) -> None:
    """The output folder lies outside a folder given as input (symlinks, ``..`` and bind mounts resolved)
    and can be written: a hidden probe file is created and removed there (or, while it does not exist, in
    its nearest existing parent). Called before the clips are listed, so nothing is loaded yet."""
    out = _resolve(Path(cfg.output), "output")
    src = _resolve(Path(cfg.input), "input")
    if src.is_dir() and _contains(src, out):
        raise SdatcError(f"output {cfg.output} must not be inside the input folder {cfg.input} "
                         "(inputs are never modified)")
    if _contains(src, out):
        raise SdatcError(f"output {cfg.output} is {'the' if out == src else 'below the'} input clip {cfg.input}: "
                         "--output is a folder (inputs are never modified)")
    _check_writable(Path(cfg.output))


def check_paths(cfg: InferConfig, clips: dict[str, Path]) -> None:
    """Refuse, before any work, a run that could write over or delete an input: no output (the mp4, the
    frames folder, their temporary files and the lock, all in the output folder) may be an input clip,
    lie inside one, or be a folder above an input frame folder, whatever ``overwrite`` says (symlinks,
    ``..``, bind mounts and hard links resolved)."""
    out = _resolve(Path(cfg.output), "output")
    for name, clip in clips.items():
        clip = _resolve(clip, "input")
        if _contains(clip, out):
            raise SdatcError(f"output {cfg.output} is inside the input clip {clip} (inputs are never modified)")
        for o in outputs_of(cfg, name):
            o = _resolve(o, "output")
            inside, holds = _contains(clip, o), _contains(o, clip)
            if inside or holds:
                what = "is" if inside and holds else "is inside" if inside else "holds"
                raise SdatcError(f"output {o} {what} the input clip {clip}: choose another --output "
                                 "(inputs are never modified, whatever overwrite says)")


def _check_writable(out: Path) -> None:
    """The output folder (or, while it does not exist, its nearest existing parent) is a folder where files
    can be created: a hidden probe file is written and removed."""
    folder = out
    while not folder.exists() and folder != folder.parent:
        if os.path.lexists(folder):  # a dangling symlink
            raise SdatcError(f"output {out}: {folder} is a symlink to nothing")
        folder = folder.parent
    if not folder.is_dir():
        raise SdatcError(f"output {out} is a file, not a folder" if folder == out else
                         f"output {out}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sdatc-probe.", dir=folder)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise SdatcError(f"output folder {folder} cannot be written: {os_reason(e)}") from None


def output_pix_fmt(meta: VideoMeta, choice: str = "auto") -> str:
    """The restored mp4's pixel format: ``choice``, or for ``auto`` yuv420p10le when the input has more
    than 8 bits per component, else yuv420p (the restoration itself works on 8-bit RGB either way)."""
    if choice == "auto":
        return "yuv420p10le" if meta.bit_depth > 8 else "yuv420p"
    if choice not in ("yuv420p", "yuv420p10le"):
        raise SdatcError(f"output_pix_fmt {choice!r} is not one of auto, yuv420p, yuv420p10le")
    return choice


def write_restored(stream, src: Path, mp4: Path | None, frames_dir: Path | None = None, crf: int = 15,
                   preset: str = "medium", copy_audio: bool = True, fps: float = 25.0, name: str | None = None,
                   progress: bool = True, pix_fmt: str = "auto", overwrite: bool = True) -> int:
    """Restore the clip ``src`` (a video or a frame folder at ``fps``) through ``stream(reader, n)`` into
    ``mp4`` (and PNGs in ``frames_dir``; either may be None), each under a temporary name; returns the frames
    written. An existing output is replaced with ``overwrite`` (else an error); an output that is the input,
    or holds it, is always an error. Output frame i is input frame i: it keeps its timestamp; SAR, rotation,
    colour tags and HDR10 metadata are kept."""
    for o in filter(None, (mp4, frames_dir)):  # run() checked already (check_paths); restore_file did not
        s, r = src.resolve(), o.resolve()
        if _contains(s, r) or _contains(r, s):
            raise SdatcError(f"output {o} is or holds the input {src} (inputs are never modified)")
    reader = VideoReader(src, fps=fps)
    meta, n, name = reader.meta, len(reader), name or src.stem
    if meta.frames_from == "packets":  # nothing to check the count against (no index, no declared duration)
        print(f"note: {name}: the container declares no frame count or duration; restoring the {n} frames found")
    if meta.color.hdr:
        print(f"note: {name} is HDR ({meta.color.hdr}): its tags are kept, but the model was trained on SDR video")
    audio = src if copy_audio and meta.has_audio else None
    writer = (VideoWriter(mp4, fps=meta.rate or fps, crf=crf, preset=preset, audio_from=audio, overwrite=overwrite,
                          pix_fmt=output_pix_fmt(meta, pix_fmt), source=meta) if mp4 else contextlib.nullcontext())
    with writer:
        frames = FrameWriter(frames_dir, overwrite=overwrite) if frames_dir else contextlib.nullcontext()
        with frames:
            count = 0
            for i, frame in enumerate(tqdm(stream(reader, n), total=n, desc=name, unit="fr", leave=False,
                                           disable=not progress)):
                if mp4:
                    writer.write(frame, pts=reader.timestamps[i] if i < len(reader.timestamps) else None)
                if frames_dir:
                    frames.write(frame)
                count += 1
            if count != n:
                raise SdatcError(f"{name}: wrote {count} of {n} frames")
            if mp4:
                writer.end_pts = reader.end_pts
    return n


def restore_clip(pipe, cfg: InferConfig, name: str, src: Path, captioner=None) -> int:
    """Restore one clip to its outputs (without ``overwrite``: those that do not exist yet); returns the
    number of frames written. ``captioner``: the loaded ``prompt.captioner`` plug-in, if any."""
    mp4, *frames_dir = [o if cfg.overwrite or not o.exists() else None for o in outputs_of(cfg, name)]
    kw = {}
    if cfg.mode in ("sdatc", "ultravsr") and not cfg.prompt.empty:  # encoded once per clip by the pipeline
        kw["prompt"] = clip_prompt(cfg.prompt, src, lambda: VideoReader(src, fps=cfg.fps).read_all(), captioner)
    if isinstance(pipe, SDATCPipeline):
        stream = functools.partial(pipe.stream, **kw)
    elif isinstance(pipe, UltraVSRRunner):  # DRS's bitstream estimator reads the clip's own file
        stream = functools.partial(pipe.restore, source=src, **kw)
    else:
        stream = pipe.restore
    return write_restored(stream, src, mp4, frames_dir[0] if frames_dir else None, crf=cfg.output_crf,
                          preset=cfg.output_preset, copy_audio=cfg.copy_audio, fps=cfg.fps, name=name,
                          progress=pipe.progress, pix_fmt=cfg.output_pix_fmt, overwrite=cfg.overwrite)


def _output_identity(cfg: InferConfig, name: str) -> tuple | None:
    """(inode, mtime) of each output of ``name``, or None if one is missing: a finished rewrite changes it."""
    try:
        return tuple((st.st_ino, st.st_mtime_ns) for st in (o.stat() for o in outputs_of(cfg, name)))
    except FileNotFoundError:
        return None


def _finished(cfg: InferConfig, name: str, before: dict) -> bool:
    """Whether ``name``'s outputs are complete: they exist (with ``overwrite``: and were rewritten during this run,
    by another of its processes or another run)."""
    now = _output_identity(cfg, name)
    return now is not None and (not cfg.overwrite or now != before[name])


STATUS_RANK = {"done": 0, "failed": 1, "finished by another process": 2, "output exists": 3}


def _merge(rows: list[dict], clips: dict) -> list[dict]:
    """One row per clip from every process's rows: what was done to it beats why it was skipped."""
    best: dict[str, tuple[int, dict]] = {}
    for r in rows:
        key = STATUS_RANK.get(r["status"], STATUS_RANK.get(r.get("reason", ""), 4))
        if r["clip"] not in best or key < best[r["clip"]][0]:
            best[r["clip"]] = (key, r)
    return sorted((r for _, r in best.values()), key=lambda r: natural_key(r["clip"]))


def _collect(out: Path, run_id: str, state, rows: list[dict], clips: dict) -> list[dict]:
    """Every process writes its own rows (``OUT/.sdatc-results-<run>-<rank>.json``, atomically); the main
    process waits for the others' files, merges them and removes them. No collective waits on work: a process
    still restoring a long clip holds no other process to the process group's timeout."""
    import json

    from sdatc.utils import atomic_write_text

    if state.num_processes == 1:
        return _merge(rows, clips)
    path = out / f".sdatc-results-{run_id}-{state.process_index}.json"
    atomic_write_text(path, json.dumps(rows))
    if not state.is_main_process:
        return rows
    everything = []
    for rank in range(state.num_processes):
        theirs = out / f".sdatc-results-{run_id}-{rank}.json"
        while not theirs.exists():  # a rank that dies ends the launch (the launcher stops the others)
            time.sleep(0.2)
        everything += json.loads(theirs.read_text())
        theirs.unlink()
    return _merge(everything, clips)


def _try_clip(pipe, cfg: InferConfig, name: str, path: Path, out: Path, run_id: str, before: dict,
              rank: int, captioner=None) -> tuple[dict | None, ClipClaim]:
    """Claim and restore one clip; its row (None when another process of this run holds it: that one reports
    it) and the claim (a refused one says who holds the lock and when it expires)."""
    t0 = time.perf_counter()
    row = {"clip": name, "status": "done", "frames": 0, "seconds": 0.0, "rank": rank}
    claim = ClipClaim(out, name, outputs=outputs_of(cfg, name), run=run_id)  # other processes may share `out`
    try:
        acquired = claim.acquire()
    except OSError as e:  # e.g. an output folder that cannot be written: this clip fails, the others go on
        return {**row, "status": "failed", "error": f"cannot create the lock {claim.path}: {e.strerror or e}"}, claim
    if not acquired:
        if claim.holder.get("run") == run_id:
            return None, claim
        return {**row, "status": "skipped", "held": True,
                "reason": f"being restored by another process ({claim.describe_holder()})"}, claim
    try:
        if _finished(cfg, name, before):
            row.update(status="skipped", reason="finished by another process")
        else:
            row["frames"] = restore_clip(pipe, cfg, name, path, captioner)
            if isinstance(pipe, UltraVSRRunner) and pipe.last_drs is not None:
                d, t, how = pipe.last_drs
                row["drs"] = f"d={d:.3f}, t={t} ({how})"
    except Exception as e:  # one bad clip must not stop the others
        row.update(status="failed", error=str(e) if isinstance(e, SdatcError) else f"{type(e).__name__}: {e}")
    finally:
        claim.release()
    row["seconds"] = time.perf_counter() - t0
    return row, claim


def run(cfg: InferConfig, progress: bool = True) -> list[dict]:
    """Restore every clip of ``cfg.input``. Processes take clips one at a time through their locks (uneven
    clips balance; several runs may share the output folder); returns this process's results, on the main
    process every process's."""
    if not cfg.input or not cfg.output:
        raise SdatcError("both input (--input) and output (--output) are required")
    check_output(cfg)  # before any work: the output folder is writable and outside a folder given as input
    skipped: list[Path] = []
    clashes: dict[str, list[Path]] = {}  # clips of one name (a.mp4, a.mkv) would share their outputs: they fail
    clips = list_clips(cfg.input, skipped, clashes=clashes)
    if cfg.prompt.sidecar:  # the clips' prompt sidecars are expected beside them, not stray files
        sidecars = {sidecar_path(p) for p in clips.values()}
        skipped = [p for p in skipped if p not in sidecars]
    check_paths(cfg, clips)  # no output may touch an input clip
    out = Path(cfg.output).resolve()
    check_model(cfg)  # a broken model setting is an error even when every output exists
    captioner = load_captioner(cfg.prompt) if cfg.prompt.captioner is not None else None  # its weights too
    state = process_state()
    main = state.is_main_process
    if skipped and main:
        print(f"note: skipped {len(skipped)} entries that are neither videos nor frame folders: "
              f"{', '.join(p.name for p in skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    before = {n: _output_identity(cfg, n) for n in clips}  # as they were before any process started
    run_id = shared_run_id(state)  # after every process has looked at the outputs
    rank = state.process_index
    todo = [(n, p) for n, p in clips.items() if cfg.overwrite or before[n] is None]
    results = [{"clip": n, "status": "skipped", "frames": 0, "seconds": 0.0, "rank": rank, "reason": "output exists"}
               for n in clips if main and not cfg.overwrite and before[n] is not None]
    if main:
        results += [{"clip": n, "status": "failed", "frames": 0, "seconds": 0.0, "rank": rank,
                     "error": f"{len(ps)} clips share this name ({', '.join(p.name for p in ps)}) and would write "
                              f"the same {n}.mp4: rename all but one"} for n, ps in clashes.items()]
    if todo:
        device, dtype = pick_device(cfg, state)
        if device.type == "cpu" and state.num_processes > 1:  # share the cores: oversubscribed threads spin
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
        model = cast_weights(build_model(cfg), dtype).to(device)  # weights in the run's dtype, cast once
        if main:
            print(describe_model(cfg, model, device, dtype))
        pipe = (SDATCPipeline(model, cfg.pipeline, device, dtype, progress, compile=cfg.compile) if cfg.mode == "sdatc"
                else make_pipeline(model, cfg, device, dtype, progress))
        held = []  # clips another run holds: tried again at the end
        for name, path in tqdm(todo, desc=f"clips (rank {rank})", unit="clip", disable=not progress):
            if not cfg.overwrite and _finished(cfg, name, before):  # the process that did it reports it too
                results.append({"clip": name, "status": "skipped", "frames": 0, "seconds": 0.0, "rank": rank,
                                "reason": "finished by another process"})
                continue
            row, claim = _try_clip(pipe, cfg, name, path, out, run_id, before, rank, captioner)
            if row is not None and row.get("held"):
                held.append((name, path, claim))
            elif row is not None:
                results.append(row)
        for name, path, refused in held:  # tried again at the end, after waiting for a lock that goes stale soon
            refused.wait_until_stale()
            row, _ = _try_clip(pipe, cfg, name, path, out, run_id, before, rank, captioner)
            if row is not None:
                results.append(row)
    return _collect(out, run_id, state, results, clips)


def summary(results: list[dict]) -> str:
    done = [r for r in results if r["status"] == "done"]
    failed = [r for r in results if r["status"] == "failed"]
    frames, secs = sum(r["frames"] for r in done), sum(r["seconds"] for r in done)
    lines = [f"{len(done)} done, {sum(r['status'] == 'skipped' for r in results)} skipped (reasons below), "
             f"{len(failed)} failed; {frames} frames, {secs / frames if frames else 0:.2f} s per output frame"]
    for r in results:
        detail = r.get("error") or f"{r['frames']} frames in {r['seconds']:.1f} s" + (f"; DRS {r['drs']}" if "drs" in r else "")
        detail = r.get("reason", "") if r["status"] == "skipped" else detail
        lines.append(f"  {r['clip']}: {r['status']} (rank {r['rank']}) {detail}".rstrip())
    held = [r["clip"] for r in results if r.get("held")]
    if held:
        lines.append(f"{len(held)} clips not restored: other processes hold their locks ({', '.join(held[:5])}"
                     f"{' ...' if len(held) > 5 else ''}); rerun when they finish (exit status 1)")
    return "\n".join(lines)


def exit_status(results: list[dict]) -> int:
    """1 if a clip failed or was left to another process's lock, else 0."""
    return 1 if any(r["status"] == "failed" or r.get("held") for r in results) else 0


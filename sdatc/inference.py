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

import dataclasses
import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch

from sdatc.config import check_device, check_fps
from sdatc.data.video import X264_PRESETS, VideoReader, contains_path, list_clips, write_restored
from sdatc.errors import SdatcError, os_error, os_reason
from sdatc.models.backbone import ENV_SD21
from sdatc.pipelines import base
from sdatc.pipelines.config import PipelineConfig, UltraVSRPipelineConfig, cast_weights
from sdatc.pipelines.dcm_pipeline import DCMPipeline
from sdatc.pipelines.prompt import PromptConfig, clip_prompt, load_captioner, sidecar_path
from sdatc.pipelines.sampler import respaced_timesteps
from sdatc.pipelines.sdatc_pipeline import SDATCPipeline
from sdatc.pipelines.ultravsr import UltraVSRPipeline
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


def check_model(cfg: InferConfig):
    """The model settings checked without building anything (``base.check_model``)."""
    return base.check_model(cfg)


def build_model(cfg: InferConfig):
    """The model ``cfg`` names, with its weights (``base.build_model``), in fp32."""
    return base.build_model(cfg)


def describe_model(cfg: InferConfig, model, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> str:
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
    """The pipeline of ``cfg.mode`` around ``model`` (its weights cast to ``dtype`` there, once)."""
    if cfg.mode == "bicubic":  # exact MATLAB bicubic: never tiled
        untiled = dataclasses.replace(cfg.pipeline, tiling=dataclasses.replace(cfg.pipeline.tiling, mode="off"))
        return DCMPipeline(model, untiled, device=device, dtype=torch.float32, progress=progress)
    if cfg.mode == "dcm":
        return DCMPipeline(cast_weights(model, dtype).to(device), cfg.pipeline, device=device, dtype=dtype,
                           progress=progress)
    pipeline = UltraVSRPipeline if cfg.mode == "ultravsr" else SDATCPipeline
    return pipeline(model, cfg.ultravsr if cfg.mode == "ultravsr" else cfg.pipeline, device, dtype, progress,
                    compile=cfg.compile)


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


def check_output(cfg: InferConfig) -> None:
    """The output folder lies outside a folder given as input (symlinks, ``..`` and bind mounts resolved)
    and can be written: a hidden probe file is created and removed there (or, while it does not exist, in
    its nearest existing parent). Called before the clips are listed, so nothing is loaded yet."""
    out = _resolve(Path(cfg.output), "output")
    src = _resolve(Path(cfg.input), "input")
    if src.is_dir() and contains_path(src, out):
        raise SdatcError(f"output {cfg.output} must not be inside the input folder {cfg.input} "
                         "(inputs are never modified)")
    if contains_path(src, out):
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
        if contains_path(clip, out):
            raise SdatcError(f"output {cfg.output} is inside the input clip {clip} (inputs are never modified)")
        for o in outputs_of(cfg, name):
            o = _resolve(o, "output")
            inside, holds = contains_path(clip, o), contains_path(o, clip)
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
            # restore the clip into the outputs that do not exist yet (with overwrite: all of them)
            mp4, *frames_dir = [o if cfg.overwrite or not o.exists() else None for o in outputs_of(cfg, name)]
            prompt = None  # the UNet's text, encoded once per clip by the pipeline
            if cfg.mode in ("sdatc", "ultravsr") and not cfg.prompt.empty:
                prompt = clip_prompt(cfg.prompt, path, lambda: VideoReader(path, fps=cfg.fps).read_all(), captioner)
            stream = functools.partial(pipe.stream, prompt=prompt, source=path)  # DRS's bitstream reads the file
            row["frames"] = write_restored(stream, path, mp4, frames_dir[0] if frames_dir else None,
                                           crf=cfg.output_crf, preset=cfg.output_preset, copy_audio=cfg.copy_audio,
                                           fps=cfg.fps, name=name, progress=pipe.progress, pix_fmt=cfg.output_pix_fmt,
                                           overwrite=cfg.overwrite)
            if pipe.last_drs is not None:
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
        pipe = make_pipeline(build_model(cfg), cfg, device, dtype, progress)  # the weights cast once, to dtype
        if main:
            print(describe_model(cfg, pipe.model, device, dtype))
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
        detail = (r.get("error")
                  or f"{r['frames']} frames in {r['seconds']:.1f} s" + (f"; DRS {r['drs']}" if "drs" in r else ""))
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


"""The web app of ``scripts/app.py``: restore a clip in the browser with the models ``infer.py`` runs.

    python scripts/app.py                      # http://127.0.0.1:7860, the built-in preview model
    python scripts/app.py --sd21 weights/stable-diffusion-2-1-base --checkpoint weights/sdatc

:class:`Restorer` does the work (no gradio): models are chosen and built as ``infer.py`` builds them, a clip
is restored through ``write_restored`` (the writing code of ``infer.py``: 4x, the input's frame times and
audio kept, written under a temporary name), frames stream from reader to writer (memory flat in the
clip's length). :func:`build_app` puts it on a page; gradio is imported there only (``pip install -e
".[app]"``). One job runs at a time (the others queue and see their place); every job works in its own
temporary folder, removed when it ends or fails.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdatc.config import REPO_ROOT, check_device
from sdatc.errors import SdatcError

DEMO_CLIP = REPO_ROOT / "assets" / "demo.mp4"
VIDEO_TYPES = (".mp4", ".mkv", ".mov", ".webm", ".avi")
MIN_SIDE = 16  # pixels: smaller clips are refused (the models' windows and tiles need some room)
INSTALL_HINT = "the app needs gradio: pip install -e \".[app]\" (or bash scripts/setup.sh)"


@dataclasses.dataclass
class AppConfig:
    """Settings of ``scripts/app.py`` (its flags)."""

    host: str = "127.0.0.1"  # loopback: never public unless asked for
    port: int = 7860
    sd21: str | None = None  # SD 2.1-base folder or Hub id (else $SDATC_SD21_PATH)
    checkpoints: list[str] = dataclasses.field(default_factory=list)  # trained SDATC / UltraVSR module folders
    max_upload_mb: float = 500.0
    max_frames: int = 2000
    queue_size: int = 20  # jobs waiting at most; more are refused with a message
    demo_clip: str = str(DEMO_CLIP)
    device: str = "auto"
    dtype: str = "auto"
    output_preset: str = "medium"  # x264 preset of the restored mp4 (infer.py's default)

    def __post_init__(self):  # a bad flag is an error at start, not at the first job
        from sdatc.data.video import X264_PRESETS

        try:
            check_device(self.device, "--device")
        except ValueError as e:
            raise SdatcError(str(e)) from None
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise SdatcError(f"--dtype {self.dtype!r}: auto, fp32, bf16 or fp16")
        if self.output_preset not in X264_PRESETS:
            raise SdatcError(f"--output-preset {self.output_preset!r} is not an x264 preset "
                             f"({', '.join(X264_PRESETS)})")
        if not 0 <= self.port <= 65535:
            raise SdatcError(f"--port {self.port}: a port number 0..65535")
        if self.max_frames < 1 or self.max_upload_mb <= 0 or self.queue_size < 1:
            raise SdatcError("--max-frames, --max-upload-mb and --queue-size must be > 0")
        if not Path(self.demo_clip).is_file():
            raise SdatcError(f"--demo-clip {self.demo_clip}: no such file")


@dataclasses.dataclass
class Settings:
    """The few settings a user picks on the page (each model reads its own)."""

    steps: int = 50  # SDATC: denoising steps
    cfw_weight: float = 0.75  # SDATC: 1 fidelity, 0 realism
    colour: str = "adain"  # SDATC / UltraVSR colour fix: adain | wavelet | none
    seed: int = 0  # SDATC
    estimator: str = "clipiqa"  # UltraVSR: how d is found (clipiqa | bitstream | fixed)
    d: float = 0.5  # UltraVSR with estimator fixed

    def overrides(self, mode: str) -> list[str]:
        """infer.py's config overrides for ``mode``."""
        if mode == "sdatc":
            return [f"pipeline.sampler.steps={int(self.steps)}", f"pipeline.cfw_weight={float(self.cfw_weight)}",
                    f"pipeline.colour={self.colour}", f"pipeline.sampler.seed={int(self.seed)}"]
        if mode == "ultravsr":
            return [f"ultravsr.drs.estimator={self.estimator}", f"ultravsr.drs.d={float(self.d)}",
                    f"ultravsr.colour={self.colour}"]
        return []


@dataclasses.dataclass
class ModelChoice:
    key: str
    label: str
    config: str  # infer config
    overrides: list[str]
    missing: str | None = None  # what to set when its weights are not configured


def _checkpoint_of(kind: str, paths: list[str]) -> str | None:
    from sdatc.pipelines.base import checkpoint_kind

    for p in paths:
        if Path(p).exists() and checkpoint_kind(Path(p)) == kind:
            return p
    return None


def model_choices(cfg: AppConfig) -> dict[str, ModelChoice]:
    """The models the page offers, each with its infer config, or with what is missing to run it."""
    from sdatc.models.backbone import ENV_SD21

    sd21 = cfg.sd21 or os.environ.get(ENV_SD21)
    choices = {"preview": ModelChoice("preview", "preview (built-in light DCM, no diffusion)",
                                      "configs/infer/preview.yaml", [])}
    for key, label, config in (("sdatc", "SDATC (SD 2.1, 50 steps)", "configs/infer/sdatc.yaml"),
                               ("ultravsr", "UltraVSR (SD 2.1, one step)", "configs/infer/ultravsr.yaml")):
        ckpt = _checkpoint_of(key, cfg.checkpoints)
        need = []
        if not sd21:
            need.append("SD 2.1-base weights: start the app with --sd21 PATH (a diffusers folder or Hub id) or set "
                        f"${ENV_SD21}")
        if ckpt is None:
            need.append(f"trained {label.split()[0]} modules: --checkpoint FOLDER (written by train.py)")
        overrides = ([f"pretrained={sd21}"] if sd21 else []) + ([f"checkpoint={ckpt}"] if ckpt else [])
        choices[key] = ModelChoice(key, label, config, overrides, "; ".join(need) or None)
    choices["bicubic"] = ModelChoice("bicubic", "bicubic x4 (the baseline)", "configs/infer/bicubic.yaml", [])
    return choices


def safe_stem(name: str) -> str:
    """A file stem safe to write and download: letters, digits, ``-_.`` (others become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._") or "clip"


@dataclasses.dataclass
class Result:
    video: Path  # the restored mp4 (in the job's folder)
    bicubic: np.ndarray  # (4h, 4w, 3) uint8: the middle frame, bicubic x4
    restored: np.ndarray  # (4h, 4w, 3) uint8: the same frame restored
    frames: int
    size_in: tuple[int, int]  # (w, h)
    seconds: float
    model_line: str


class Restorer:
    """Restores one clip at a time with a chosen model; built models are kept for the next job."""

    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.choices = model_choices(cfg)
        self._models: dict[str, tuple] = {}  # key -> (model, device, dtype, describe line)

    def infer_config(self, key: str, settings: Settings):
        from sdatc.config import load_config
        from sdatc.inference import InferConfig

        choice = self.choices.get(key)
        if choice is None:
            raise SdatcError(f"unknown model {key!r}: choose one of {', '.join(self.choices)}")
        if choice.missing:
            raise SdatcError(f"{choice.label} is not configured: it needs {choice.missing}")
        mode = load_config(InferConfig, choice.config).mode
        overrides = [*choice.overrides, *settings.overrides(mode), f"device={self.cfg.device}",
                     f"dtype={self.cfg.dtype}", f"output_preset={self.cfg.output_preset}"]
        try:
            return load_config(InferConfig, choice.config, overrides)
        except (ValueError, TypeError) as e:  # a setting out of range
            raise SdatcError(f"settings: {e}") from None

    def _model(self, key: str, infer):
        from sdatc.inference import build_model, describe_model, pick_device
        from sdatc.utils import process_state

        if key not in self._models:
            device, dtype = pick_device(infer, process_state())
            model = build_model(infer)  # cast to dtype and moved to device once, by the first job's pipeline
            self._models[key] = (model, device, dtype, describe_model(infer, model, device, dtype))
        return self._models[key]

    def stream_fn(self, key: str, infer, src: Path):
        """(the pipeline's ``stream(frames, n)``, the model's one-line description) for ``infer``'s settings."""
        import functools

        from sdatc.inference import make_pipeline

        model, device, dtype, line = self._model(key, infer)
        pipe = make_pipeline(model, infer, device, dtype, progress=False)
        return functools.partial(pipe.stream, source=src), line  # source: DRS's bitstream estimator reads it

    def check_clip(self, src: Path) -> tuple[int, int, int]:
        """(frames, width, height) of an uploaded clip, or an error a person can act on."""
        from sdatc.data.video import VideoReader

        if src.suffix.lower() not in VIDEO_TYPES:
            raise SdatcError(f"{src.name}: not a video file ({', '.join(VIDEO_TYPES)})")
        mb = src.stat().st_size / 2**20
        if mb > self.cfg.max_upload_mb:
            raise SdatcError(f"{src.name} is {mb:.0f} MB; this app takes at most {self.cfg.max_upload_mb:g} MB "
                             "(--max-upload-mb)")
        with VideoReader(src) as reader:
            n, w, h = len(reader), reader.meta.width, reader.meta.height
        if n < 1:
            raise SdatcError(f"{src.name} has no video frames")
        if n > self.cfg.max_frames:
            raise SdatcError(f"{src.name} has {n} frames; this app takes at most {self.cfg.max_frames} "
                             "(--max-frames); scripts/infer.py restores clips of any length")
        if min(w, h) < MIN_SIDE:
            raise SdatcError(f"{src.name} is {w}x{h}: too small (at least {MIN_SIDE} pixels a side)")
        return n, w, h

    def restore(self, src: str | Path, key: str, settings: Settings, workdir: Path,
                progress: Callable[[int, int], None] | None = None) -> Result:
        """Restore ``src`` into ``workdir``; ``progress(done, total)`` after each frame."""
        src = Path(src)
        try:
            return self._restore(src, key, settings, workdir, progress)
        except SdatcError as e:  # the upload's name, not its path in gradio's cache
            raise SdatcError(str(e).replace(str(src), src.name)) from None

    def _restore(self, src: Path, key: str, settings: Settings, workdir: Path, progress) -> Result:
        from sdatc.data.imresize import bicubic_up
        from sdatc.data.video import write_restored

        n, w, h = self.check_clip(src)
        infer = self.infer_config(key, settings)
        t0 = time.perf_counter()
        stream, line = self.stream_fn(key, infer, src)
        k, kept = n // 2, {}  # the middle frame, before and after, for the comparison

        def tapped(reader, num_frames):
            def frames_in():
                for i, frame in enumerate(reader):
                    if i == k:
                        kept["lq"] = frame
                    yield frame

            for i, frame in enumerate(stream(frames_in(), num_frames)):
                if i == k:
                    kept["hq"] = frame
                if progress is not None:
                    progress(i + 1, num_frames)
                yield frame

        mp4 = workdir / f"{safe_stem(src.name)}_x4.mp4"
        frames = write_restored(tapped, src, mp4, crf=infer.output_crf, preset=infer.output_preset,
                                copy_audio=infer.copy_audio, fps=infer.fps, name=src.name, progress=False,
                                pix_fmt=infer.output_pix_fmt, overwrite=True)
        return Result(mp4, bicubic_up(kept["lq"], 4), kept["hq"], frames, (w, h), time.perf_counter() - t0, line)


def readable(e: BaseException) -> str:
    """One line for the page: an SdatcError as it is; anything else named, its traceback in the server's log."""
    if isinstance(e, SdatcError):
        return str(e)
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
        return "out of memory: try a shorter or smaller clip, or start the app with --dtype bf16"
    if isinstance(e, OSError):
        from sdatc.errors import os_reason

        return f"{e.filename or 'a file'}: {os_reason(e)}"
    first = (str(e).splitlines() or [""])[0][:300]
    return f"restoring failed ({type(e).__name__}: {first}); the server's log has the details"


def model_note(choice) -> str:
    if choice.missing:
        return f"**{choice.label}** is not available: it needs {choice.missing}."
    return f"**{choice.label}** is ready."


def _job(gr, restorer: Restorer, clip, key, settings: Settings, workdir: Path, progress):
    """One restoration for the page: clear the last results, restore, yield the outputs (or a gr.Error)."""
    from sdatc.demo import before_after

    yield None, None, None, None, ""  # the last job's results go, so a failure is not shown beside them
    try:
        if not clip:
            raise SdatcError("no clip: upload one (mp4, mkv, mov, webm) or press 'Use the demo clip'")
        progress(0, desc="loading the model")
        r = restorer.restore(clip, key, settings, workdir,
                             lambda i, n: progress((i, n), desc="restoring", unit="frames"))
        zoom = before_after(r.bicubic, r.restored, ("bicubic x4", f"restored ({key})"))
        w, h = r.size_in
        note = (f"Restored {r.frames} frames, {w}x{h} -> {4 * w}x{4 * h}, in {r.seconds:.1f} s "
                f"({r.seconds / r.frames:.2f} s per frame). {r.model_line}")
        print(f"[app] {Path(clip).name}: {note}", flush=True)
    except Exception as e:
        message = readable(e)
        print(f"[app] failed: {message}", flush=True)
        if not isinstance(e, SdatcError):
            traceback.print_exc()
        raise gr.Error(message, duration=None, print_exception=False) from None  # stays until closed
    yield str(r.video), (r.bicubic, r.restored), zoom, str(r.video), note


def _on_model(gr, choices: dict, key: str) -> tuple:
    """The model note and which settings show for model ``key``."""
    mode = key if key in ("sdatc", "ultravsr") else None
    colour_value = "wavelet" if mode == "ultravsr" else "adain"
    return (model_note(choices[key]), gr.update(visible=mode == "sdatc"), gr.update(visible=mode == "sdatc"),
            gr.update(visible=mode == "sdatc"), gr.update(visible=mode == "ultravsr"),
            gr.update(visible=mode == "ultravsr"), gr.update(visible=mode is not None, value=colour_value),
            gr.update(visible=mode is None))


def build_app(cfg: AppConfig):
    """The gradio Blocks of the page (gradio imported here)."""
    try:
        import gradio as gr
    except ImportError:
        raise SdatcError(INSTALL_HINT) from None

    restorer = Restorer(cfg)
    choices = restorer.choices

    def restore_job(clip, key, steps, cfw_weight, colour, seed, estimator, d,
                    progress=gr.Progress()):  # noqa: B008 (gradio injects the progress tracker this way)
        """The Restore button: one generator so the job's folder is removed after gradio has copied the outputs."""
        workdir = Path(tempfile.mkdtemp(prefix="sdatc-app-"))
        try:
            settings = Settings(steps=steps, cfw_weight=cfw_weight, colour=colour, seed=seed, estimator=estimator, d=d)
            yield from _job(gr, restorer, clip, key, settings, workdir, progress)
        finally:  # after gradio has copied the outputs into its cache, or after a failure
            shutil.rmtree(workdir, ignore_errors=True)

    with gr.Blocks(title="sdatc: compressed video x4", delete_cache=(900, 3600)) as demo:
        gr.Markdown("# sdatc: restore a compressed video x4\nUpload a clip (or use the demo clip), choose a model, "
                    "press **Restore**. One clip is restored at a time; others wait in the queue.")
        with gr.Row():
            with gr.Column(scale=1):
                clip = gr.File(label="Clip (mp4, mkv, mov, webm)", file_types=list(VIDEO_TYPES), type="filepath",
                               elem_id="clip")
                use_demo = gr.Button("Use the demo clip", size="sm", elem_id="use-demo")
                model = gr.Dropdown([(c.label, c.key) for c in choices.values()], value="preview", label="Model",
                                    elem_id="model")
                status = gr.Markdown(model_note(choices["preview"]), elem_id="model-note")
                with gr.Accordion("Settings", open=False):
                    steps = gr.Slider(1, 200, value=50, step=1, label="Steps (SDATC)", visible=False)
                    cfw = gr.Slider(0.0, 1.0, value=0.75, step=0.05, label="CFW weight (SDATC): 1 fidelity, 0 realism",
                                    visible=False)
                    seed = gr.Number(0, precision=0, label="Seed (SDATC)", visible=False)
                    estimator = gr.Radio(["clipiqa", "bitstream", "fixed"], value="clipiqa",
                                         label="Degradation score d from (UltraVSR)", visible=False)
                    d = gr.Slider(0.01, 1.0, value=0.5, step=0.01, label="d (UltraVSR, estimator fixed)", visible=False)
                    colour = gr.Radio(["adain", "wavelet", "none"], value="adain", label="Colour fix", visible=False)
                    no_settings = gr.Markdown("This model has no settings.")
                run = gr.Button("Restore", variant="primary", elem_id="restore")
            with gr.Column(scale=2):
                video = gr.Video(label="Restored (x4)", elem_id="restored", interactive=False)
                note = gr.Markdown(elem_id="result-note")
                slider = gr.ImageSlider(label="Middle frame: bicubic x4 | restored (drag)", elem_id="compare",
                                        interactive=False)
                zoom = gr.Image(label="Side by side with a 2x zoom of the centre", elem_id="zoom", interactive=False)
                download = gr.File(label="Download", elem_id="download", interactive=False)

        model.change(functools.partial(_on_model, gr, choices), model,
                     [status, steps, cfw, seed, estimator, d, colour, no_settings], queue=False, api_name=False)
        use_demo.click(lambda: cfg.demo_clip, None, clip, queue=False, api_name=False)
        run.click(restore_job, [clip, model, steps, cfw, colour, seed, estimator, d],
                  [video, slider, zoom, download, note], api_name="restore")
    demo.queue(default_concurrency_limit=1, max_size=cfg.queue_size)
    return demo


def serve(cfg: AppConfig) -> None:
    """Build the page and serve it until Ctrl-C."""
    demo = build_app(cfg)
    print("[app] models: " + "; ".join(f"{c.key} ({'ready' if not c.missing else 'needs ' + c.missing})"
                                        for c in model_choices(cfg).values()), flush=True)
    try:
        demo.launch(server_name=cfg.host, server_port=cfg.port, max_file_size=f"{cfg.max_upload_mb:g}mb",
                    allowed_paths=[str(Path(cfg.demo_clip).resolve())], show_error=True, footer_links=["settings"],
                    quiet=False)
    except OSError as e:  # the port is taken
        raise SdatcError(f"cannot serve on {cfg.host}:{cfg.port}: {e} (--port picks another)") from None

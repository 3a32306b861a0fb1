"""What every pipeline shares: building the model and loading its weights (``build_model``, also for
``scripts/infer.py``; ``from_sd21``, ``from_pretrained``), saving, devices and dtypes, frames in and out,
files. Each system's pipeline (``sdatc_pipeline.py``, ``ultravsr.py``) adds its own window loop in ``stream``
and its ``__call__``; the DCM-only and bicubic pipelines (``dcm_pipeline.py``) have the same
``stream(frames, num_frames)``.

    import sdatc
    pipe = sdatc.SDATCPipeline.from_sd21("stabilityai/stable-diffusion-2-1-base", checkpoint="weights/sdatc")
    pipe = pipe.to("cuda", torch_dtype=torch.bfloat16)
    out = pipe(frames, num_inference_steps=50, generator=torch.Generator().manual_seed(0))  # (T, 4H, 4W, 3) uint8
    pipe.restore_file("clip.mp4", "clip_x4.mp4", num_inference_steps=50)   # a video file, __call__'s settings
    pipe.save_pretrained("sdatc-pipeline")                # one folder: SD parts + SDATC modules + settings
    pipe = sdatc.SDATCPipeline.from_pretrained("sdatc-pipeline")                          # or a Hub id

``frames``: a (T, H, W, 3) uint8 array (or tensor) or a list of PIL images, in time order. The clip is
restored in overlapping windows (``window``), tiled when large (``tiling``), colour-corrected, exactly as
``scripts/infer.py`` does (it uses these classes). ``UltraVSRPipeline`` has the same methods (one step:
``pipe(frames, d=None)``, d the DRS degradation score; None: the configured estimator).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from sdatc.config import dump_config, load_config, resolve_config_path
from sdatc.errors import SdatcError
from sdatc.models.backbone import (
    EMPTY_PROMPT_FILE,
    ENV_SD21,
    HUB_ID,
    SD21_HELP,
    hub_snapshot,
    is_local_path,
    resolve_pretrained,
)
from sdatc.models.dcm import DCM
from sdatc.models.saving import CONFIG_NAME
from sdatc.models.sdatc import SDATC, WEIGHTS_NAME, ModelConfig
from sdatc.models.sites import pretrained_state_dict
from sdatc.models.ultravsr import WEIGHTS_NAME as ULTRAVSR_WEIGHTS
from sdatc.models.ultravsr import UltraVSR, UltraVSRConfig
from sdatc.pipelines.config import as_dtype, autocast, cast_weights
from sdatc.pipelines.dcm_pipeline import Bicubic

MODEL_INDEX = "model_index.json"
PIPELINE_CONFIG = "pipeline.yaml"
# What a Hub id of a saved pipeline fetches.
PIPELINE_HUB_FILES = [MODEL_INDEX, PIPELINE_CONFIG, EMPTY_PROMPT_FILE, "sdatc/*", "ultravsr/*",
                      "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                      "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]
# --------------------------------------------------------------------------- building the model, loading weights


@dataclasses.dataclass
class ModelSpec:
    """Which model to build and from which weights (the same keys as ``scripts/infer.py``'s config)."""

    mode: Literal["sdatc", "ultravsr", "dcm", "bicubic"] = "sdatc"
    model_config: str = "configs/model/sdatc_sd21.yaml"  # used when the checkpoint carries no config.yaml
    model_overrides: list[str] = dataclasses.field(default_factory=list)
    pretrained: str | None = None  # SD 2.1-base diffusers folder or Hub id (else $SDATC_SD21_PATH)
    checkpoint: str | None = None  # trained modules: a save_pretrained folder or a .safetensors file
    allow_random_weights: bool = False  # run without SD 2.1 / checkpoint weights (tests, smoke runs)


NO_PUBLISHED_WEIGHTS = ("no trained SDATC or UltraVSR weights are published: train them (docs/training.md) or use "
                        "the preview model (infer.py without --config)")
RANDOM_WEIGHTS_HINT = ("allow_random_weights=true runs random weights, for smoke tests; with --config "
                       "configs/infer/tiny.yaml it takes seconds on a CPU (the full-size model takes hours per clip)")


def checkpoint_kind(ckpt: Path) -> str | None:
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


def _holds_only_the_dcm(weights: Path) -> bool:
    """Whether a weights file's tensors are all ``dcm.*`` (its header only; an unreadable file: False, the load
    says why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            keys = [k for k in f.keys() if not k.startswith("_")]  # _empty_prompt_embeds rides along
    except Exception:
        return False
    return bool(keys) and all(k.startswith("dcm.") for k in keys)


def _load_weights(weights: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(weights))
    except Exception as e:  # a damaged or foreign file
        raise SdatcError(f"cannot read {weights}: {(str(e).splitlines() or [''])[0][:200]}") from None


def check_model(spec: ModelSpec) -> tuple[ModelConfig | UltraVSRConfig | None, Path | None]:
    """Validate the model settings without building anything: the checkpoint and its weights file exist,
    the model config parses. Runs before any clip is looked at, so a broken setting is an error even when
    every output exists already. Returns (model config, checkpoint); (None, None) for bicubic."""
    if spec.mode == "bicubic":
        return None, None
    ckpt = resolve_config_path(spec.checkpoint) if spec.checkpoint else None
    weights_name = ULTRAVSR_WEIGHTS if spec.mode == "ultravsr" else WEIGHTS_NAME
    if ckpt is not None and not ckpt.exists():
        raise SdatcError(f"checkpoint not found: {ckpt} (config key checkpoint: a folder holding {weights_name} "
                         f"and {CONFIG_NAME}, as written by train.py, or a .safetensors file); {NO_PUBLISHED_WEIGHTS}")
    if ckpt is not None:
        kind = checkpoint_kind(ckpt)
        want = "ultravsr" if spec.mode == "ultravsr" else "sdatc"
        if kind is not None and kind != want:
            hint = ("mode=sdatc (configs/infer/sdatc.yaml, or mode=dcm for its DCM)" if kind == "sdatc"
                    else "mode=ultravsr (configs/infer/ultravsr.yaml)")
            raise SdatcError(f"{ckpt} is an {'SDATC' if kind == 'sdatc' else 'UltraVSR'} checkpoint, this config "
                             f"runs mode={spec.mode}: use {hint}")
    if ckpt is not None and ckpt.is_dir() and not (ckpt / weights_name).is_file():
        raise SdatcError(f"no {weights_name} in {ckpt}")
    config_file = (ckpt / CONFIG_NAME if ckpt is not None and ckpt.is_dir() and (ckpt / CONFIG_NAME).is_file()
                   else spec.model_config)
    overrides = list(spec.model_overrides) + ([f"backbone.pretrained={spec.pretrained}"] if spec.pretrained else [])
    model_cfg = load_config(UltraVSRConfig if spec.mode == "ultravsr" else ModelConfig, config_file, overrides)
    weights = ckpt / weights_name if ckpt is not None and ckpt.is_dir() else ckpt
    beyond_dcm = spec.mode == "sdatc" and any(v for k, v in dataclasses.asdict(model_cfg.enabled).items() if k != "dcm")
    if weights is not None and beyond_dcm and _holds_only_the_dcm(weights):
        raise SdatcError(f"{ckpt} holds the DCM alone (a stage-0 checkpoint, or the preview model): run it with "
                         "mode=dcm (as configs/infer/preview.yaml does), or give a checkpoint from stage 1 or 2")
    return model_cfg, ckpt


def build_model(spec: ModelSpec) -> SDATC | DCM:
    """The SDATC model with SD 2.1 and the trained modules (or the DCM alone with ``mode=dcm``), or
    an error saying what is missing."""
    if spec.mode == "bicubic":
        return Bicubic(4)
    model_cfg, ckpt = check_model(spec)
    if spec.mode == "ultravsr":
        return _build_diffusion(spec, UltraVSR, model_cfg, ckpt, ULTRAVSR_WEIGHTS)
    if spec.mode == "dcm":
        return _build_dcm(spec, model_cfg, ckpt)
    return _build_diffusion(spec, SDATC, model_cfg, ckpt, WEIGHTS_NAME)


def _build_diffusion(spec: ModelSpec, cls, model_cfg, ckpt: Path | None, weights_name: str):
    """SDATC or UltraVSR on SD 2.1 with its trained modules, or the error saying what is missing."""
    if resolve_pretrained(model_cfg.backbone) is None and not spec.allow_random_weights:
        raise SdatcError(f"no SD 2.1 weights: set pretrained=PATH or ${ENV_SD21} ({SD21_HELP}); {RANDOM_WEIGHTS_HINT}")
    if ckpt is None and not spec.allow_random_weights:
        name = "SDATC" if cls is SDATC else "UltraVSR"
        raise SdatcError(f"no trained {name} modules: set checkpoint=PATH (a folder with {weights_name} and "
                         f"{CONFIG_NAME} from train.py; {NO_PUBLISHED_WEIGHTS}); allow_random_weights=true runs "
                         "untrained modules")
    weights = _weights_file(ckpt, weights_name) if ckpt is not None else None
    model = cls.from_config(model_cfg)
    if weights is not None:
        model.load_trainable_state_dict(_load_weights(weights), str(weights))
    return model.eval()


def _build_dcm(spec: ModelSpec, model_cfg: ModelConfig, ckpt: Path | None) -> DCM:
    if ckpt is None and not spec.allow_random_weights:
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
            raise SdatcError(f"{weights}: the DCM weights do not match the DCM config "
                             f"({len(result.missing_keys)} missing, e.g. {result.missing_keys[:3]}; "
                             f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:3]})")
    return dcm.eval()


# --------------------------------------------------------------------------- the pipelines' base


def _as_frames(frames) -> np.ndarray:
    """(T, H, W, 3) uint8 from an array/tensor of that shape or a list of PIL images."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise SdatcError("no frames given")
        frames = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in frames])
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise SdatcError(f"frames must be (T, H, W, 3) or a list of RGB images, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise SdatcError(f"frames must be uint8 (0..255), got {frames.dtype}")
    return frames


class VSRPipeline:
    """What SDATCPipeline and UltraVSRPipeline share: loading, saving, devices, frames in and out, files."""

    mode = ""  # infer.py's mode
    model_cls: type = nn.Module
    config_cls: type = object
    folder = ""  # the modules' subfolder of a saved pipeline

    def __init__(self, model, config=None, device: str | torch.device = "cpu",
                 torch_dtype: torch.dtype | str | None = None, progress: bool = True, compile: bool = False,
                 cast: bool = True):
        """``model`` moves to ``device`` in eval mode; with ``cast`` its weights are cast once to ``torch_dtype``
        (``config.cast_weights``); ``cast=False`` keeps them as they are (the trainer's validation, whose frozen
        parts it cast itself) and runs ``torch_dtype`` autocast over them. ``compile``: torch.compile the
        denoiser (``hardware.py``)."""
        self.model, self.config, self.progress = model.eval(), config or self.config_cls(), progress
        self.compile = compile
        self.device, self.dtype = torch.device(device), as_dtype(torch_dtype)
        autocast(self.device, self.dtype)  # fp16 on the CPU: an error now, not at the first frame
        if cast:
            cast_weights(self.model, self.dtype)
        self.model.to(self.device)
        self.last_drs: tuple[float, int, str] | None = None  # UltraVSR: (d, t_rec, how d was found), last clip
        self._setup()

    def _setup(self) -> None:
        """What follows the device and the config (planners, samplers, the denoiser): set at init and by ``to``."""

    def _autocast(self, enabled: bool = True):
        return autocast(self.device, self.dtype, enabled)

    # ------------------------------------------------------------------ loading, saving

    @classmethod
    def from_sd21(cls, sd21: str | Path | None, checkpoint: str | Path | None = None,
                  model_config: str | Path | None = None, torch_dtype: torch.dtype | str | None = None,
                  config=None, overrides: Sequence[str] = (), allow_random_weights: bool = False):
        """SD 2.1 (a diffusers folder or Hub id; None: ``$SDATC_SD21_PATH``) + the trained modules of
        ``checkpoint`` (a folder written by train.py / ``save_pretrained`` of the model, whose config.yaml
        wins over ``model_config``, default: the SD 2.1 model config; or a .safetensors file). Without a
        checkpoint the modules are untrained: only with ``allow_random_weights=True`` (smoke tests),
        which also allows a random SD when none is set."""
        spec = ModelSpec(mode=cls.mode, pretrained=None if sd21 is None else str(sd21),
                         checkpoint=None if checkpoint is None else str(checkpoint), model_overrides=list(overrides),
                         allow_random_weights=allow_random_weights,
                         model_config=str(model_config or f"configs/model/{cls.mode}_sd21.yaml"))
        return cls(build_model(spec), config, torch_dtype=torch_dtype)

    @classmethod
    def from_pretrained(cls, folder_or_hub_id: str | Path, torch_dtype: torch.dtype | str | None = None, config=None):
        """A folder written by :meth:`save_pretrained`, or a Hub repo id holding one (read through the
        Hugging Face cache; ``HF_HUB_OFFLINE=1``: the cache only)."""
        value = str(folder_or_hub_id)
        folder = Path(value).expanduser()
        if not folder.exists() and not is_local_path(value) and HUB_ID.fullmatch(value):
            folder, _ = hub_snapshot(value, PIPELINE_HUB_FILES)
        weights = folder / cls.folder
        if not (folder / MODEL_INDEX).is_file() or not weights.is_dir():
            raise SdatcError(f"{value} is not a saved {cls.__name__}: expected {MODEL_INDEX}, unet/, vae/, "
                             f"scheduler/ and {cls.folder}/ (as {cls.__name__}.save_pretrained writes), "
                             "locally or as a Hub repo id")
        index = json.loads((folder / MODEL_INDEX).read_text())
        if index.get("_class_name") != cls.__name__:
            raise SdatcError(f"{folder / MODEL_INDEX} describes a {index.get('_class_name')}, not an {cls.__name__}")
        model = cls.model_cls.from_pretrained(weights, [f"backbone.pretrained={folder}"])
        if config is None and (folder / PIPELINE_CONFIG).is_file():
            config = load_config(cls.config_cls, folder / PIPELINE_CONFIG)
        return cls(model, config, torch_dtype=torch_dtype)

    def save_pretrained(self, folder: str | Path) -> Path:
        """One self-contained folder: ``unet/ vae/ scheduler/`` (SD 2.1 in diffusers layout, without the new
        modules and adapters), the empty-prompt embedding, the trained modules (``sdatc/`` or ``ultravsr/``:
        config.yaml + weights), ``pipeline.yaml`` (the inference settings) and ``model_index.json``. Files
        are written under temporary names and renamed."""
        from safetensors.torch import save_file

        from sdatc.utils import atomic_path, atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        m = self.model
        for name in ("unet", "vae"):  # SD's own tensors, exactly as diffusers names them
            part = getattr(m, name)
            (folder / name).mkdir(exist_ok=True)
            part.save_config(folder / name)
            state = {k: v.float().cpu().contiguous() for k, v in pretrained_state_dict(part).items()}
            with atomic_path(folder / name / "diffusion_pytorch_model.safetensors") as tmp:
                save_file(state, str(tmp), metadata={"format": "pt"})
        m.scheduler.save_pretrained(folder / "scheduler")
        with atomic_path(folder / EMPTY_PROMPT_FILE) as tmp:
            save_file({"embeds": m.empty_prompt_embeds.float().cpu().contiguous(),
                       "text_encoder_params": torch.tensor([m.text_encoder_params])}, str(tmp))
        m.save_pretrained(folder / self.folder)
        atomic_write_text(folder / PIPELINE_CONFIG, dump_config(self.config))
        import diffusers

        import sdatc

        index = {"_class_name": type(self).__name__, "_sdatc_version": sdatc.__version__,
                 "_diffusers_version": diffusers.__version__, "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", type(m.scheduler).__name__],
                 self.folder: ["sdatc", type(m).__name__]}
        atomic_write_text(folder / MODEL_INDEX, json.dumps(index, indent=2) + "\n")
        return folder

    def to(self, device: str | torch.device | None = None, torch_dtype: torch.dtype | str | None = None):
        """Move to ``device``; ``torch_dtype`` casts the weights and sets the autocast precision (bf16 also on
        the CPU; fp16 keeps the VAE decoder fp32). As in diffusers, casting back up keeps the rounded weights."""
        if torch_dtype is not None:
            self.dtype = as_dtype(torch_dtype)
            cast_weights(self.model, self.dtype)
        if device is not None:
            self.device = torch.device(device)
            self.model.to(self.device)
        self._setup()
        return self

    # ------------------------------------------------------------------ running

    def _collect(self, frames, output_type: str, **stream_kw):
        """``__call__``'s frames in and out around :meth:`stream`."""
        if output_type not in ("np", "pil"):
            raise SdatcError(f"output_type must be 'np' or 'pil', got {output_type!r}")
        clip = _as_frames(frames)
        out = np.stack(list(self.stream(iter(clip), num_frames=len(clip), **stream_kw)))
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray(f) for f in out]
        return out  # (T, 4H, 4W, 3) uint8

    def stream(self, frames, num_frames: int, prompt: str | list[str] | None = None, source: str | Path | None = None,
               config=None):
        """Restored frames one by one ((4H, 4W, 3) uint8) from an iterator of (H, W, 3) uint8 frames; memory
        stays flat in the clip's length (what ``restore_file`` and ``scripts/infer.py`` use). ``prompt``: the
        UNet's text condition; ``source``: the clip's file (UltraVSR's bitstream DRS); ``config``: this call's
        settings instead of the pipeline's."""
        raise NotImplementedError

    def _settings(self, **settings) -> dict:
        """:meth:`stream`'s keywords (``prompt``, ``config``: None for the pipeline's own, ...) for
        ``__call__``'s settings."""
        raise NotImplementedError

    def restore_file(self, in_path: str | Path, out_path: str | Path, crf: int = 15, preset: str = "medium",
                     copy_audio: bool = True, fps: float = 25.0, overwrite: bool = False,
                     pix_fmt: str = "auto", **settings) -> Path:
        """Restore a video file (or a folder of frames, at ``fps``) to ``out_path`` (an mp4, written under a
        temporary name, audio copied; frame times, aspect ratio, rotation and colour tags kept; ``pix_fmt``:
        auto (10-bit for >8-bit input), yuv420p or yuv420p10le). ``settings``: the keywords of ``__call__``
        (``num_inference_steps``, ``generator``, ``prompt``, ...), with the same meaning. Returns ``out_path``; an
        existing output is an error unless ``overwrite``."""
        from sdatc.data.video import write_restored

        kw = self._settings(**settings)
        src, dst = Path(in_path), Path(out_path)
        if not src.exists():
            raise SdatcError(f"input not found: {src}")
        if dst.resolve() == src.resolve():
            raise SdatcError(f"output {dst} is the input (inputs are never overwritten)")
        if dst.exists() and not overwrite:
            raise SdatcError(f"{dst} exists (overwrite=True replaces it)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        stream = functools.partial(self.stream, source=src, **kw)
        write_restored(stream, src, dst, crf=crf, preset=preset,
                       copy_audio=copy_audio, fps=fps, progress=self.progress, pix_fmt=pix_fmt, overwrite=overwrite)
        return dst

"""``SDATCPipeline`` and ``UltraVSRPipeline``: the Python API, as a diffusers user expects it.

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
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdatc.config import dump_config, load_config
from sdatc.errors import SdatcError
from sdatc.models.backbone import EMPTY_PROMPT_FILE, HUB_ID, hub_snapshot, is_local_path
from sdatc.models.sdatc import SDATC
from sdatc.models.sites import pretrained_state_dict
from sdatc.models.ultravsr import UltraVSR
from sdatc.pipelines.restore import PipelineConfig, RestorePipeline, cast_weights
from sdatc.pipelines.ultravsr import UltraVSRPipelineConfig, UltraVSRRunner

MODEL_INDEX = "model_index.json"
PIPELINE_CONFIG = "pipeline.yaml"
# What a Hub id of a saved pipeline fetches.
PIPELINE_HUB_FILES = [MODEL_INDEX, PIPELINE_CONFIG, EMPTY_PROMPT_FILE, "sdatc/*", "ultravsr/*",
                      "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                      "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(value) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, str):
        if value not in DTYPES:
            raise SdatcError(f"torch_dtype {value!r}: use one of {', '.join(DTYPES)} or a torch dtype")
        return DTYPES[value]
    if value not in DTYPES.values():
        raise SdatcError(f"torch_dtype {value}: use torch.float32, torch.bfloat16 or torch.float16")
    return value


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


class _VSRPipeline:
    """What SDATCPipeline and UltraVSRPipeline share: loading, saving, devices, frames in and out, files."""

    mode = ""  # infer.py's mode
    model_cls: type = nn.Module
    config_cls: type = object
    folder = ""  # the modules' subfolder of a saved pipeline

    def __init__(self, model, config=None, device: str | torch.device = "cpu",
                 torch_dtype: torch.dtype | str | None = None, progress: bool = True, compile: bool = False):
        self.model, self.config, self.progress = model.eval(), config or self.config_cls(), progress
        self.compile = compile  # torch.compile the denoiser (sdatc/pipelines/speed.py)
        self.device, self.dtype = torch.device(device), _dtype(torch_dtype)
        cast_weights(self.model, self.dtype).to(self.device)
        self._runner = None

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
        from sdatc.inference import InferConfig, build_model

        infer = InferConfig(mode=cls.mode, pretrained=None if sd21 is None else str(sd21),
                            checkpoint=None if checkpoint is None else str(checkpoint),
                            model_overrides=list(overrides), allow_random_weights=allow_random_weights)
        infer.model_config = str(model_config or f"configs/model/{cls.mode}_sd21.yaml")
        return cls(build_model(infer), config, torch_dtype=torch_dtype)

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
            raise SdatcError(f"{value} is not a saved {cls.__name__}: expected {MODEL_INDEX}, unet/, vae/, scheduler/ "
                             f"and {cls.folder}/ (as {cls.__name__}.save_pretrained writes), locally or as a Hub repo id")
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
            self.dtype = _dtype(torch_dtype)
            cast_weights(self.model, self.dtype)
        if device is not None:
            self.device = torch.device(device)
            self.model.to(self.device)
        self._runner = None
        return self

    # ------------------------------------------------------------------ running

    def _make_runner(self, config):
        raise NotImplementedError

    def _pipeline(self, config=None):
        if config is not None:
            return self._make_runner(config)
        if self._runner is None:
            self._runner = self._make_runner(self.config)
        return self._runner

    def _run(self, frames, config, output_type: str, **restore_kw):
        if output_type not in ("np", "pil"):
            raise SdatcError(f"output_type must be 'np' or 'pil', got {output_type!r}")
        clip = _as_frames(frames)
        out = np.stack(list(self._pipeline(config).restore(iter(clip), num_frames=len(clip), **restore_kw)))
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray(f) for f in out]
        return out  # (T, 4H, 4W, 3) uint8

    def stream(self, frames, num_frames: int, **restore_kw):
        """Restored frames one by one ((4H, 4W, 3) uint8) from an iterator of (H, W, 3) uint8 frames; memory
        stays flat in the clip's length (what ``restore_file`` and ``scripts/infer.py`` use)."""
        return self._pipeline().restore(frames, num_frames, **restore_kw)

    def _settings(self, **settings):
        """(config or None, restore() keywords) for ``__call__``'s settings; None: the pipeline's config."""
        raise NotImplementedError

    def restore_file(self, in_path: str | Path, out_path: str | Path, crf: int = 15, preset: str = "medium",
                     copy_audio: bool = True, fps: float = 25.0, overwrite: bool = False,
                     pix_fmt: str = "auto", **settings) -> Path:
        """Restore a video file (or a folder of frames, at ``fps``) to ``out_path`` (an mp4, written under a
        temporary name, audio copied; frame times, aspect ratio, rotation and colour tags kept; ``pix_fmt``:
        auto (10-bit for >8-bit input), yuv420p or yuv420p10le). ``settings``: the keywords of ``__call__``
        (``num_inference_steps``, ``generator``, ``prompt``, ...), with the same meaning. Returns ``out_path``; an
        existing output is an error unless ``overwrite``."""
        from sdatc.inference import write_restored

        config, kw = self._settings(**settings)
        src, dst = Path(in_path), Path(out_path)
        if not src.exists():
            raise SdatcError(f"input not found: {src}")
        if dst.resolve() == src.resolve():
            raise SdatcError(f"output {dst} is the input (inputs are never overwritten)")
        if dst.exists() and not overwrite:
            raise SdatcError(f"{dst} exists (overwrite=True replaces it)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if self.mode == "ultravsr":
            kw["source"] = src
        runner = self._pipeline(config)
        write_restored(lambda reader, n: runner.restore(reader, n, **kw), src, dst, crf=crf, preset=preset,
                       copy_audio=copy_audio, fps=fps, progress=self.progress, pix_fmt=pix_fmt, overwrite=overwrite)
        return dst


class SDATCPipeline(_VSRPipeline):
    """SD 2.1 + trained SDATC modules, restoring compressed low-resolution frames x4 (50 denoising steps)."""

    mode, model_cls, config_cls, folder = "sdatc", SDATC, PipelineConfig, "sdatc"

    def _make_runner(self, config):
        raft = self._runner.raft if self._runner is not None and config is not self.config else None
        return RestorePipeline(self.model, config, self.device, self.dtype, raft=raft, progress=self.progress,
                               compile=self.compile)

    def __call__(self, frames, num_inference_steps: int | None = None, generator: torch.Generator | None = None,
                 cfw_weight: float | None = None, colour_fix: str | None = None, output_type: str = "np",
                 prompt: str | list[str] | None = None):
        """Restore a clip: (T, H, W, 3) uint8 or a list of PIL images -> (T, 4H, 4W, 3) uint8 (``"np"``) or
        PIL images (``"pil"``). ``num_inference_steps`` (default: the config's), ``generator``: its initial
        seed seeds each frame's noise (results do not depend on the window plan), ``cfw_weight`` in [0, 1]
        (1: fidelity, 0: realism), ``colour_fix``: adain | wavelet | none. ``prompt``: the UNet's text
        condition, one string or one per frame, encoded by SD's text encoder (loaded at the first non-empty
        prompt); None or ``""``: the cached empty prompt, as trained."""
        config, kw = self._settings(num_inference_steps, generator, cfw_weight, colour_fix, prompt)
        return self._run(frames, config, output_type, **kw)

    def _settings(self, num_inference_steps: int | None = None, generator: torch.Generator | None = None,
                  cfw_weight: float | None = None, colour_fix: str | None = None,
                  prompt: str | list[str] | None = None):
        seed = generator.initial_seed() if generator is not None else None
        kw = {"prompt": prompt} if prompt else {}
        if all(v is None for v in (num_inference_steps, seed, cfw_weight, colour_fix)):
            return None, kw
        self._pipeline()  # RAFT loads once, with the default runner
        s = self.config.sampler
        sampler = dataclasses.replace(s, steps=num_inference_steps or s.steps, seed=s.seed if seed is None else seed)
        extra = {k: v for k, v in (("cfw_weight", cfw_weight), ("colour", colour_fix)) if v is not None}
        return dataclasses.replace(self.config, sampler=sampler, **extra), kw


class UltraVSRPipeline(_VSRPipeline):
    """SD 2.1 + trained UltraVSR modules (RTS, LoRA): x4 in one UNet call per frame."""

    mode, model_cls, config_cls, folder = "ultravsr", UltraVSR, UltraVSRPipelineConfig, "ultravsr"

    def _make_runner(self, config):
        return UltraVSRRunner(self.model, config, self.device, self.dtype, progress=self.progress, compile=self.compile)

    def __call__(self, frames, d: float | None = None, chunk_frames: int | None = None, colour_fix: str | None = None,
                 output_type: str = "np", prompt: str | list[str] | None = None):
        """Restore a clip in one step: (T, H, W, 3) uint8 or PIL images -> (T, 4H, 4W, 3) uint8 or PIL. ``d``: the
        degradation score in (0, 1] (1: clean; it sets the timestep); None: the configured DRS estimator on the
        frames. ``chunk_frames``: TAI chunk (memory), ``colour_fix``: wavelet | adain | none. ``prompt``: the
        UNet's text condition, one string or one per frame (the release: RAM tags per frame); None or ``""``:
        the cached empty prompt."""
        config, kw = self._settings(d, chunk_frames, colour_fix, prompt)
        return self._run(frames, config, output_type, **kw)

    def _settings(self, d: float | None = None, chunk_frames: int | None = None, colour_fix: str | None = None,
                  prompt: str | list[str] | None = None):
        extra = {k: v for k, v in (("chunk_frames", chunk_frames), ("colour", colour_fix)) if v is not None}
        kw = {"d": d, **({"prompt": prompt} if prompt else {})}
        return (dataclasses.replace(self.config, **extra) if extra else None), kw

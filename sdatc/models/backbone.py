"""Stable Diffusion 2.1-base through diffusers: load from a local folder or a Hugging Face Hub repo id,
or build with random weights.

    bb = load_backbone(BackboneConfig(pretrained="weights/stable-diffusion-2-1-base"))
    bb = load_backbone(BackboneConfig(pretrained="stabilityai/stable-diffusion-2-1-base"))  # or org/name@revision
    bb = load_backbone(BackboneConfig())        # pretrained: null -> every part from its architecture config

A repo id is resolved through huggingface_hub into its standard cache ($HF_HUB_CACHE, else $HF_HOME/hub):
only the files sdatc needs, downloaded only when online; with HF_HUB_OFFLINE=1 only from the cache.
A local folder never touches the network; a value that starts with ``./``, ``../``, ``/`` or ``~``, or
whose first component is an existing local folder, is always a path (missing: an error, not a download).
The empty-prompt text embedding (1, 77, C) is computed once and cached beside the weights
(``sdatc_empty_prompt.safetensors``), so inference never loads the text encoder.
The noise schedule and ``prediction_type`` (epsilon for SD 2.1-base, v_prediction for SD 2.1 768)
come from the folder's ``scheduler/scheduler_config.json``; a non-null config value overrides it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sdatc.errors import SdatcError

if TYPE_CHECKING:  # diffusers is imported where a model is built: the DCM-only paths start without it
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

ENV_SD21 = "SDATC_SD21_PATH"
EMPTY_PROMPT_FILE = "sdatc_empty_prompt.safetensors"
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the UNet predicts (the functions at the end)
SD21_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD21_HELP = (
    "get Stable Diffusion 2.1-base in diffusers layout (the 'stabilityai/stable-diffusion-2-1-base' "
    "repository: unet/, vae/, text_encoder/, tokenizer/, scheduler/ with their config and weight files) "
    f"and point model.backbone.pretrained or ${ENV_SD21} at that folder, or at the Hub id "
    "(downloaded into the Hugging Face cache when online; HF_HUB_OFFLINE=1 reads the cache only)"
)
# What a Hub repo id fetches: configs and safetensors weights of the parts sdatc uses (no fp16/.bin/.ckpt copies).
HUB_FILES = [
    "model_index.json", EMPTY_PROMPT_FILE,
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/*",
]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@\S+)?")

# SD 2.1-base architectures (diffusers config kwargs); used when no pretrained folder is given.
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
)
SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512,
    scaling_factor=0.18215,
)
SD21_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=0,
)


# SD 2.1-base's schedule (LDM's "linear" = diffusers' scaled_linear): the defaults with random weights.
SD21_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon")
# What a folder's scheduler_config.json may set besides those (passed on to DDPMScheduler when present).
FOLDER_SCHEDULE_KEYS = ("trained_betas", "rescale_betas_zero_snr")


@dataclasses.dataclass
class SchedulerConfig:
    """The diffusion schedule and what the UNet predicts. null: from the SD folder's
    ``scheduler/scheduler_config.json`` (random weights: SD 2.1-base's, ``SD21_SCHEDULER``)."""

    num_train_timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    prediction_type: str | None = None  # epsilon | v_prediction

    def __post_init__(self):
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)} or null, "
                             f"got {self.prediction_type!r}")


@dataclasses.dataclass
class BackboneConfig:
    """Where SD 2.1 comes from. ``pretrained: null`` (and no $SDATC_SD21_PATH) builds random weights
    from the architecture dicts below (the full SD 2.1 sizes by default; tiny ones for tests)."""

    pretrained: str | None = None
    unet: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(SD21_UNET))
    vae: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(SD21_VAE))
    text_encoder: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(SD21_TEXT))
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    seed: int = 0  # random-weight init seed (pretrained: null)


@dataclasses.dataclass
class Backbone:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    empty_prompt_embeds: torch.Tensor  # (1, 77, cross_attention_dim)
    scheduler: DDPMScheduler
    text_encoder_params: int  # counted for reports; the text encoder itself is not kept
    source: str  # folder path, "org/name@revision (snapshot path)" for a Hub id, or "random"
    text_rng_state: torch.Tensor | None = None  # random weights: the CPU RNG state the text encoder was built from


def resolve_pretrained(cfg: BackboneConfig) -> Path | None:
    """The local SD 2.1 folder of ``pretrained`` (or $SDATC_SD21_PATH): a folder as given, a Hub id as its
    cached snapshot; None when neither is set (random weights)."""
    resolved = _resolve(cfg)
    return None if resolved is None else resolved[0]


def _resolve(cfg: BackboneConfig) -> tuple[Path, str] | None:
    """(folder, source) where source names the folder, or ``repo@revision (snapshot path)`` for a Hub id."""
    value = cfg.pretrained or os.environ.get(ENV_SD21) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.exists() and not is_local_path(value) and HUB_ID.fullmatch(value):
        path, source = hub_snapshot(value)
    elif not path.is_dir():
        what = "not a folder" if path.exists() else "no such folder"
        raise SdatcError(f"SD 2.1 folder not found: {what} {path} (taken as a path: nothing is downloaded); "
                         f"{SD21_HELP}")
    else:
        source = str(path)
    missing = [s for s in ("unet", "vae", "scheduler") if not (path / s / _config_name(s)).is_file()]
    if missing:
        raise SdatcError(f"{path} is not a complete SD 2.1 diffusers folder "
                         f"(missing {', '.join(s + '/' for s in missing)}; "
                         f"expected {', '.join(s + '/' for s in SD21_SUBFOLDERS)}); {SD21_HELP}")
    return path, source


def is_local_path(value: str) -> bool:
    """``pretrained`` is a path, never a Hub id, when it starts with ``./``, ``../``, ``/`` or ``~``, or when
    its first component is an existing local folder (``weights/stable-diffusion-2-1-base`` with ``weights/``)."""
    if value.startswith(("./", "../", "/", "~", ".\\", "..\\")) or value in (".", ".."):
        return True
    first = value.split("/", 1)[0]
    return bool(first) and Path(first).is_dir()


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


_ONLINE: dict[tuple, tuple[Path, str]] = {}  # resolved online once per process


def hub_snapshot(value: str, patterns: list[str] | None = None) -> tuple[Path, str]:
    """Snapshot folder of Hub id ``org/name[@revision]`` in the cache; downloads what is missing (the files
    matching ``patterns``, default: an SD 2.1 folder's) when online."""
    import huggingface_hub
    from huggingface_hub import errors

    repo, _, revision = value.partition("@")
    revision = revision or None
    cache, offline = hub_cache_dir(), hub_offline()
    key = (repo, revision, str(cache), tuple(patterns or ()))
    if not offline and key in _ONLINE:
        return _ONLINE[key]
    name = f"{repo}@{revision or 'main'}"
    both = (f"give pretrained= (or ${ENV_SD21}) as a local diffusers folder (unet/ vae/ scheduler/ text_encoder/ "
            "tokenizer/) or as a Hub id such as stabilityai/stable-diffusion-2-1-base")
    if not offline:
        print(f"fetching {name} from the Hugging Face Hub into {cache} (configs + safetensors of "
              f"unet/ vae/ scheduler/ text_encoder/ tokenizer/; cached files are not downloaded again)")
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=patterns or HUB_FILES,
                                                   cache_dir=str(cache), local_files_only=offline)
    except errors.IncompleteSnapshotError as e:  # a LocalEntryNotFoundError: the cache holds part of the files
        raise SdatcError(f"{name} in the Hugging Face cache {cache} is incomplete: {str(e).splitlines()[0]}") from None
    except errors.LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE=1: the cache only" if offline
               else f"the Hub cannot be reached ({str(e).splitlines()[0][:120]})")
        raise SdatcError(f"SD 2.1 folder not found: {value}, and Hub repo {name} is not in the Hugging Face cache "
                         f"{cache} ({why}); {both} that is in the cache or, online (HF_HUB_OFFLINE unset), "
                         "is downloaded there") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise SdatcError(f"SD 2.1 folder not found: {value}, and the Hub has no accessible repo {repo} "
                         f"({type(e).__name__}: private or gated repos need `hf auth login`); {both}") from None
    except errors.RevisionNotFoundError:
        raise SdatcError(f"Hub repo {repo} has no revision {revision!r}; {both}") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        raise SdatcError(f"cannot get {name} from the Hugging Face Hub: {str(e).splitlines()[0]}; {both}") from None
    folder = Path(folder)
    result = folder, f"{name} ({folder})"
    if not offline:
        _ONLINE[key] = result
    return result


def _config_name(sub: str) -> str:
    return "scheduler_config.json" if sub == "scheduler" else "config.json"


def make_scheduler(cfg: SchedulerConfig, folder: Path | None = None) -> DDPMScheduler:
    """DDPMScheduler from ``folder/scheduler/scheduler_config.json`` (or SD 2.1-base's schedule without
    a folder), with the non-null values of ``cfg`` on top; one note line when they differ from the folder."""
    from diffusers import DDPMScheduler

    ours = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}  # the config's overrides
    if folder is None:
        return DDPMScheduler(**{**SD21_SCHEDULER, **ours}, clip_sample=False)
    file = folder / "scheduler" / _config_name("scheduler")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise SdatcError(f"cannot read {file}: {str(e).splitlines()[0]}") from None
    # what the file omits takes diffusers' defaults (as DDPMScheduler.from_pretrained would)
    theirs = {k: data[k] for k in (*SD21_SCHEDULER, *FOLDER_SCHEDULE_KEYS) if data.get(k) is not None}
    theirs.setdefault("prediction_type", "epsilon")
    if "prediction_type" not in ours:
        check_prediction_type(theirs["prediction_type"], str(file))
    changed = [f"{k}={v} (folder: {theirs[k]})" for k, v in ours.items() if k in theirs and v != theirs[k]]
    if changed:
        print(f"note: backbone.scheduler overrides {file}: {', '.join(changed)}")
    return DDPMScheduler(**{**theirs, **ours}, clip_sample=False)


def build_text_encoder(cfg: dict[str, Any]):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**cfg))


def load_backbone(cfg: BackboneConfig, with_text_encoder: bool = False) -> Backbone:
    """UNet, VAE, scheduler and the cached empty-prompt embedding (frozen, eval mode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    resolved = _resolve(cfg)
    path, source = resolved if resolved is not None else (None, "random")
    scheduler = make_scheduler(cfg.scheduler, path)  # first: a bad scheduler config fails before the weights load
    if path is None:
        torch.manual_seed(cfg.seed)
        unet = UNet2DConditionModel(**cfg.unet)
        vae = AutoencoderKL(**cfg.vae)
        text_rng = torch.get_rng_state()  # PromptEncoder rebuilds this text encoder from it
        text = build_text_encoder(cfg.text_encoder)
        embeds = _encode_empty_prompt(text, None)
        n_text = sum(p.numel() for p in text.parameters())
        if not with_text_encoder:
            del text
    else:
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        except (OSError, ValueError) as e:
            raise SdatcError(f"cannot load SD 2.1 from {path}: {str(e).splitlines()[0]}; {SD21_HELP}") from None
        embeds, n_text = _cached_empty_prompt(path)
        text_rng = None
    for m in (unet, vae):
        m.requires_grad_(False).eval()
    return Backbone(unet, vae, embeds, scheduler, n_text, source, text_rng)


def encode_prompt(cfg: BackboneConfig, prompt: str) -> torch.Tensor:
    """The text encoder's last hidden state for ``prompt`` (1, 77, D), e.g. VSD's negative prompt. From the
    SD folder's text_encoder/ and tokenizer/; with random weights (no folder) a random text encoder of
    ``cfg.text_encoder`` on byte-derived token ids (smoke runs only)."""
    path = resolve_pretrained(cfg)
    if path is None:
        torch.manual_seed(cfg.seed)
        text = build_text_encoder(cfg.text_encoder)
        c, n = text.config, text.config.max_position_embeddings
        ids = torch.full((1, n), c.pad_token_id, dtype=torch.long)
        body = [3 + b % (c.vocab_size - 3) for b in prompt.encode()][: n - 2]
        ids[0, : len(body) + 2] = torch.tensor([c.bos_token_id, *body, c.eos_token_id])
        with torch.no_grad():
            return text(ids)[0].float().contiguous()
    if not (path / "text_encoder").is_dir() or not (path / "tokenizer").is_dir():
        raise SdatcError(f"{path}: encoding the prompt {prompt!r} needs text_encoder/ and tokenizer/; {SD21_HELP}")
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return text(ids)[0].float().contiguous()


def _byte_ids(config, prompt: str) -> torch.Tensor:
    """(1, 77) token ids without a tokenizer (random weights): BOS, the prompt's bytes mapped into the
    vocabulary, EOS, then padding; for "" what the CLIP tokenizer gives (BOS, EOS, padding)."""
    n = config.max_position_embeddings
    ids = torch.full((1, n), config.pad_token_id, dtype=torch.long)
    body = [3 + b % (config.vocab_size - 3) for b in prompt.encode()][: n - 2]
    ids[0, : len(body) + 2] = torch.tensor([config.bos_token_id, *body, config.eos_token_id])
    return ids


class PromptEncoder:
    """SD's tokenizer and CLIP text encoder for inference prompts, loaded at the first call and kept (on the
    CPU, fp32; one prompt per clip costs one text-encoder pass): from the backbone's folder or Hub snapshot
    (``text_encoder/``, ``tokenizer/``), by the rules of :func:`load_backbone`; with random weights the very
    text encoder :func:`load_backbone` built (rebuilt from ``rng_state``) on byte-derived token ids, so that
    ``""`` gives the cached empty-prompt embedding. Encodings are cached per text.

        enc = PromptEncoder(cfg.backbone, model.text_rng_state)
        states = enc(["a photo of a cat", "a dog"])   # (2, 77, D) float32
    """

    def __init__(self, cfg: BackboneConfig, rng_state: torch.Tensor | None = None):
        self.cfg, self.rng_state = cfg, rng_state
        self.text = self.tokenizer = None
        self.cache: dict[str, torch.Tensor] = {}

    def _load(self, first: str) -> None:
        path = resolve_pretrained(self.cfg)
        if path is None:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
                if self.rng_state is not None:
                    torch.set_rng_state(self.rng_state)
                else:  # (a backbone not built by load_backbone) the seed alone
                    torch.manual_seed(self.cfg.seed)
                self.text = build_text_encoder(self.cfg.text_encoder).eval()
            return
        if not (path / "text_encoder").is_dir() or not (path / "tokenizer").is_dir():
            raise SdatcError(f"{path}: the prompt {first[:60]!r} needs SD's text encoder, but the folder has no "
                             f"text_encoder/ and tokenizer/ (a pipeline saved by save_pretrained keeps only the empty "
                             f"prompt): point model.backbone.pretrained (pretrained=) at the full SD 2.1 folder; "
                             f"{SD21_HELP}")
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
            self.text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise SdatcError(f"cannot load SD's text encoder from {path}: {str(e).splitlines()[0]}") from None

    def ids(self, prompt: str) -> torch.Tensor:
        """(1, 77) token ids of ``prompt`` (truncated to the text encoder's 77 positions)."""
        if self.tokenizer is None:
            return _byte_ids(self.text.config, prompt)
        n = self.text.config.max_position_embeddings  # 77 (what SD's tokenizer_config says as model_max_length)
        return self.tokenizer(prompt, padding="max_length", max_length=n, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), 77, D) float32 on the CPU: the text encoder's last hidden state of each prompt."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if todo and self.text is None:
            self._load(todo[0])
        for p in todo:
            self.cache[p] = self.text(self.ids(p))[0].float().contiguous()
        return torch.cat([self.cache[p] for p in prompts])


def _encode_empty_prompt(text_encoder, tokenizer) -> torch.Tensor:
    """Last hidden state of the text encoder for the prompt "" (SD 2.1 uses the penultimate-free last layer)."""
    n = text_encoder.config.max_position_embeddings
    if tokenizer is not None:
        ids = tokenizer("", padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    else:  # no tokenizer (random weights): BOS, EOS, then padding, as the CLIP tokenizer gives for ""
        c = text_encoder.config
        ids = torch.full((1, n), c.pad_token_id, dtype=torch.long)
        ids[0, 0], ids[0, 1] = c.bos_token_id, c.eos_token_id
    with torch.no_grad():
        return text_encoder(ids)[0].float().contiguous()


def _cached_empty_prompt(path: Path) -> tuple[torch.Tensor, int]:
    """Read the cached embedding beside the weights, or compute it once with the text encoder.
    For a Hub id the folder is the commit's snapshot in the HF cache: the file is written there as a plain
    file (tied to that commit, deleted with it by ``hf cache delete``; huggingface_hub tolerates it)."""
    cache = path / EMPTY_PROMPT_FILE
    if cache.is_file():
        data = load_file(cache)
        return data["embeds"], int(data["text_encoder_params"].item())
    if not (path / "text_encoder").is_dir() or not (path / "tokenizer").is_dir():
        raise SdatcError(f"{path}: no cached empty-prompt embedding ({EMPTY_PROMPT_FILE}) and no text_encoder/ + "
                         f"tokenizer/ to compute it; {SD21_HELP}")
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
    embeds = _encode_empty_prompt(text, tok)
    n_text = sum(p.numel() for p in text.parameters())
    try:
        from sdatc.utils import atomic_path

        with atomic_path(cache) as tmp:
            save_file({"embeds": embeds, "text_encoder_params": torch.tensor([n_text])}, str(tmp))
    except OSError:  # read-only weights folder: recompute next time
        pass
    return embeds, n_text


# What the UNet predicts: epsilon or v (SD 2.1-base: epsilon; SD 2.1 768: v_prediction).
#
#     x0, eps = split_prediction(unet_out, z_t, alphas_cumprod[t], "v_prediction")
#     loss = mse(unet_out, training_target(z0, noise, alphas_cumprod[t], "v_prediction"))
#
# With ``a = alphas_cumprod[t]`` and ``z_t = sqrt(a) z0 + sqrt(1 - a) eps``:
# epsilon: ``x0 = (z_t - sqrt(1 - a) eps) / sqrt(a)``; v (Salimans & Ho 2022):
# ``v = sqrt(a) eps - sqrt(1 - a) z0``, so ``x0 = sqrt(a) z_t - sqrt(1 - a) v`` and
# ``eps = sqrt(1 - a) z_t + sqrt(a) v``.


def check_prediction_type(prediction_type: str, where: str = "the scheduler config") -> str:
    """The type itself, or a one-line error naming where it came from."""
    if prediction_type not in PREDICTION_TYPES:
        raise SdatcError(f"prediction_type {prediction_type!r} from {where} is not supported "
                         f"(sdatc runs {' and '.join(PREDICTION_TYPES)})")
    return prediction_type


def _alpha(a: Tensor | float, like: Tensor) -> Tensor:
    """alpha-bar as a tensor broadcastable over ``like`` (N, C, H, W): a scalar or one value per row."""
    a = torch.as_tensor(a, device=like.device, dtype=torch.float64 if not torch.is_tensor(a) else None)
    a = a.to(device=like.device, dtype=torch.float32)
    return a.view(-1, *([1] * (like.ndim - 1))) if a.ndim else a


def split_prediction(output: Tensor, z_t: Tensor, a: Tensor | float, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from the UNet output at noise level alpha-bar ``a``; computed in float32."""
    out, z, a = output.float(), z_t.float(), _alpha(a, z_t)
    if prediction_type == "epsilon":
        return (z - (1 - a).sqrt() * out) / a.sqrt(), out
    if prediction_type == "v_prediction":
        return a.sqrt() * z - (1 - a).sqrt() * out, (1 - a).sqrt() * z + a.sqrt() * out
    raise SdatcError(f"unknown prediction_type {prediction_type!r} (sdatc runs {' and '.join(PREDICTION_TYPES)})")


def training_target(z0: Tensor, noise: Tensor, a: Tensor | float, prediction_type: str) -> Tensor:
    """What the UNet should output for ``z_t = sqrt(a) z0 + sqrt(1 - a) noise``; float32."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        a = _alpha(a, z0)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * z0.float()
    raise SdatcError(f"unknown prediction_type {prediction_type!r} (sdatc runs {' and '.join(PREDICTION_TYPES)})")

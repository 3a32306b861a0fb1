"""What SDATC and UltraVSR share as models on a frozen SD 2.1: taking over the backbone, and saving / loading
their trained modules (one safetensors file of the trainable tensors + the empty-prompt embedding, and the
model's ``config.yaml``).

Every folder of weights sdatc writes (``save_pretrained``, training checkpoints) ends with ``checksums.json``:
the size and sha256 of each of its files, written last. :func:`checksum_problem` compares a folder with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdatc.config import dump_config, load_config
from sdatc.errors import SdatcError

CONFIG_NAME = "config.yaml"
CHECKSUMS_NAME = "checksums.json"
CHECKSUMS_FORMAT = "sdatc-checksums/1"


def write_checksums(folder: str | Path, names: list[str] | None = None) -> Path:
    """``folder/checksums.json``: size and sha256 of the files ``names`` (default: every file below
    ``folder``); call it after the last file is written (the manifest itself is written atomically)."""
    from sdatc.utils import atomic_write_text, sha256_file

    folder = Path(folder)
    if names is None:
        names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
                 if p.is_file() and not p.name.startswith(".")]
    files = {rel: {"bytes": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
             for rel in names if rel != CHECKSUMS_NAME}
    out = folder / CHECKSUMS_NAME
    atomic_write_text(out, json.dumps({"format": CHECKSUMS_FORMAT, "files": files}, indent=1) + "\n")
    return out


def read_checksums(folder: str | Path) -> dict[str, dict] | None:
    """The ``{file: {"bytes", "sha256"}}`` of ``folder/checksums.json``; None when there is none.
    An unreadable manifest raises SdatcError."""
    path = Path(folder) / CHECKSUMS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("format") != CHECKSUMS_FORMAT or not all(
                isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str) for v in files.values()):
            raise ValueError("not an sdatc checksums file")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SdatcError(f"{CHECKSUMS_NAME} is unreadable ({type(e).__name__})") from None
    return files


def checksum_problem(folder: str | Path, names: list[str] | None = None) -> str | None:
    """Why ``folder`` does not match its ``checksums.json`` (one phrase), or None when it does.

    ``names``: check only these files (each must be listed); default every listed file. A folder
    without the manifest is reported as ``"no checksums.json"``; callers decide what that means.
    """
    from sdatc.utils import sha256_file

    folder = Path(folder)
    try:
        listed = read_checksums(folder)
    except SdatcError as e:
        return str(e)
    if listed is None:
        return f"no {CHECKSUMS_NAME}"
    for name in names if names is not None else sorted(listed):
        want = listed.get(name)
        if want is None:
            return f"{name} is not listed in {CHECKSUMS_NAME}"
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            short = " (cut short)" if size < want["bytes"] else ""
            return f"{name} has {size} bytes, {want['bytes']} were saved{short}"
        if sha256_file(path) != want["sha256"]:
            return f"{name} differs from the saved file (sha256 mismatch: changed or corrupted on disk)"
    return None


def verify_weights(file: str | Path) -> bool:
    """Check a weights file (and the ``config.yaml`` beside it) against the ``checksums.json`` that lists it:
    its folder's, or the one above (a training checkpoint's ``ema/``). SdatcError naming the folder and what
    differs; True when verified, False when no manifest lists the file (loaded unverified)."""
    file = Path(file)
    for folder in (file.parent, file.parent.parent):
        try:
            listed = read_checksums(folder)
        except SdatcError as e:
            raise SdatcError(f"damaged checkpoint {folder}: {e}") from None
        rel = file.relative_to(folder).as_posix()
        if listed is None or rel not in listed:
            continue
        config = (file.parent / CONFIG_NAME).relative_to(folder).as_posix()
        why = checksum_problem(folder, [rel] + ([config] if config in listed and config != rel else []))
        if why is not None:
            raise SdatcError(f"damaged checkpoint {folder}: {why}")
        return True
    return False


def check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Strict: any missing/unexpected key or shape mismatch is an error naming the first few."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith("_")]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise SdatcError(f"{source} does not match this model: " + "; ".join(parts))


class TrainedModules:
    """``save_pretrained`` / ``from_pretrained`` for a model class with ``WEIGHTS_NAME``, ``FORMAT``,
    ``CONFIG_CLS``, ``from_config``, ``trainable_state_dict`` and ``load_trainable_state_dict``."""

    WEIGHTS_NAME = ""
    FORMAT = ""
    CONFIG_CLS: type = object

    def adopt_backbone(self, backbone) -> None:
        """Take SD's UNet, VAE and scheduler (frozen), the prediction type and the empty-prompt embedding."""
        from sdatc.models.sites import check_unet

        self.unet, self.vae, self.scheduler = backbone.unet, backbone.vae, backbone.scheduler
        check_unet(self.unet)
        self.prediction_type = self.scheduler.config.prediction_type  # what the UNet predicts: epsilon | v_prediction
        self.backbone_source, self.text_encoder_params = backbone.source, backbone.text_encoder_params
        self.register_buffer("empty_prompt_embeds", backbone.empty_prompt_embeds, persistent=False)
        self.text_rng_state = backbone.text_rng_state  # random weights: how to rebuild the text encoder
        self._prompt_encoder = None  # sdatc.models.backbone.PromptEncoder, made at the first non-empty prompt
        self.latent_scale = float(self.vae.config.scaling_factor)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(P, 77, D) text-encoder states of ``prompts`` (float32, CPU), for ``predict(..., context=)``: ``""``
        is the cached empty-prompt embedding, anything else goes through SD's text encoder, loaded at the first
        such prompt and kept (``sdatc.models.backbone.PromptEncoder``)."""
        from sdatc.models.backbone import PromptEncoder

        if any(prompts) and self._prompt_encoder is None:
            self._prompt_encoder = PromptEncoder(self.cfg.backbone, self.text_rng_state)
        empty = self.empty_prompt_embeds.detach().float().cpu()
        return torch.cat([empty if not p else self._prompt_encoder([p]) for p in prompts])

    def save_pretrained(self, folder: str | Path) -> Path:
        """``folder/<WEIGHTS_NAME>`` (trainable weights + empty-prompt embedding) and ``folder/config.yaml``;
        each written under a temporary name first."""
        from sdatc.utils import atomic_path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {**self.trainable_state_dict(), "_empty_prompt_embeds": self.empty_prompt_embeds.cpu().contiguous()}
        with atomic_path(folder / self.WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": self.FORMAT})
        dump_config(self.cfg, folder / CONFIG_NAME)
        write_checksums(folder, [self.WEIGHTS_NAME, CONFIG_NAME])
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, overrides: list[str] | tuple = ()):
        """Rebuild from ``folder/config.yaml`` (+ overrides such as ``backbone.pretrained=...``) and load the
        trainable weights strictly."""
        folder = Path(folder)
        weights = folder / cls.WEIGHTS_NAME
        if not weights.is_file():
            raise SdatcError(f"no {cls.WEIGHTS_NAME} in {folder}")
        verify_weights(weights)
        model = cls.from_config(load_config(cls.CONFIG_CLS, folder / CONFIG_NAME, overrides))
        model.load_trainable_state_dict(load_file(weights), str(weights))
        return model

"""What SDATC and UltraVSR share as models on a frozen SD 2.1: taking over the backbone, and saving / loading
their trained modules (one safetensors file of the trainable tensors + the empty-prompt embedding, and the
model's ``config.yaml``)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdatc.config import dump_config, load_config
from sdatc.errors import SdatcError

CONFIG_NAME = "config.yaml"


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
        from sdatc.models.drivers import check_unet

        self.unet, self.vae, self.scheduler = backbone.unet, backbone.vae, backbone.scheduler
        check_unet(self.unet)
        self.prediction_type = self.scheduler.config.prediction_type  # what the UNet predicts: epsilon | v_prediction
        self.backbone_source, self.text_encoder_params = backbone.source, backbone.text_encoder_params
        self.register_buffer("empty_prompt_embeds", backbone.empty_prompt_embeds, persistent=False)
        self.latent_scale = float(self.vae.config.scaling_factor)

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
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, overrides: list[str] | tuple = ()):
        """Rebuild from ``folder/config.yaml`` (+ overrides such as ``backbone.pretrained=...``) and load the
        trainable weights strictly."""
        folder = Path(folder)
        weights = folder / cls.WEIGHTS_NAME
        if not weights.is_file():
            raise SdatcError(f"no {cls.WEIGHTS_NAME} in {folder}")
        model = cls.from_config(load_config(cls.CONFIG_CLS, folder / CONFIG_NAME, overrides))
        model.load_trainable_state_dict(load_file(weights), str(weights))
        return model

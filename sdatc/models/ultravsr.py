"""UltraVSR: one-step diffusion VSR on a frozen SD 2.1 with RTS and LoRA (docs/architecture.md, "UltraVSR").

    model = UltraVSR.from_config(load_config(UltraVSRConfig, "configs/model/ultravsr_tiny.yaml"))
    z = model.encode(up)                                   # bicubic x4 LR in [0, 1] -> z_LR (N, 4, H/8, W/8)
    t, D = drs_step(model.scheduler.alphas_cumprod, d)     # DRS: d in [0, 1] -> t_rec, D = d^2
    out = model.predict(z, t, num_frames=5)                # UNet + LoRA + RTS, one call: epsilon or v
    z0 = one_step_x0(out, z, D, model.prediction_type)     # z_HR = (z - sqrt(1 - D) eps) / sqrt(D)
    y = model.decode(z0, num_frames=5)                     # VAE decoder + RTS, [-1, 1]

RTS (sdatc/models/rts.py) sits at Sites (sdatc/models/sites.py): after each UNet down block (the skips are
taken before it), before each UNet up block, before each VAE-decoder up block. LoRA (peft) on the UNet as
three adapters (``down``: down blocks + conv_in, ``up``: up blocks + conv_out, ``rest``: the mid block) and
on the VAE encoder (+ quant_conv); the UNet's conv_in trains in full. Everything else is frozen SD.
``chunk`` (TAI): the frozen blocks run on chunks of that many frames, RTS on the whole window.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn

from sdatc.errors import SdatcError
from sdatc.models.backbone import Backbone, BackboneConfig, check_prediction_type, load_backbone
from sdatc.models.rts import RTS, RTSConfig
from sdatc.models.saving import TrainedModules, check_state
from sdatc.models.sites import Ctx, Placement, insert, pretrained_modules, sites, unet_forward, vae_decode, vae_encode

WEIGHTS_NAME = "ultravsr_modules.safetensors"
FORMAT = "ultravsr/1"
GROUPS = ("rts_unet", "rts_vae", "lora_unet", "lora_vae", "conv_in")
# The reference's LoRA targets: modules whose name ends with one of these (attention projections,
# feed-forward, resnet and sampler convs, proj_in/out, conv_in/out): every Linear/Conv2d but the time embedding.
LORA_SUFFIXES = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                 "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")


@dataclasses.dataclass
class LoRASettings:
    rank: int = 4  # [guess] the released code sets none; OSEDiff's default
    alpha: float = 8.0  # peft's default lora_alpha, which the reference keeps
    init: str = "gaussian"  # peft init_lora_weights: A gaussian, B zero (an untrained adapter adds nothing)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive int, got {self.rank!r}")


@dataclasses.dataclass
class UltraVSRSwitches:
    rts_unet: bool = True
    rts_vae: bool = True
    lora_unet: bool = True
    lora_vae: bool = True
    conv_in: bool = True  # the UNet's conv_in trained in full


@dataclasses.dataclass
class UltraVSRConfig:
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    rts: RTSConfig = dataclasses.field(default_factory=RTSConfig)
    lora: LoRASettings = dataclasses.field(default_factory=LoRASettings)
    enabled: UltraVSRSwitches = dataclasses.field(default_factory=UltraVSRSwitches)
    upscale: int = 4
    # the x4 bicubic the one-step model sees: "pil" is the release's PIL Image.resize (Keys a = -0.5 on 8-bit
    # frames, inference.py:113 at f3672761); "torch" is F.interpolate(bicubic, a = -0.75) on floats
    input_resize: str = "pil"

    def __post_init__(self):
        if self.upscale != 4:
            raise ValueError(f"upscale must be 4 (the VAE latent of a x4 bicubic LR), got {self.upscale}")
        if self.input_resize not in ("pil", "torch"):
            raise ValueError(f"input_resize must be 'pil' or 'torch', got {self.input_resize!r}")


def is_ultravsr_config(path) -> bool:
    """Whether the model config file at ``path`` is UltraVSR's (it or its ``base:`` chain has an ``rts`` section)."""
    from sdatc.config import read_config_file

    return "rts" in read_config_file(path)


def bicubic_x4(lq: torch.Tensor, kind: str = "pil") -> torch.Tensor:
    """(N, 3, h, w) LR in [0, 1] -> (N, 3, 4h, 4w) in [0, 1], the image UltraVSR's encoder sees.

    ``pil``: each frame as 8-bit RGB through PIL's ``Image.resize`` with its bicubic (Keys a = -0.5, weights
    renormalised at the borders, 8-bit rounding after each pass), as the released inference does; the frames
    come from 8-bit video, so ``round(255 x)`` recovers them exactly. ``torch``: ``F.interpolate`` bicubic
    (a = -0.75, edge-replicated), on the device.
    """
    if kind == "torch":
        return torch.nn.functional.interpolate(lq, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    import numpy as np
    from PIL import Image

    frames = (lq.detach().float() * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()  # (N, h, w, 3)
    h, w = frames.shape[1:3]
    up = np.stack([np.asarray(Image.fromarray(f).resize((4 * w, 4 * h), Image.BICUBIC)) for f in frames])
    return torch.from_numpy(up).to(lq.device).permute(0, 3, 1, 2).to(lq.dtype) / 255  # (N, 3, 4h, 4w)


def drs_step(alphas_cumprod: torch.Tensor, d: float) -> tuple[int, float]:
    """DRS: D = d^2 used as alpha-bar; t_rec = argmin_t |abar_t - D|. Returns (t_rec, D)."""
    if not 0.0 < d <= 1.0:
        raise SdatcError(f"DRS degradation score d must be in (0, 1], got {d}")
    big_d = d * d
    return int((alphas_cumprod.double() - big_d).abs().argmin()), big_d


def one_step_x0(out: torch.Tensor, z: torch.Tensor, big_d, prediction_type: str) -> torch.Tensor:
    """z_HR from one UNet output at D (a float, or one per frame (N,)): epsilon -> (z - sqrt(1-D) eps) / sqrt(D);
    v -> sqrt(D) z - sqrt(1-D) v."""
    check_prediction_type(prediction_type)
    if isinstance(big_d, torch.Tensor):
        big_d = big_d.to(z).view(-1, 1, 1, 1)
        sq, sq1 = big_d.sqrt(), (1 - big_d).sqrt()
    else:
        sq, sq1 = math.sqrt(big_d), math.sqrt(1 - big_d)
    if prediction_type == "v_prediction":
        return sq * z - sq1 * out
    return (z - sq1 * out) / sq


def _lora_targets(root: nn.Module, keep) -> list[str]:
    return [n for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and n.endswith(LORA_SUFFIXES) and keep(n)]


class UltraVSR(TrainedModules, nn.Module):
    """Frozen SD 2.1 UNet + VAE with RTS, LoRA and a trained conv_in; one UNet call per frame."""

    WEIGHTS_NAME, FORMAT, CONFIG_CLS = WEIGHTS_NAME, FORMAT, UltraVSRConfig

    def __init__(self, cfg: UltraVSRConfig, backbone: Backbone):
        super().__init__()
        from peft import LoraConfig

        self.cfg, on = cfg, cfg.enabled
        self.adopt_backbone(backbone)  # unet, vae, scheduler, prediction_type, empty_prompt_embeds, ...
        lora = dict(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, init_lora_weights=cfg.lora.init)
        if on.lora_unet:  # three adapters, as the reference: down (+conv_in), up (+conv_out), the rest
            groups = {"down": lambda n: n.startswith("down_blocks.") or n == "conv_in",
                      "up": lambda n: n.startswith("up_blocks.") or n == "conv_out"}
            groups["rest"] = lambda n: not any(g(n) for g in list(groups.values())[:2])
            names = []
            for name, keep in groups.items():
                targets = _lora_targets(self.unet, keep)
                if targets:
                    with warnings.catch_warnings():  # peft warns that a second adapter is added: as intended
                        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                        self.unet.add_adapter(LoraConfig(target_modules=targets, **lora), adapter_name=name)
                    names.append(name)
            self.unet.set_adapter(names)
        if on.lora_vae:  # the encoder and quant_conv; the decoder has none
            targets = _lora_targets(self.vae, lambda n: n.startswith("encoder.")) + ["quant_conv"]
            self.vae.add_adapter(LoraConfig(target_modules=targets, **lora), adapter_name="encoder")
        down_out = list(self.unet.config.block_out_channels)
        up_in = [down_out[-1]] + list(reversed(down_out))[:-1]  # mid, then each up block's output
        dec_in = [self.vae.config.block_out_channels[-1]] + list(reversed(self.vae.config.block_out_channels))[:-1]
        table = []
        if on.rts_unet:
            table += [Placement(f"unet.down_blocks.{i}", "post", "rts", RTS(c, cfg.rts))
                      for i, c in enumerate(down_out)]
            table += [Placement(f"unet.up_blocks.{i}", "pre", "rts", RTS(c, cfg.rts))
                      for i, c in enumerate(up_in)]
        if on.rts_vae:
            table += [Placement(f"vae.decoder.up_blocks.{i}", "pre", "rts", RTS(c, cfg.rts))
                      for i, c in enumerate(dec_in)]
        insert(self, table)
        self.gradient_checkpointing = False  # the VAE encoder's (see encode); the UNet's and Sites' are their own
        self.freeze_pretrained()

    # ------------------------------------------------------------------ construction, freezing

    @classmethod
    def from_config(cls, cfg: UltraVSRConfig) -> UltraVSR:
        return cls(cfg, load_backbone(cfg.backbone))

    def group_of(self, name: str) -> str | None:
        """The trainable group of parameter ``name`` (None: frozen SD)."""
        if ".rts." in name:
            return "rts_unet" if name.startswith("unet.") else "rts_vae"
        if ".lora_" in name:
            return "lora_unet" if name.startswith("unet.") else "lora_vae"
        if self.cfg.enabled.conv_in and name.startswith("unet.conv_in.") and ".lora_" not in name:
            return "conv_in"
        return None

    def new_modules(self) -> dict[str, nn.Module]:
        """The trainable parameters by group (views: ParameterLists of the model's own parameters)."""
        groups: dict[str, list] = {g: [] for g in GROUPS}
        for n, p in self.named_parameters():
            g = self.group_of(n)
            if g is not None:
                groups[g].append(p)
        return {g: nn.ParameterList(ps) for g, ps in groups.items() if ps}

    def freeze_pretrained(self) -> None:
        """Freeze SD; train RTS, the LoRA adapters and conv_in (the enabled ones)."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.group_of(name) is not None)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward: the UNet's blocks (diffusers' own switch, which also gives them
        their checkpoint function), the LoRA'd VAE encoder (its resnets and mid block, in :meth:`encode`, as
        SDATC's) and every Site (RTS with its block; in the decoder each up level). diffusers' VAE blocks keep
        their own flags off: the drivers call their parts (drivers.vae_encode / vae_decode)."""
        self.gradient_checkpointing = True
        self.unet.enable_gradient_checkpointing()
        for _, site in sites(self):
            site.gradient_checkpointing = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if self.group_of(n) is not None]

    @property
    def pad_multiple(self) -> int:
        """LR sizes must be a multiple of this (the latent of the x4 image must pass the UNet)."""
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return max(1, vae_factor * unet_factor // self.cfg.upscale)

    # ------------------------------------------------------------------ the stages

    def encode(self, img: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] (the bicubic x4 LR) -> scaled latent mode (N, 4, H/8, W/8); per frame chunks."""
        parts = img.split(chunk) if chunk else (img,)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        return torch.cat([vae_encode(self.vae, x * 2 - 1, checkpoint=ckpt)[0] for x in parts]) * self.latent_scale

    def predict(self, z: torch.Tensor, t: int | torch.Tensor, num_frames: int, chunk: int | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet output (epsilon or v) at timestep t for (N, 4, h, w) latents, N = B * num_frames.
        ``context``: the text encoder's states (1 or N, 77, D); None: the cached empty-prompt embedding."""
        t = torch.as_tensor(t, device=z.device).expand(z.shape[0])
        text = (self.empty_prompt_embeds if context is None else context).to(z.dtype).expand(z.shape[0], -1, -1)
        return unet_forward(self.unet, z, t, text, Ctx(num_frames=num_frames, chunk=chunk))

    def decode(self, z: torch.Tensor, num_frames: int, chunk: int | None = None) -> torch.Tensor:
        """(N, 4, h, w) scaled latents -> (N, 3, 8h, 8w) in [-1, 1] through the decoder with RTS."""
        if num_frames < 1 or z.shape[0] % num_frames:
            raise SdatcError(f"cannot split a batch of {z.shape[0]} frames into windows of {num_frames}")
        return vae_decode(self.vae, z / self.latent_scale, Ctx(num_frames=num_frames, chunk=chunk))

    # ------------------------------------------------------------------ save / load, report

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in self.named_parameters() if self.group_of(n) is not None}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        own = self.trainable_state_dict()
        check_state(own, state, source)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k in own:
                params[k].copy_(state[k])

    def parameter_report(self) -> dict:
        """Trainable and total parameters per group (rts_unet, rts_vae, lora_unet, lora_vae, conv_in) and SD."""
        modules = {g: {"trainable": 0, "total": 0} for g in GROUPS}
        sd = {id(p) for part in (self.unet, self.vae) for m in pretrained_modules(part)
              for p in m.parameters(recurse=False)}
        for n, p in self.named_parameters():
            g = self.group_of(n)
            if g is not None:
                modules[g]["trainable"] += p.numel() * p.requires_grad
                modules[g]["total"] += p.numel()
        for part in ("unet", "vae"):
            ps = [p for n, p in self.named_parameters()
                  if n.startswith(part + ".") and id(p) in sd and self.group_of(n) is None]
            modules[part] = {"trainable": 0, "total": sum(p.numel() for p in ps)}
        modules["text_encoder"] = {"trainable": 0, "total": self.text_encoder_params}
        return {"trainable": sum(v["trainable"] for v in modules.values()),
                "total": sum(v["total"] for v in modules.values()), "modules": modules}

"""SDATC: the one place that composes the frozen SD 2.1 backbone with the new modules.

    model = SDATC.from_config(load_config(ModelConfig, "configs/model/sdatc_tiny.yaml"))
    i_c = model.restore(lq)                             # (N,3,h,w) [0,1] -> (N,3,4h,4w), DCM
    z_c, feats = model.encode(i_c)                      # VAE encoder, CFW features
    out = model.predict_noise(z_t, t, z_c)              # guidance encoder + zero convs + UNet (+ CAPM)
    x0, eps = split_prediction(out, z_t, model.scheduler.alphas_cumprod[t], model.prediction_type)  # eps or v
    y = model.decode(z_0, feats, num_frames=5, w=0.75)  # VAE decoder + STAM + CAPM + CFW, [-1, 1]

Frames of a window are stacked on the batch axis: N = B * T. Only the new modules train; every SD
weight is frozen. Modules can be switched off (``enabled.*``) for ablations.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from torch import nn

from sdatc.config import dump_config, load_config
from sdatc.errors import SdatcError
from sdatc.models.backbone import Backbone, BackboneConfig, load_backbone
from sdatc.models.capm import CAPM, CAPMConfig
from sdatc.models.cfw import CFW, CFWConfig
from sdatc.models.dcm import DCM, DCMConfig
from sdatc.models.guidance import GuidanceConfig, GuidanceEncoder
from sdatc.models.prediction import split_prediction
from sdatc.models.stam import STAM, STAMConfig

WEIGHTS_NAME = "sdatc_modules.safetensors"
CONFIG_NAME = "config.yaml"
NEW_MODULES = ("dcm", "guidance", "capm_unet", "capm_vae", "stam", "cfw")


@dataclasses.dataclass
class ModuleSwitches:
    """Which new modules exist (ablations). Off: DCM -> bicubic x4, others -> the plain SD path."""

    dcm: bool = True
    guidance: bool = True
    capm_unet: bool = True
    capm_vae: bool = True
    stam: bool = True
    cfw: bool = True


@dataclasses.dataclass
class ModelConfig:
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    dcm: DCMConfig = dataclasses.field(default_factory=DCMConfig)
    guidance: GuidanceConfig = dataclasses.field(default_factory=GuidanceConfig)
    capm: CAPMConfig = dataclasses.field(default_factory=CAPMConfig)
    stam: STAMConfig = dataclasses.field(default_factory=STAMConfig)
    cfw: CFWConfig = dataclasses.field(default_factory=CFWConfig)
    enabled: ModuleSwitches = dataclasses.field(default_factory=ModuleSwitches)
    cfw_levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2])  # VAE encoder levels fused by CFW
    upscale: int = 4
    # retired keys, dropped from old config.yaml files with a note (sdatc.config)
    _legacy_keys = {"cfw_weight": "the CFW weight w is now the inference setting pipeline.cfw_weight; training uses 1"}

    def __post_init__(self):
        if self.upscale != self.dcm.upscale:
            raise ValueError(f"upscale {self.upscale} differs from dcm.upscale {self.dcm.upscale}")


class SDATC(nn.Module):
    """Frozen SD 2.1 UNet + VAE with DCM, guidance encoder + zero convs, CAPM, STAM and CFW."""

    def __init__(self, cfg: ModelConfig, backbone: Backbone):
        super().__init__()
        self.cfg, on = cfg, cfg.enabled
        self.unet, self.vae, self.scheduler = backbone.unet, backbone.vae, backbone.scheduler
        self.prediction_type = self.scheduler.config.prediction_type  # what the UNet predicts: epsilon | v_prediction
        self.backbone_source, self.text_encoder_params = backbone.source, backbone.text_encoder_params
        self.register_buffer("empty_prompt_embeds", backbone.empty_prompt_embeds, persistent=False)
        self.latent_scale = float(self.vae.config.scaling_factor)
        vae_boc = list(self.vae.config.block_out_channels)
        unet_boc = list(self.unet.config.block_out_channels)
        bad = [lv for lv in cfg.cfw_levels if not 0 <= lv < len(vae_boc)]
        if bad:
            raise SdatcError(f"cfw_levels {bad} outside the VAE's levels 0..{len(vae_boc) - 1}")

        self.dcm = DCM(cfg.dcm) if on.dcm else None
        self.guidance = GuidanceEncoder(cfg.guidance, self.unet.config) if on.guidance else None
        # CAPM at each UNet up level and each VAE-decoder level, at the level's resolution before
        # its upsampler (PromptIR's placement; 4x cheaper than after it). Widths: reversed channels.
        self.capm_unet = nn.ModuleList(CAPM(c, cfg.capm) for c in reversed(unet_boc)) if on.capm_unet else None
        self.capm_vae = nn.ModuleList(CAPM(c, cfg.capm) for c in reversed(vae_boc)) if on.capm_vae else None
        # STAM after every VAE-decoder ResnetBlock: mid block's first, then each up level's.
        stam_widths = [vae_boc[-1]] + [c for c in reversed(vae_boc) for _ in range(self.vae.config.layers_per_block + 1)]
        self.stam = nn.ModuleList(STAM(c, cfg.stam) for c in stam_widths) if on.stam else None
        self.cfw = nn.ModuleDict({str(lv): CFW(vae_boc[lv], cfg.cfw) for lv in cfg.cfw_levels}) if on.cfw else None
        self.gradient_checkpointing = False
        self._hooks = []
        if self.capm_unet is not None:  # at each UNet up level, before its upsampler (as PromptIR)
            for block, capm in zip(self.unet.up_blocks, self.capm_unet):
                if block.upsamplers:
                    self._hooks.append(block.upsamplers[0].register_forward_pre_hook(_input_hook(capm)))
                else:
                    self._hooks.append(block.register_forward_hook(_output_hook(capm)))
        self.freeze_pretrained()

    # ------------------------------------------------------------------ construction, freezing

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SDATC:
        return cls(cfg, load_backbone(cfg.backbone))

    def new_modules(self) -> dict[str, nn.Module]:
        """The enabled new (trainable) modules by name."""
        return {n: getattr(self, n) for n in NEW_MODULES if getattr(self, n) is not None}

    def freeze_pretrained(self) -> None:
        """Freeze every SD weight; the new modules train."""
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        for m in self.new_modules().values():
            m.requires_grad_(True)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward: UNet (diffusers), guidance encoder, DCM, and in the VAE each
        resnet with its STAM, CFW and the decoder-side CAPM."""
        self.gradient_checkpointing = True
        self.unet.enable_gradient_checkpointing()
        for m in (self.guidance, self.dcm):
            if m is not None:
                m.gradient_checkpointing = True

    def _ckpt(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.new_modules().values() for p in m.parameters() if p.requires_grad]

    @property
    def pad_multiple(self) -> int:
        """LR sizes must be a multiple of this for the latent to pass the UNet (pad, then crop)."""
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return max(1, vae_factor * unet_factor // self.cfg.upscale)

    # ------------------------------------------------------------------ the four stages

    def restore(self, lq: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) LQ in [0, 1] -> (N, 3, 4h, 4w) I_c: DCM, or bicubic x4 when the DCM is off."""
        if self.dcm is not None:
            return self.dcm(lq)
        return F.interpolate(lq, scale_factor=self.cfg.upscale, mode="bicubic", align_corners=False).clamp(0, 1)

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """VAE encoder on (N, 3, H, W) in [0, 1] -> scaled latent mode (N, 4, H/8, W/8) and the
        features at ``cfw_levels`` (after each level's resblocks, before downsampling)."""
        enc = self.vae.encoder
        h = enc.conv_in(img * 2 - 1)  # (N, 128, H, W)
        feats = {}
        for level, down in enumerate(enc.down_blocks):
            for resnet in down.resnets:
                h = self._ckpt(resnet, h, None)
            if level in self.cfg.cfw_levels:
                feats[level] = h  # (N, C_level, H/2^level, W/2^level)
            for d in down.downsamplers or []:
                h = d(h)
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))  # (N, 8, H/8, W/8)
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        mean = h[:, : self.vae.config.latent_channels]  # the posterior mode
        return mean * self.latent_scale, feats

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        """The UNet output (epsilon or v: ``prediction_type``) for (N, 4, h, w) noisy latents at timesteps
        t (N,) given the condition latent z_c."""
        t = torch.as_tensor(t, device=z_t.device).expand(z_t.shape[0])
        ctx = self.empty_prompt_embeds.to(z_t.dtype).expand(z_t.shape[0], -1, -1)  # (N, 77, D)
        down_res, mid_res = (None, None)
        if self.guidance is not None:
            down_res, mid_res = self.guidance(z_t, z_c, t)  # 12 x (N, C_i, h_i, w_i), (N, C_mid, h/8, w/8)
        return self.unet(z_t, t, encoder_hidden_states=ctx, down_block_additional_residuals=down_res,
                         mid_block_additional_residual=mid_res, return_dict=False)[0]

    def decode(self, z: torch.Tensor, feats: dict[int, torch.Tensor] | None = None, num_frames: int = 1,
               w: float = 1.0) -> torch.Tensor:
        """VAE decoder with STAM (over windows of ``num_frames``), CFW (weight ``w``) and CAPM.
        z: (N, 4, h, w) scaled latents, N = B * num_frames -> (N, 3, 8h, 8w) in [-1, 1]."""
        if num_frames < 1 or z.shape[0] % num_frames:
            raise SdatcError(f"cannot split a batch of {z.shape[0]} frames into windows of {num_frames}")
        if not 0.0 <= w <= 1.0:  # w: 1 in training; inference passes pipeline.cfw_weight
            raise SdatcError(f"CFW weight w must be in [0, 1], got {w}")
        dec = self.vae.decoder
        h = z / self.latent_scale
        if self.vae.post_quant_conv is not None:
            h = self.vae.post_quant_conv(h)
        h = dec.conv_in(h)  # (N, 512, h, w)
        stam = iter(self.stam) if self.stam is not None else None
        mid = dec.mid_block
        h = self._ckpt(_res_stam, mid.resnets[0], _next(stam), h, num_frames)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            h = resnet(attn(h) if attn is not None else h, None)
        n_levels = len(dec.up_blocks)
        for i, up in enumerate(dec.up_blocks):
            for resnet in up.resnets:
                h = self._ckpt(_res_stam, resnet, _next(stam), h, num_frames)  # (N, C_i, h * 2^i, w * 2^i)
            level = n_levels - 1 - i  # the encoder level at this resolution
            if self.cfw is not None and str(level) in self.cfw and feats is not None:
                h = self._ckpt(self.cfw[str(level)], h, feats[level], w)
            if self.capm_vae is not None:  # at the level's resolution, before upsampling
                h = self._ckpt(self.capm_vae[i], h)
            for u in up.upsamplers or []:
                h = u(h)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))  # (N, 3, 8h, 8w)

    # ------------------------------------------------------------------ one-pass reconstruction

    def forward(self, lq: torch.Tensor, num_frames: int, t: torch.Tensor | int = 999, noise: torch.Tensor | None = None,
                w: float = 1.0) -> torch.Tensor:
        """One denoising pass: (N, 3, h, w) LQ in [0, 1] -> (N, 3, 4h, 4w) in [0, 1] from the x0
        prediction at timestep t of q_sample(z_c, t). Any LR size: padded (reflect), cropped back."""
        n, _, h, w_ = lq.shape
        m = self.pad_multiple
        ph, pw = -h % m, -w_ % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w_ else "replicate"
            lq = F.pad(lq, (0, pw, 0, ph), mode=mode)
        i_c = self.restore(lq)
        z_c, feats = self.encode(i_c)
        t = torch.as_tensor(t, device=lq.device).expand(n)
        noise = torch.randn_like(z_c) if noise is None else noise
        z_t = self.scheduler.add_noise(z_c, noise, t)
        a = self.scheduler.alphas_cumprod.to(lq.device)[t]  # (N,)
        z0, _ = split_prediction(self.predict_noise(z_t, t, z_c), z_t, a, self.prediction_type)
        z0 = z0.to(z_t.dtype)
        y = self.decode(z0, feats, num_frames, w)
        s = self.cfg.upscale
        return ((y[:, :, : s * h, : s * w_] + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ save / load, report

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v.detach().contiguous() for n, m in self.new_modules().items() for k, v in m.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict: any missing/unexpected key or shape mismatch is an error naming the first few."""
        own = self.trainable_state_dict()
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
        for name, m in self.new_modules().items():
            m.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})

    def save_pretrained(self, folder: str | Path) -> Path:
        """``folder/sdatc_modules.safetensors`` (trainable weights + empty-prompt embedding) and
        ``folder/config.yaml``; each written under a temporary name first."""
        from sdatc.utils import atomic_path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {**self.trainable_state_dict(), "_empty_prompt_embeds": self.empty_prompt_embeds.cpu().contiguous()}
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "sdatc/1"})
        dump_config(self.cfg, folder / CONFIG_NAME)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, overrides: list[str] | tuple = ()) -> SDATC:
        """Rebuild from ``folder/config.yaml`` (+ overrides such as ``backbone.pretrained=...``)
        and load the trainable weights strictly."""
        folder = Path(folder)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise SdatcError(f"no {WEIGHTS_NAME} in {folder}")
        model = cls.from_config(load_config(ModelConfig, folder / CONFIG_NAME, overrides))
        model.load_trainable_state_dict(load_file(weights), str(weights))
        return model

    def parameter_report(self) -> dict:
        """Trainable and total parameters per module and in sum."""

        def count(m):
            if m is None:
                return {"trainable": 0, "total": 0}
            ps = list(m.parameters())
            return {"trainable": sum(p.numel() for p in ps if p.requires_grad), "total": sum(p.numel() for p in ps)}

        g = self.guidance
        zero = count(g.zero_convs) if g is not None else count(None)
        guid = count(g)
        guid = {k: guid[k] - zero[k] for k in guid}
        modules = {  # CAPMs are hooked onto the UNet, not its submodules: counted once, here
            "dcm": count(self.dcm), "guidance": guid, "zero_convs": zero, "capm_unet": count(self.capm_unet),
            "capm_vae": count(self.capm_vae), "stam": count(self.stam), "cfw": count(self.cfw),
            "unet": count(self.unet), "vae": count(self.vae),
            "text_encoder": {"trainable": 0, "total": self.text_encoder_params},
        }
        return {
            "trainable": sum(v["trainable"] for v in modules.values()),
            "total": sum(v["total"] for v in modules.values()),
            "modules": modules,
        }


def _next(it):
    return next(it) if it is not None else None


def _res_stam(resnet: nn.Module, stam: nn.Module | None, h: torch.Tensor, num_frames: int) -> torch.Tensor:
    """A frozen VAE ResnetBlock followed by its STAM (when present)."""
    h = resnet(h, None)
    return stam(h, num_frames) if stam is not None else h


def _output_hook(module: nn.Module):
    """A forward hook that passes a block's output through ``module``."""

    def hook(_block, _inputs, output):
        return module(output)

    return hook


def _input_hook(module: nn.Module):
    """A forward pre-hook that passes a block's first input through ``module``."""

    def hook(_block, args):
        return (module(args[0]), *args[1:])

    return hook


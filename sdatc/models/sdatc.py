"""SDATC: the one place that composes the frozen SD 2.1 backbone with the new modules.

    model = SDATC.from_config(load_config(ModelConfig, "configs/model/sdatc_tiny.yaml"))
    i_c = model.upscale(lq)                             # (N,3,h,w) [0,1] -> (N,3,4h,4w), DCM
    z_c, feats = model.encode(i_c)                      # VAE encoder, CFW features
    out = model.predict(z_t, t, z_c)                    # guidance encoder + zero convs + UNet (+ CAPM)
    x0, eps = split_prediction(out, z_t, model.scheduler.alphas_cumprod[t], model.prediction_type)  # eps or v
    y = model.decode(z_0, feats, num_frames=5, w=0.75)  # VAE decoder + STAM + CAPM + CFW, [-1, 1]

Frames of a window are stacked on the batch axis: N = B * T. Only the new modules train; every SD
weight is frozen. Modules can be switched off (``enabled.*``) for ablations. CAPM, STAM and CFW are
explicit children of the frozen UNet / VAE decoder (:mod:`sdatc.models.sites`), run by the drivers
there; ``print(model)`` shows each where it acts. No hooks.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from sdatc.errors import SdatcError
from sdatc.models.backbone import Backbone, BackboneConfig, load_backbone, split_prediction
from sdatc.models.capm import CAPM, CAPMConfig
from sdatc.models.cfw import CFW, CFWConfig
from sdatc.models.dcm import DCM, DCMConfig
from sdatc.models.guidance import GuidanceConfig, GuidanceEncoder
from sdatc.models.saving import TrainedModules, check_state
from sdatc.models.sites import (
    Ctx,
    Placement,
    insert,
    pretrained_modules,
    sites,
    unet_forward,
    vae_decode,
    vae_encode,
    vae_posterior,
)
from sdatc.models.stam import STAM, STAMConfig

WEIGHTS_NAME = "sdatc_modules.safetensors"
NEW_MODULES = ("dcm", "guidance", "capm_unet", "capm_vae", "stam", "cfw")
FORMAT = "sdatc/2"  # keys are module paths (unet.up_blocks.0.mid.capm.*)


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

    def __post_init__(self):
        if self.upscale != self.dcm.upscale:
            raise ValueError(f"upscale {self.upscale} differs from dcm.upscale {self.dcm.upscale}")


class SDATC(TrainedModules, nn.Module):
    """Frozen SD 2.1 UNet + VAE with DCM, guidance encoder + zero convs, CAPM, STAM and CFW.

    DCM and the guidance encoder are top-level children; CAPM, STAM and CFW sit inside the frozen UNet
    and VAE decoder as Site children where they act (``unet.up_blocks.0.mid.capm``,
    ``vae.decoder.up_blocks.1.block.resnets.0.post.stam``): see :mod:`sdatc.models.sites`.
    ``new_modules()`` also gives them by group (``capm_unet``, ``capm_vae``, ``stam``, ``cfw``).
    """

    WEIGHTS_NAME, FORMAT, CONFIG_CLS = WEIGHTS_NAME, FORMAT, ModelConfig

    def __init__(self, cfg: ModelConfig, backbone: Backbone):
        super().__init__()
        self.cfg, on = cfg, cfg.enabled
        self.adopt_backbone(backbone)  # unet, vae, scheduler, prediction_type, empty_prompt_embeds, ...
        vae_boc = list(self.vae.config.block_out_channels)
        unet_boc = list(self.unet.config.block_out_channels)
        bad = [lv for lv in cfg.cfw_levels if not 0 <= lv < len(vae_boc)]
        if bad:
            raise SdatcError(f"cfw_levels {bad} outside the VAE's levels 0..{len(vae_boc) - 1}")

        self.dcm = DCM(cfg.dcm) if on.dcm else None
        self.guidance = GuidanceEncoder(cfg.guidance, self.unet.config) if on.guidance else None
        # the new modules by group: (index in the group, module, where, slot)
        n_vae, per_level = len(vae_boc), self.vae.config.layers_per_block + 1
        groups: dict[str, list] = {"capm_unet": [], "capm_vae": [], "stam": [], "cfw": []}
        if on.capm_unet:  # at each UNet up level, before its upsampler (PromptIR's placement)
            groups["capm_unet"] = [(str(i), CAPM(c, cfg.capm), f"unet.up_blocks.{i}", "mid")
                                   for i, c in enumerate(reversed(unet_boc))]
        if on.capm_vae:  # at each VAE-decoder level, after CFW, before its upsampler
            groups["capm_vae"] = [(str(i), CAPM(c, cfg.capm), f"vae.decoder.up_blocks.{i}", "mid")
                                  for i, c in enumerate(reversed(vae_boc))]
        if on.stam:  # after every VAE-decoder ResnetBlock: the mid block's first, then each up level's
            groups["stam"] = [("0", STAM(vae_boc[-1], cfg.stam), "vae.decoder.mid_block.resnets.0", "post")] + [
                (str(1 + i * per_level + j), STAM(c, cfg.stam), f"vae.decoder.up_blocks.{i}.resnets.{j}", "post")
                for i, c in enumerate(reversed(vae_boc)) for j in range(per_level)]
        if on.cfw:  # at decoder level i = n - 1 - l, the resolution of encoder level l
            groups["cfw"] = [(str(lv), CFW(vae_boc[lv], cfg.cfw, level=lv),
                              f"vae.decoder.up_blocks.{n_vae - 1 - lv}", "mid")
                             for lv in cfg.cfw_levels]
        kinds = {"capm_unet": "capm", "capm_vae": "capm", "stam": "stam", "cfw": "cfw"}
        order = ("cfw", "capm_unet", "capm_vae", "stam")  # in a mid slot CFW acts before CAPM
        insert(self, [Placement(where, slot, kinds[g], m) for g in order for _, m, where, slot in groups[g]])
        path_of = {id(m): name for name, m in self.named_modules()}
        # group key -> module path, e.g. "stam.1" -> "vae.decoder.up_blocks.0.block.resnets.0.post.stam"
        self.module_paths = {f"{g}.{k}": path_of[id(m)] for g, items in groups.items() for k, m, _, _ in items}
        self._groups = {g: [k for k, *_ in items] for g, items in groups.items() if items}
        self.gradient_checkpointing = False
        self.freeze_pretrained()

    # ------------------------------------------------------------------ construction, freezing

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SDATC:
        return cls(cfg, load_backbone(cfg.backbone))

    def new_modules(self) -> dict[str, nn.Module]:
        """The enabled new (trainable) modules by group: ``dcm``, ``guidance`` and views (ModuleList /
        ModuleDict by level for ``cfw``) of the Site modules."""
        out = {n: getattr(self, n) for n in ("dcm", "guidance") if getattr(self, n) is not None}
        for g, keys in self._groups.items():
            mods = {k: self.get_submodule(self.module_paths[f"{g}.{k}"]) for k in keys}
            out[g] = nn.ModuleDict(mods) if g == "cfw" else nn.ModuleList(mods.values())
        return {n: out[n] for n in NEW_MODULES if n in out}

    # the Site modules by group (views; None when switched off), e.g. ``for stam in model.stam``
    capm_unet = property(lambda self: self.new_modules().get("capm_unet"))
    capm_vae = property(lambda self: self.new_modules().get("capm_vae"))
    stam = property(lambda self: self.new_modules().get("stam"))
    cfw = property(lambda self: self.new_modules().get("cfw"))

    def freeze_pretrained(self) -> None:
        """Freeze every SD weight; the new modules train."""
        self.requires_grad_(False)
        for m in self.new_modules().values():
            m.requires_grad_(True)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward: UNet blocks (diffusers), guidance encoder, DCM, the VAE encoder's
        resnets, and every Site's modules (in the VAE decoder each resnet with its STAM)."""
        self.gradient_checkpointing = True
        self.unet.enable_gradient_checkpointing()
        for m in (self.guidance, self.dcm):
            if m is not None:
                m.gradient_checkpointing = True
        for _, site in sites(self):
            site.gradient_checkpointing = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.new_modules().values() for p in m.parameters() if p.requires_grad]

    @property
    def pad_multiple(self) -> int:
        """LR sizes must be a multiple of this for the latent to pass the UNet (pad, then crop)."""
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return max(1, vae_factor * unet_factor // self.cfg.upscale)

    # ------------------------------------------------------------------ the four stages

    def upscale(self, lq: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) LQ in [0, 1] -> (N, 3, 4h, 4w) I_c: DCM, or bicubic x4 when the DCM is off."""
        if self.dcm is not None:
            return self.dcm(lq)
        return F.interpolate(lq, scale_factor=self.cfg.upscale, mode="bicubic", align_corners=False).clamp(0, 1)

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """VAE encoder on (N, 3, H, W) in [0, 1] -> scaled latent mode (N, 4, H/8, W/8) and the
        features at ``cfw_levels`` (after each level's resblocks, before downsampling)."""
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        mode, feats = vae_encode(self.vae, img * 2 - 1, self.cfg.cfw_levels, checkpoint=ckpt)
        return mode * self.latent_scale, feats

    def encode_posterior(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """VAE encoder on (N, 3, H, W) in [0, 1] -> the posterior's mean and log-variance (N, 4, H/8, W/8) each,
        unscaled (the log-variance unclamped), and the features at ``cfw_levels``. A sample of z_c is
        ``latent_scale * (mean + exp(logvar / 2) eps)`` (``sdatc.pipelines.sampler.posterior_sample``)."""
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        return vae_posterior(self.vae, img * 2 - 1, self.cfg.cfw_levels, checkpoint=ckpt)

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, z_c: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet output (epsilon or v: ``prediction_type``) for (N, 4, h, w) noisy latents at timesteps
        t (N,) given the condition latent z_c. ``context``: the text encoder's states, (1 or N, 77, D), for
        the UNet's cross-attention; None: the cached empty-prompt embedding."""
        t = torch.as_tensor(t, device=z_t.device).expand(z_t.shape[0])
        text = self.empty_prompt_embeds if context is None else context
        ctx = text.to(z_t.dtype).expand(z_t.shape[0], -1, -1)  # (N, 77, D)
        down_res, mid_res = (None, None)
        if self.guidance is not None:
            down_res, mid_res = self.guidance(z_t, z_c, t)  # 12 x (N, C_i, h_i, w_i), (N, C_mid, h/8, w/8)
        return unet_forward(self.unet, z_t, t, ctx, Ctx(num_frames=1), down_res, mid_res)

    def decode(self, z: torch.Tensor, feats: dict[int, torch.Tensor] | None = None, num_frames: int = 1,
               w: float = 1.0) -> torch.Tensor:
        """VAE decoder with STAM (over windows of ``num_frames``), CFW (weight ``w``) and CAPM.
        z: (N, 4, h, w) scaled latents, N = B * num_frames -> (N, 3, 8h, 8w) in [-1, 1]."""
        if num_frames < 1 or z.shape[0] % num_frames:
            raise SdatcError(f"cannot split a batch of {z.shape[0]} frames into windows of {num_frames}")
        if not 0.0 <= w <= 1.0:  # w: 1 in training; inference passes pipeline.cfw_weight
            raise SdatcError(f"CFW weight w must be in [0, 1], got {w}")
        return vae_decode(self.vae, z / self.latent_scale, Ctx(num_frames=num_frames, enc_feats=feats, cfw_weight=w))

    def reconstruct(self, lq: torch.Tensor, num_frames: int, t: torch.Tensor | int = 999,
                    noise: torch.Tensor | None = None, w: float = 1.0) -> torch.Tensor:
        """One denoising pass, for checks: (N, 3, h, w) LQ in [0, 1] -> (N, 3, 4h, 4w) in [0, 1] from the x0
        prediction at timestep t of q_sample(z_c, t). Any LR size: padded (reflect), cropped back."""
        n, _, h, w_ = lq.shape
        m = self.pad_multiple
        ph, pw = -h % m, -w_ % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w_ else "replicate"
            lq = F.pad(lq, (0, pw, 0, ph), mode=mode)
        z_c, feats = self.encode(self.upscale(lq))
        t = torch.as_tensor(t, device=lq.device).expand(n)
        noise = torch.randn_like(z_c) if noise is None else noise
        z_t = self.scheduler.add_noise(z_c, noise, t)
        a = self.scheduler.alphas_cumprod.to(lq.device)[t]  # (N,)
        z0, _ = split_prediction(self.predict(z_t, t, z_c), z_t, a, self.prediction_type)
        y = self.decode(z0.to(z_t.dtype), feats, num_frames, w)
        s = self.cfg.upscale
        return ((y[:, :, : s * h, : s * w_] + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ save / load, report

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The new modules' tensors under their module paths (``dcm.*``, ``guidance.*``,
        ``unet.up_blocks.0.mid.capm.*``, ...), in group order."""
        out = {f"{n}.{k}": v for n in ("dcm", "guidance") if getattr(self, n) is not None
               for k, v in getattr(self, n).state_dict().items()}
        for path in self.module_paths.values():
            out |= {f"{path}.{k}": v for k, v in self.get_submodule(path).state_dict().items()}
        return {k: v.detach().contiguous() for k, v in out.items()}

    def group_state_dicts(self, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """A checkpoint split by group, keyed as ``new_modules()[group].state_dict()``;
        keys of modules this model does not have are grouped by their first name segment."""
        group_of = {path: key for key, path in self.module_paths.items()}
        out: dict[str, dict] = {}
        for k, v in state.items():
            if k.startswith("_"):
                continue
            path = next((p for p in group_of if k.startswith(p + ".")), None)
            key = f"{group_of[path]}.{k[len(path) + 1:]}" if path else k
            group, _, rest = key.partition(".")
            out.setdefault(group, {})[rest] = v
        return out

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict: any missing/unexpected key or shape mismatch is an error naming the first few."""
        check_state(self.trainable_state_dict(), state, source)
        modules = self.new_modules()
        for name, sd in self.group_state_dicts(state).items():
            modules[name].load_state_dict(sd)

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
        new, pretrained = self.new_modules(), set(map(id, pretrained_modules(self)))

        def count_pretrained(m):  # the SD part only: its Site modules are counted in their groups
            ps = [p for x in m.modules() if id(x) in pretrained for p in x.parameters(recurse=False)]
            return {"trainable": sum(p.numel() for p in ps if p.requires_grad), "total": sum(p.numel() for p in ps)}

        modules = {
            "dcm": count(self.dcm), "guidance": guid, "zero_convs": zero,
            **{g: count(new.get(g)) for g in ("capm_unet", "capm_vae", "stam", "cfw")},
            "unet": count_pretrained(self.unet), "vae": count_pretrained(self.vae),
            "text_encoder": {"trainable": 0, "total": self.text_encoder_params},
        }
        return {
            "trainable": sum(v["trainable"] for v in modules.values()),
            "total": sum(v["total"] for v in modules.values()),
            "modules": modules,
        }



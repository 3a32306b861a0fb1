"""UltraVSR training (``system: ultravsr``): one stage, losses as its ``forward`` returns them (DDP wraps it).

Per batch of clips ``lq`` (B, T, 3, h, w) and ``gt`` (B, T, 3, 4h, 4w) in [0, 1]:

    d ~ U(ultravsr.d_range) per clip [guess]; t, D from DRS;  z = E(bicubic x4 lq) (+LoRA)
    z_hr = one_step_x0(UNet(z, t) (+LoRA, RTS), z, D);  x = (D(z_hr) (+RTS) + 1) / 2
    mse(x, gt) + lpips(x, gt) + frame_diff(x, gt) + gan (3-D PatchGAN, hinge, from gan_start_step) + distill

``distill`` [guess, the SJD of the paper is not public]:
* ``teacher: vsd``: OSEDiff's variational score distillation with RTS in both scorers. Real score: the
  generator's UNet with its LoRA adapters off (frozen SD + the current RTS, no gradient) with
  classifier-free guidance against the negative prompt; fake score: :class:`FakeScore` (a copy of SD's
  UNet with its own LoRA and RTS) trained by the diffusion loss on the generator's latents, in the
  trainer's second optimiser. grad = (x0_fake - x0_real) / mean|z_hr - x0_real|;
  loss = MSE(z_hr, stopgrad(z_hr - grad)).
* ``teacher: sdatc``: MSE between z_hr and a trained SDATC's sampled latents for the same sample
  (``scripts/make_stage2_latents.py`` writes them; ``latents.dir``).
* ``teacher: none``: no distillation term.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

from sdatc.errors import SdatcError
from sdatc.models.backbone import encode_prompt, split_prediction, training_target
from sdatc.models.sites import Ctx, Placement, insert, unet_forward
from sdatc.models.ultravsr import UltraVSR, bicubic_x4, drs_step, one_step_x0
from sdatc.training.build import model_config
from sdatc.training.latents import GeneratedLatents
from sdatc.training.losses import LPIPSLoss, frame_difference_l1, hinge_g_loss
from sdatc.training.precision import DTYPES, cast_frozen_backbone
from sdatc.training.stages import _Stage, disc_optimizer, lpips_loss
from sdatc.training.validation import ultravsr_restorer


class PatchDiscriminator3D(nn.Module):
    """Temporal PatchGAN (the reference ships one): spectral-norm Conv3d (3, 5, 5), stride (1, 2, 2),
    widths 64-128-256-256, LeakyReLU. Frames on the batch axis: (B*T, 3, H, W) in [0, 1] -> logits."""

    def __init__(self, num_frames: int, width: int = 64):
        super().__init__()
        self.num_frames = num_frames
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [spectral_norm(nn.Conv3d(c_in, c_out, (3, 5, 5), (1, 2, 2), (1, 2, 2))), nn.LeakyReLU(0.2, True)]
        layers.append(spectral_norm(nn.Conv3d(chans[-1], 1, (3, 5, 5), 1, (1, 2, 2))))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        clip = rearrange(x * 2 - 1, "(b t) c h w -> b c t h w", t=self.num_frames)
        return self.net(clip)  # (B, 1, T, H/16, W/16)


class FakeScore(nn.Module):
    """VSD's fake score: a copy of SD's frozen UNet with its own LoRA ("fake") and RTS, trained by the
    diffusion loss on the generator's (detached) latents."""

    def __init__(self, model: UltraVSR, rank: int):
        super().__init__()
        from peft import LoraConfig

        from sdatc.models.rts import RTS
        from sdatc.models.sites import detached
        from sdatc.models.ultravsr import _lora_targets

        unet = model.unet
        with detached(unet):  # copy SD's UNet without the generator's Sites and LoRA
            self.unet = copy.deepcopy(unet)
        self._drop_lora(self.unet)
        self.unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=_lora_targets(self.unet, lambda n: True)), adapter_name="fake")
        boc = list(self.unet.config.block_out_channels)
        up_in = [boc[-1]] + list(reversed(boc))[:-1]
        rts = model.cfg.rts
        insert(self, [Placement(f"unet.down_blocks.{i}", "post", "rts", RTS(c, rts)) for i, c in enumerate(boc)]
               + [Placement(f"unet.up_blocks.{i}", "pre", "rts", RTS(c, rts)) for i, c in enumerate(up_in)])
        for n, p in self.named_parameters():
            p.requires_grad_(".lora_" in n or ".rts." in n)
            if p.requires_grad and p.dtype != torch.float32:  # peft builds LoRA in its (cast) base layer's dtype
                p.data = p.data.float()  # the optimiser's master weights are fp32, as the generator's
        self.register_buffer("text", model.empty_prompt_embeds.clone(), persistent=False)

    @staticmethod
    def _drop_lora(unet: nn.Module) -> None:
        """Replace every peft LoRA layer of the copy by its base layer (the generator's adapters are not copied)."""
        from peft.tuners.lora import LoraLayer

        for name, m in list(unet.named_modules()):
            if isinstance(m, LoraLayer):
                parent_name, _, child = name.rpartition(".")
                parent = unet.get_submodule(parent_name) if parent_name else unet
                setattr(parent, child, m.get_base_layer())
        if hasattr(unet, "peft_config"):
            del unet.peft_config
        unet._hf_peft_config_loaded = False

    def forward(self, z_t: Tensor, t: Tensor, num_frames: int) -> Tensor:
        text = self.text.to(z_t.dtype).expand(z_t.shape[0], -1, -1)
        return unet_forward(self.unet, z_t, t, text, Ctx(num_frames=num_frames))


@contextlib.contextmanager
def adapters_off(unet: nn.Module):
    """The UNet without its LoRA adapters for the block (peft's disable flag), restored after."""
    has = getattr(unet, "_hf_peft_config_loaded", False)
    if has:
        unet.disable_adapters()
    try:
        yield unet
    finally:
        if has:
            unet.enable_adapters()


class UltraVSRStage(_Stage):
    """UltraVSR's training forward: returns the loss terms and the output frames (B*T, 3, H, W)."""

    def __init__(self, model: UltraVSR, cfg, lpips: LPIPSLoss | None = None, negative_embeds: Tensor | None = None):
        super().__init__()
        self.model, self.cfg, self.lpips = model, cfg, lpips
        self.disc = [None]  # plain lists: their own (DDP) modules, set by build and, prepared, by the trainer
        self.fake = [None]
        if negative_embeds is not None:
            self.register_buffer("negative", negative_embeds, persistent=False)
        else:
            self.negative = None

    @staticmethod
    def dataset(cfg, data_cfg):
        if cfg.ultravsr.teacher == "sdatc":  # the clips with a trained SDATC's latents of them
            if not cfg.latents.dir:
                raise SdatcError("teacher sdatc needs latents.dir: a trained SDATC's latents, written by "
                                 "scripts/make_stage2_latents.py with that SDATC's stage-2 config")
            return GeneratedLatents(cfg.latents.dir, None, data_cfg)
        return _Stage.dataset(cfg, data_cfg)

    @staticmethod
    def trains_fake_score(cfg) -> bool:
        return cfg.ultravsr.teacher == "vsd" and cfg.loss.distill > 0

    @classmethod
    def build(cls, model: UltraVSR, cfg, device, mp: str, main: bool = True) -> UltraVSRStage:
        """With LPIPS, the temporal discriminator and, for VSD, the fake score (a frozen SD copy, cast once)."""
        cls.prepare_model(model, cfg, mp)
        lpips, negative, fake = lpips_loss(cfg, device), None, None
        if cls.trains_fake_score(cfg):
            negative = encode_prompt(model_config(cfg).backbone, cfg.ultravsr.vsd.negative_prompt).to(device)
            fake = FakeScore(model, cfg.ultravsr.vsd.fake_lora_rank).to(device)
            cast_frozen_backbone(fake, DTYPES[mp], parts=("unet",))
        disc = PatchDiscriminator3D(cfg.data.num_frames).to(device) if cfg.loss.gan > 0 else None
        stage = cls(model, cfg, lpips, negative)
        stage.disc[0], stage.fake[0] = disc, fake
        return stage

    def extra_optimizers(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """The fake score's AdamW (its LoRA and RTS, lr ``ultravsr.vsd.fake_lr``) and the discriminator's."""
        o, fake, disc, out = self.cfg.optim, self.fake[0], self.disc[0], {}
        if fake is not None:
            out["fake_score"] = (fake, torch.optim.AdamW([p for p in fake.parameters() if p.requires_grad],
                                                         lr=self.cfg.ultravsr.vsd.fake_lr, betas=o.betas, eps=o.eps,
                                                         weight_decay=0.0))
        if disc is not None:
            out["discriminator"] = (disc, disc_optimizer(disc, self.cfg))
        return out

    def restorer(self, device, dtype: torch.dtype):
        return ultravsr_restorer(self.model, self.cfg.ultravsr.val_d, self.cfg.val.num_frames, device, dtype)

    def one_step(self, lq: Tensor, num_frames: int) -> tuple[Tensor, Tensor, Tensor]:
        """(N, 3, h, w) -> z_hr (N, 4, ...), per-frame t (N,), per-frame D (N,)."""
        m, (lo, hi) = self.model, self.cfg.ultravsr.d_range
        n_clips = lq.shape[0] // num_frames
        d = lo + (hi - lo) * torch.rand(n_clips)  # one d per clip
        steps = [drs_step(m.scheduler.alphas_cumprod, float(x)) for x in d]
        t = torch.tensor([s[0] for s in steps], device=lq.device).repeat_interleave(num_frames)
        big_d = torch.tensor([s[1] for s in steps], device=lq.device).repeat_interleave(num_frames)
        up = bicubic_x4(lq, m.cfg.input_resize)  # (N, 3, 4h, 4w), as at inference
        z = m.encode(up)
        out = m.predict(z, t, num_frames)
        return one_step_x0(out.float(), z.float(), big_d, m.prediction_type), t, big_d

    def vsd(self, z_hr: Tensor, num_frames: int) -> Tensor:
        """OSEDiff's VSD term with RTS-equipped scorers (see the module docstring)."""
        m, v = self.model, self.cfg.ultravsr.vsd
        n = z_hr.shape[0]
        t = torch.randint(v.t_range[0], v.t_range[1] + 1, (n // num_frames,),
                          device=z_hr.device).repeat_interleave(num_frames)
        noise = torch.randn_like(z_hr)
        a = m.scheduler.alphas_cumprod.to(z_hr.device)[t]
        z_t = m.scheduler.add_noise(z_hr.detach(), noise, t)
        with torch.no_grad():
            unet = m.unet
            with adapters_off(unet):  # frozen SD + the current RTS
                text = torch.cat([m.empty_prompt_embeds.expand(n, -1, -1),
                                  self.negative.expand(n, -1, -1)]).to(z_t.dtype)
                out = unet_forward(unet, torch.cat([z_t, z_t]), torch.cat([t, t]), text, Ctx(num_frames=num_frames))
            pos, neg = out.chunk(2)
            guided = neg + v.cfg_scale * (pos - neg)
            x0_real, _ = split_prediction(guided.float(), z_t.float(), a, m.prediction_type)
            fake = self.fake[0]
            inner = getattr(fake, "module", fake)
            x0_fake, _ = split_prediction(inner(z_t, t, num_frames).float(), z_t.float(), a, m.prediction_type)
            weight = (z_hr.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            grad = (x0_fake - x0_real) / weight
        return F.mse_loss(z_hr, (z_hr - grad).detach())

    def fake_loss(self, z_hr: Tensor, num_frames: int) -> Tensor:
        """The fake score's diffusion loss on the generator's detached latents. Returned with the generator's
        terms (key ``fake_score``): its gradient reaches only the fake score's parameters, which the trainer
        steps with their own optimiser."""
        m, v = self.model, self.cfg.ultravsr.vsd
        n = z_hr.shape[0]
        t = torch.randint(v.t_range[0], v.t_range[1] + 1, (n // num_frames,),
                          device=z_hr.device).repeat_interleave(num_frames)
        noise = torch.randn_like(z_hr)
        z_t = m.scheduler.add_noise(z_hr.detach().float(), noise, t)
        a = m.scheduler.alphas_cumprod.to(z_hr.device)[t]
        target = training_target(z_hr.detach().float(), noise.float(), a, m.prediction_type)
        return F.mse_loss(self.fake[0](z_t, t, num_frames).float(), target)

    def forward(self, lq: Tensor, gt: Tensor, step: int = 0,
                z: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        cfg, u = self.cfg.loss, self.cfg.ultravsr
        t = lq.shape[1]
        lq, gt = lq.flatten(0, 1), gt.flatten(0, 1)  # (N, 3, h, w), (N, 3, 4h, 4w)
        z_hr, _, _ = self.one_step(lq, t)
        x = (self.model.decode(z_hr.to(lq.dtype), t).float() + 1) / 2  # (N, 3, 4h, 4w)
        losses = {"mse": F.mse_loss(x, gt)}
        if self.lpips is not None:
            losses["lpips"] = self.lpips(x.clamp(0, 1), gt)
        if cfg.frame_diff > 0:
            losses["frame_diff"] = frame_difference_l1(x, gt, t)
        if cfg.distill > 0 and u.teacher == "sdatc":
            if z is None:
                raise ValueError("teacher sdatc needs the SDATC latents (latents.dir)")
            losses["distill"] = F.mse_loss(z_hr, z.flatten(0, 1).to(z_hr))
        elif cfg.distill > 0 and u.teacher == "vsd" and self.fake[0] is not None:
            losses["distill"] = self.vsd(z_hr, t)
            losses["fake_score"] = self.fake_loss(z_hr, t)
        disc = self.disc[0]
        if disc is not None and cfg.gan > 0 and step >= cfg.gan_start_step:
            inner = getattr(disc, "module", disc)
            logits = inner(torch.cat([gt.to(x.dtype), x]))
            losses["gan"] = hinge_g_loss(logits[logits.shape[0] // 2:])
        return losses, x

"""The three training stages as modules whose ``forward`` returns the loss terms (so DDP wraps them).

Batches are ``lq`` (B, T, 3, h, w) and ``gt`` (B, T, 3, 4h, 4w) in [0, 1]; frames go on the batch
axis (N = B * T) for the per-frame parts and back to windows of T for STAM and the temporal losses.

* Stage 0 (:class:`DCMStage`): the DCM alone, ``l1`` (+ ``lpips``) to GT.
* Stage 1 (:class:`LatentStage`): DCM + guidance encoder + zero convs + UNet CAPM. ``eps_mse``: MSE of
  the UNet output against its target (epsilon, or v for a v-prediction SD) on ``q_sample(z_gt, t)``
  with an independent t per frame (A12), conditioned on z_c = E(clamp(DCM(lq))) as at inference (the
  clamp passes gradients straight through); the loss reaches the DCM through the frozen VAE encoder
  (end to end); ``dcm_l1`` = L1(DCM(lq), GT) (A3).
* Stage 2 (:class:`PixelStage`): CFW + STAM + VAE CAPM on latents of the stage-1 model:
  ``generated`` (the default: sampled by the trained stage-1 model, read from the shards that
  ``scripts/make_stage2_latents.py`` writes, passed in as ``z``), or cheaper proxies: ``gt_noise``
  (z_gt + std * noise) or ``stage1_x0`` (the frozen stage-1 model's one-step x0 prediction from
  ``q_sample(z_gt, t)``, t in ``proxy_t``). Losses: ``l1``, ``lpips``, ``frame_diff``, ``flow_warp``
  (RAFT flows of the GT frames, occlusion-masked) and, from ``gan_start_step``, the hinge ``gan``
  generator term (the discriminator trains in the trainer).

Frozen parts stay in eval mode whatever ``train()`` says (:func:`keep_frozen_in_eval`); RAFT and LPIPS
run in fp32 with autocast off.

Besides its losses, each stage says what the trainer sets up for it (``_Stage``; no other place branches
on the stage): its samples (``dataset``), whether it trains VSD's fake score (``trains_fake_score``), SD's
parts it casts to the run's dtype (``parts_to_cast``) and checks unchanged at the end (``frozen_weights``),
its helpers (``build``: LPIPS, RAFT, a discriminator), the modules it trains with their own optimisers
(``extra_optimizers``), what a checkpoint saves (``trainable_state``) and how validation runs it
(``restorer``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdatc.data.datasets import VideoClipDataset, scan_clips
from sdatc.models.backbone import split_prediction, training_target
from sdatc.models.dcm import DCM
from sdatc.models.flow import RAFT_WEIGHTS_NAME, compute_flows, load_raft, occlusion_mask
from sdatc.training.config import TrainConfig
from sdatc.training.latents import generated_latents
from sdatc.training.losses import (
    LPIPSLoss,
    PatchDiscriminator,
    flow_warp_l1,
    frame_difference_l1,
    hinge_g_loss,
)
from sdatc.training.precision import DTYPES, FrozenHelper, cast_frozen_backbone, keep_frozen_in_eval
from sdatc.training.validation import dcm_restorer, pipeline_restorer


def _frames(x: Tensor) -> Tensor:
    return x.flatten(0, 1)  # (B, T, C, H, W) -> (B*T, C, H, W)


def clamp_straight_through(x: Tensor) -> Tensor:
    """``x.clamp(0, 1)`` in the forward pass, identity gradient in the backward pass."""
    return x.clamp(0, 1).detach() + (x - x.detach())  # exact clamp forward: the added term is exactly 0


def lpips_loss(cfg: TrainConfig, device) -> LPIPSLoss | None:
    """The LPIPS term's network, or None when ``loss.lpips`` is 0."""
    return LPIPSLoss(cfg.loss.lpips_pretrained_backbone).to(device) if cfg.loss.lpips > 0 else None


def disc_optimizer(disc: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The discriminator's AdamW (betas (0.5, 0.9), as pix2pix / taming)."""
    return torch.optim.AdamW(disc.parameters(), lr=cfg.optim.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)


class _Stage(nn.Module):
    """A training stage: ``forward(lq, gt, step, **extra)`` -> (loss terms, output frames (N, 3, H, W)).

    The defaults below are the SD stages' (SDATC stages 1-2, UltraVSR); a stage overrides where it differs."""

    parts_to_cast: tuple[str, ...] = ("unet", "vae")  # SD's frozen parts in the run's low dtype (A19)

    @staticmethod
    def dataset(cfg: TrainConfig, data_cfg):
        """The training samples: clips of ``data_cfg`` (the run's data with the validation clip held out)."""
        return VideoClipDataset(data_cfg, scan_clips(data_cfg))

    @staticmethod
    def trains_fake_score(cfg: TrainConfig) -> bool:
        """Whether the run trains VSD's fake score with a second optimiser (which fp16 cannot serve)."""
        return False

    @classmethod
    def prepare_model(cls, model: nn.Module, cfg: TrainConfig, mp: str) -> None:
        """Cast SD's frozen parts to the run's dtype (once; new modules stay fp32), gradient checkpointing."""
        cast_frozen_backbone(model, DTYPES[mp], cls.parts_to_cast)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()

    @classmethod
    def build(cls, model: nn.Module, cfg: TrainConfig, device, mp: str, main: bool = True) -> _Stage:
        """The stage of ``model`` (on ``device``) with its helpers; ``main``: rank 0 (prints notes)."""
        cls.prepare_model(model, cfg, mp)
        return cls(model, cfg)

    def extra_optimizers(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """Modules trained beside the stage, each with its own optimiser: ``fake_score`` (stepped with the
        generator), ``discriminator`` (its own loss, on the last micro-batch)."""
        return {}

    def frozen_weights(self) -> list[Tensor]:
        """The frozen weights whose bits the run checks unchanged at the end (on the device)."""
        return [p for p in self.model.parameters() if not p.requires_grad]

    def trainable_state(self) -> dict[str, Tensor]:
        """The weights a checkpoint saves (the new modules, the checkpoint's key format)."""
        return self.model.trainable_state_dict()

    def restorer(self, device, dtype: torch.dtype):
        """Validation's ``restore(lq)``: the model as inference runs it (here SDATC's pipeline)."""
        return pipeline_restorer(self.model, self.cfg.val.steps, self.cfg.val.num_frames, device, dtype)

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_in_eval(self)  # frozen SD parts, frozen earlier-stage modules, helpers
        return self


class DCMStage(_Stage):
    """Stage 0: DCM pre-training (no SD: nothing cast, nothing frozen)."""

    parts_to_cast = ()

    def __init__(self, dcm: DCM, cfg: TrainConfig, lpips: LPIPSLoss | None = None):
        super().__init__()
        self.dcm, self.cfg, self.lpips = dcm, cfg, lpips

    @property
    def model(self) -> DCM:
        return self.dcm

    @classmethod
    def build(cls, model: DCM, cfg: TrainConfig, device, mp: str, main: bool = True) -> DCMStage:
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing = True
        return cls(model, cfg, lpips_loss(cfg, device))

    def frozen_weights(self) -> list[Tensor]:
        return []

    def trainable_state(self) -> dict[str, Tensor]:
        return {f"dcm.{k}": v for k, v in self.dcm.state_dict().items()}

    def restorer(self, device, dtype: torch.dtype):
        return dcm_restorer(self.dcm, device, dtype)

    def forward(self, lq: Tensor, gt: Tensor, step: int = 0) -> tuple[dict[str, Tensor], Tensor]:
        lq, gt = _frames(lq), _frames(gt)  # (N, 3, h, w), (N, 3, 4h, 4w)
        out = self.dcm(lq)  # (N, 3, 4h, 4w)
        losses = {"l1": F.l1_loss(out, gt)}
        if self.lpips is not None:
            losses["lpips"] = self.lpips(out.clamp(0, 1), gt)
        return losses, out


class LatentStage(_Stage):
    """Stage 1: epsilon MSE through the guided UNet, plus L1 on the DCM output."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, lq: Tensor, gt: Tensor, step: int = 0) -> tuple[dict[str, Tensor], Tensor]:
        m, cfg = self.model, self.cfg
        lq, gt = _frames(lq), _frames(gt)  # (N, 3, h, w), (N, 3, 4h, 4w)
        n = lq.shape[0]
        i_c = m.upscale(lq)  # (N, 3, 4h, 4w), trainable DCM
        i_enc = clamp_straight_through(i_c)  # what inference encodes: the clamped DCM output
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.end_to_end_dcm):
            z_c, _ = m.encode(i_enc if cfg.end_to_end_dcm else i_enc.detach())  # (N, 4, h/2, w/2)
        with torch.no_grad():
            z_gt, _ = m.encode(gt)  # (N, 4, h/2, w/2), frozen VAE
        noise = torch.randn_like(z_gt)
        t = torch.randint(0, m.scheduler.config.num_train_timesteps, (n,), device=lq.device)  # one t per frame (A12)
        z_t = m.scheduler.add_noise(z_gt, noise, t)
        out = m.predict(z_t, t, z_c)  # (N, 4, h/2, w/2): epsilon or v, as the SD folder says
        a = m.scheduler.alphas_cumprod.to(z_t.device)[t]
        losses = {"eps_mse": F.mse_loss(out.float(), training_target(z_gt, noise, a, m.prediction_type))}
        if cfg.loss.dcm_l1 > 0:
            losses["dcm_l1"] = F.l1_loss(i_c.float(), gt.float())
        return losses, i_c


class PixelStage(_Stage):
    """Stage 2: the temporal VAE decoder (STAM, CAPM, CFW at w = 1) on proxy latents."""

    def __init__(self, model, cfg: TrainConfig, lpips: LPIPSLoss | None = None, raft: nn.Module | None = None,
                 disc: nn.Module | None = None, decode_fp32: bool = False):
        super().__init__()
        self.model, self.cfg, self.lpips, self.raft = model, cfg, lpips, raft
        self.decode_fp32 = decode_fp32  # fp16 runs: the frozen VAE decoder stays fp32, autocast off there
        self.disc = [disc]  # a plain list: the discriminator is its own (DDP) module, not a submodule

    @staticmethod
    def dataset(cfg: TrainConfig, data_cfg):
        if cfg.latent_source == "generated":  # shards written by scripts/make_stage2_latents.py
            return generated_latents(cfg, data_cfg)
        return _Stage.dataset(cfg, data_cfg)

    @classmethod
    def build(cls, model, cfg: TrainConfig, device, mp: str, main: bool = True) -> PixelStage:
        """With LPIPS, RAFT for ``flow_warp`` (off, with a note, without RAFT weights), the discriminator."""
        cls.prepare_model(model, cfg, mp)
        lpips, raft = lpips_loss(cfg, device), None
        if cfg.loss.flow_warp > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # load_raft's warning speaks of inference; say it for training
                raft = load_raft(cfg.flow, device)
            raft = FrozenHelper(raft) if raft is not None else None
            if raft is None and main:
                print(f"note: flow_warp loss off: no RAFT weights (flow.raft_weights=.../{RAFT_WEIGHTS_NAME})")
        disc = PatchDiscriminator().to(device) if cfg.loss.gan > 0 else None
        return cls(model, cfg, lpips, raft, disc, decode_fp32=mp == "fp16")

    def extra_optimizers(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        disc = self.disc[0]
        return {"discriminator": (disc, disc_optimizer(disc, self.cfg))} if disc is not None else {}

    @torch.no_grad()
    def latents(self, lq: Tensor, gt: Tensor, z: Tensor | None = None) -> tuple[Tensor, dict[int, Tensor]]:
        """Latents (N, 4, H/8, W/8) to decode and the CFW features of the DCM output; ``z``: the
        generated stage-1 latents of the batch (``latent_source: generated``)."""
        m, cfg = self.model, self.cfg
        z_c, feats = m.encode(m.upscale(lq).clamp(0, 1))
        if cfg.latent_source == "generated":
            if z is None:
                raise ValueError("latent_source=generated needs the batch's generated latents")
            return z.to(z_c.dtype), feats
        z_gt, _ = m.encode(gt)
        noise = torch.randn_like(z_gt)
        if cfg.latent_source == "gt_noise":
            return z_gt + cfg.latent_noise_std * noise, feats
        t = torch.randint(cfg.proxy_t[0], cfg.proxy_t[1] + 1, (z_gt.shape[0],), device=z_gt.device)
        z_t = m.scheduler.add_noise(z_gt, noise, t)
        a = m.scheduler.alphas_cumprod.to(z_t.device)[t]
        x0, _ = split_prediction(m.predict(z_t, t, z_c), z_t, a, m.prediction_type)
        return x0, feats

    @torch.no_grad()
    def flows(self, gt: Tensor, num_frames: int) -> tuple[Tensor, Tensor] | None:
        """RAFT flows t -> t+1 of the GT frames and their occlusion masks, or None without RAFT."""
        if self.raft is None or num_frames < 2:
            return None
        f = self.cfg.flow
        windows = gt.unflatten(0, (-1, num_frames))  # (B, T, 3, H, W)
        fwd, bwd = zip(*(compute_flows(self.raft, w, f.raft_iters) for w in windows))
        fwd, bwd = torch.cat(fwd), torch.cat(bwd)  # (B*(T-1), 2, H, W)
        return fwd, occlusion_mask(fwd, bwd, f.occlusion_alpha, f.occlusion_beta, f.occlusion)

    def decode(self, z: Tensor, feats: dict[int, Tensor], num_frames: int) -> Tensor:
        """(N, 4, h, w) -> (N, 3, 8h, 8w) in [0, 1] at the training weight w = 1 (A7)."""
        if not self.decode_fp32:
            return (self.model.decode(z, feats, num_frames=num_frames, w=1.0).float() + 1) / 2
        with torch.autocast(z.device.type, enabled=False):  # fp16 run: decoder weights are fp32
            feats = {k: v.float() for k, v in feats.items()}
            return (self.model.decode(z.float(), feats, num_frames=num_frames, w=1.0) + 1) / 2

    def forward(self, lq: Tensor, gt: Tensor, step: int = 0,
                z: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        cfg = self.cfg.loss
        t = lq.shape[1]
        lq, gt = _frames(lq), _frames(gt)  # (N, 3, h, w), (N, 3, 4h, 4w)
        z, feats = self.latents(lq, gt, None if z is None else _frames(z))
        y = self.decode(z, feats, t)  # (N, 3, 4h, 4w)
        losses = {"l1": F.l1_loss(y, gt)}
        if self.lpips is not None:
            losses["lpips"] = self.lpips(y.clamp(0, 1), gt)
        if cfg.frame_diff > 0:
            losses["frame_diff"] = frame_difference_l1(y, gt, t)
        flows = self.flows(gt, t) if cfg.flow_warp > 0 else None
        if flows is not None:
            losses["flow_warp"] = flow_warp_l1(y, *flows, num_frames=t)
        disc = self.disc[0]
        if disc is not None and cfg.gan > 0 and step >= cfg.gan_start_step:
            inner = getattr(disc, "module", disc)  # no DDP sync here: the discriminator is not updated by this loss
            # real and fake together, as in the discriminator's own step: its BatchNorm never normalises
            # a fake-only batch with that batch's statistics
            logits = inner(torch.cat([gt.to(y.dtype), y]))
            losses["gan"] = hinge_g_loss(logits[gt.shape[0]:])
        return losses, y


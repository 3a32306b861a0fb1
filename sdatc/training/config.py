"""Training configuration (``configs/train/*.yaml``): one dataclass tree, strict keys, typed overrides."""

from __future__ import annotations

import dataclasses
from typing import Literal

from sdatc.data.datasets import TrainDataConfig
from sdatc.models.flow import FlowConfig

# The new modules each stage trains (docs/architecture.md section 5); the rest stays frozen.
STAGE_MODULES = {0: ("dcm",), 1: ("dcm", "guidance", "capm_unet"), 2: ("cfw", "stam", "capm_vae")}


@dataclasses.dataclass
class LatentsConfig:
    """Stage-2 latents sampled by the stage-1 model (``scripts/make_stage2_latents.py`` writes them)."""

    dir: str | None = None  # folder of shards + manifest.json
    num_samples: int = 20000  # 5-frame samples (20k x 5 = 100k frames, StableSR's 100k pairs)
    steps: int = 50  # respaced sampling steps, as at inference
    shard_size: int = 16
    seed: int = 0  # sampling noise

    def __post_init__(self):
        if self.num_samples < 1 or self.steps < 1 or self.shard_size < 1:
            raise ValueError("latents.num_samples, latents.steps and latents.shard_size must be >= 1")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 5e-5  # Adam, the paper's learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 switches clipping off
    disc_lr: float = 5e-5  # stage 2 discriminator

    def __post_init__(self):
        if self.lr <= 0 or self.disc_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, disc_lr={self.disc_lr}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("warmup_steps and max_grad_norm must be >= 0")


@dataclasses.dataclass
class LossConfig:
    """Loss weights. Stage 0: l1 (+ lpips). Stage 1: eps_mse + dcm_l1. Stage 2: l1, lpips,
    frame_diff, flow_warp, gan (from gan_start_step). A weight of 0 switches a term off."""

    eps_mse: float = 1.0
    dcm_l1: float = 1.0  # A3: L1(DCM output, GT) in stage 1
    l1: float = 1.0
    lpips: float = 0.5
    frame_diff: float = 0.5
    flow_warp: float = 0.5
    gan: float = 0.025
    gan_start_step: int = 501
    mse: float = 1.0  # UltraVSR: MSE(output, GT)
    distill: float = 1.0  # UltraVSR: the teacher's term (VSD, or MSE to SDATC's latents)
    fake_score: float = 1.0  # UltraVSR VSD: the fake score's diffusion loss (its own parameters and optimiser)
    lpips_pretrained_backbone: bool = True  # False: random AlexNet trunk (plumbing tests only)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and v < 0:
                raise ValueError(f"loss weight {f.name} must be >= 0, got {v}")


@dataclasses.dataclass
class ValConfig:
    """Periodic validation on one held-out clip (excluded from training when it sits in data.root)."""

    clip: str | None = None  # clip name; null: no validation
    root: str | None = None  # folder holding it (default: data.root)
    every: int = 500  # steps
    num_frames: int = 5
    gt_size: int | None = 256  # centre crop of the GT for a cheap check; null: full frame
    bitrate: float = 5e4  # its x264 degradation (fixed, 1 fps stream, as training)
    steps: int = 10  # sampling steps for stages 1 and 2

    def __post_init__(self):
        if self.every < 1 or self.num_frames < 1 or self.steps < 1:
            raise ValueError("val.every, val.num_frames and val.steps must be >= 1")


@dataclasses.dataclass
class VSDConfig:
    """[guess] UltraVSR's distillation as OSEDiff's variational score distillation, with RTS in the scorers."""

    cfg_scale: float = 7.5  # classifier-free guidance of the real score against the negative prompt
    negative_prompt: str = "painting, oil painting, illustration, drawing"
    t_range: tuple[int, int] = (20, 980)  # timesteps at which the generator's latents are scored
    fake_lora_rank: int = 4  # the fake score's LoRA (trained by the diffusion loss on the generator's latents)
    fake_lr: float = 5e-5


@dataclasses.dataclass
class UltraVSRTrainConfig:
    """UltraVSR training (system: ultravsr). Each [guess] is not public in the reference."""

    teacher: Literal["vsd", "sdatc", "none"] = "vsd"  # sdatc: MSE to a trained SDATC's sampled latents (latents.dir)
    d_range: tuple[float, float] = (0.3, 0.9)  # [guess] d ~ U(d_range) per clip sets the one-step timestep
    vsd: VSDConfig = dataclasses.field(default_factory=VSDConfig)
    val_d: float = 0.6  # d of the validation clip

    def __post_init__(self):
        if not 0 < self.d_range[0] <= self.d_range[1] <= 1:
            raise ValueError(f"ultravsr.d_range must be within (0, 1], got {list(self.d_range)}")


@dataclasses.dataclass
class TrainConfig:
    system: Literal["sdatc", "ultravsr"] = "sdatc"  # ultravsr: one stage, the UltraVSR modules (stage ignored)
    ultravsr: UltraVSRTrainConfig = dataclasses.field(default_factory=UltraVSRTrainConfig)
    stage: Literal[0, 1, 2] = 1
    model: str = "configs/model/sdatc_sd21.yaml"  # the model config (ModelConfig YAML)
    model_overrides: list[str] = dataclasses.field(default_factory=list)
    pretrained: str | None = None  # SD 2.1-base folder (else $SDATC_SD21_PATH); stages 1 and 2
    allow_random_weights: bool = False  # train on a randomly initialised SD (tiny configs, smoke runs)
    init: list[str] = dataclasses.field(default_factory=list)  # checkpoints to start the new modules from
    swinir_init: str | None = None  # a SwinIR classical x4 checkpoint for the DCM
    dcm_init: Literal["random", "interpolation"] = "random"  # interpolation: the DCM starts as cubic x4
    data: TrainDataConfig = dataclasses.field(default_factory=TrainDataConfig)
    output_dir: str | None = None
    max_steps: int = 100_000
    batch_size: int = 32  # clips per optimiser micro-step over all processes (paper: 4 per GPU x 8 GPUs)
    grad_accum: int = 1  # effective batch = batch_size * grad_accum
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # frozen parts in this dtype, trainable in fp32
    gradient_checkpointing: bool = True
    ema: bool = False
    ema_decay: float = 0.9999
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    flow: FlowConfig = dataclasses.field(default_factory=lambda: FlowConfig(required=False))  # RAFT for flow_warp
    latent_source: Literal["generated", "gt_noise", "stage1_x0"] = "generated"  # stage 2 latents (training/stages.py)
    latents: LatentsConfig = dataclasses.field(default_factory=LatentsConfig)  # generated: where and how many
    latent_noise_std: float = 0.1  # gt_noise: z = z_gt + std * noise
    proxy_t: tuple[int, int] = (0, 500)  # stage1_x0: timestep range of the one-step x0 prediction
    end_to_end_dcm: bool = True  # stage 1: epsilon loss reaches the DCM through the frozen VAE encoder
    checkpoint_every: int = 1000
    checkpoints_total_limit: int | None = 3
    resume: str | None = None  # "latest", a checkpoint-<step> folder, or null
    log_every: int = 10
    tensorboard: bool = False
    val: ValConfig = dataclasses.field(default_factory=ValConfig)
    seed: int = 0
    cpu_threads: int | None = None  # CPU runs: torch threads per process; null: cores / processes - data workers
    log_rank_checksums: bool = False  # debug DDP: each rank appends its sample indices and weight checksum

    def __post_init__(self):
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("max_steps, batch_size and grad_accum must be >= 1")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("checkpoints_total_limit must be >= 1 or null")
        if not 0 <= self.proxy_t[0] <= self.proxy_t[1] <= 999:
            raise ValueError(f"proxy_t must be a range within [0, 999], got {list(self.proxy_t)}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    @property
    def trainable(self) -> tuple[str, ...]:
        if self.system == "ultravsr":
            return ("rts_unet", "rts_vae", "lora_unet", "lora_vae", "conv_in")
        return STAGE_MODULES[self.stage]

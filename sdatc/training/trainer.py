"""The training loop (accelerate): any stage, one process or DDP through ``accelerate launch``.

    summary = train(load_config(TrainConfig, "configs/train/tiny_stage1.yaml", ["data.root=clips"]))

:func:`train` reads top to bottom: set up (check, build, prepare, resume: :func:`setup`), then the loop:
forward and backward over ``grad_accum`` micro-batches of ``batch_size`` clips split over the processes,
one optimiser step, the discriminator's step, a log line, validation, a checkpoint. What differs between
the stages (SDATC 0, 1, 2 and UltraVSR: data, casting, helpers, extra optimisers, losses) lives in the
stage classes (``training/stages.py``, ``training/ultravsr_stage.py``); building the model in
``training/build.py``.

``output_dir`` receives ``config.yaml`` (resolved), ``metrics.jsonl`` (a line every ``log_every`` steps and
at each checkpoint step: the means since the last line of every loss term and the grad norm, lr, seconds
per step, samples/s; the loop's only host sync; validation lines), ``val/step-*.png`` and
``checkpoint-<step>/`` folders: accelerate's full state (optimiser, scheduler, EMA, RNG of every
process, step and data position, discriminator) plus the trainable weights as
``sdatc_modules.safetensors`` with the model's ``config.yaml``, the resolved ``train_config.yaml`` and
``info.json`` (step, git revision). A checkpoint is written to a hidden temporary folder and renamed
when complete, so a run killed at any moment resumes (``resume=latest``) from the last complete one.

Precision (``mixed_precision``): ``bf16`` runs on GPUs and on the CPU (torch's CPU bf16 autocast);
SD's own frozen weights are cast to bf16 once, every new module (trainable or frozen) stays fp32, so
checkpoints hold exactly what was trained. ``fp16`` needs a GPU and keeps the frozen VAE decoder in
fp32 (SD's VAE overflows in fp16). The precision used is printed, written at the top of
``config.yaml`` and on every ``metrics.jsonl`` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdatc.config import dump_config
from sdatc.data.datasets import make_loader
from sdatc.errors import SdatcError
from sdatc.pipelines.hardware import speed_up_undone
from sdatc.training.build import build_model, init_modules
from sdatc.training.checkpoints import (
    TrainState,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    truncate_metrics,
)
from sdatc.training.checks import (
    check_devices,
    check_fp32_optimizers,
    device_checksums,
    process_note,
)
from sdatc.training.config import TrainConfig
from sdatc.training.losses import hinge_d_loss
from sdatc.training.precision import DTYPES, describe_precision, resolve_precision
from sdatc.training.stages import DCMStage, LatentStage, PixelStage, _Stage
from sdatc.training.ultravsr_stage import UltraVSRStage
from sdatc.training.validation import Validator
from sdatc.utils import atomic_write_text, tqdm

SDATC_STAGES = {0: DCMStage, 1: LatentStage, 2: PixelStage}


def stage_class(cfg: TrainConfig) -> type[_Stage]:
    """The stage a config trains: UltraVSR's one stage, or SDATC's stage 0, 1 or 2."""
    return UltraVSRStage if cfg.system == "ultravsr" else SDATC_STAGES[cfg.stage]


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) one training stage; returns a summary of the run."""
    run = setup(cfg)  # checks, the model and its stage, optimisers, DDP, resume: everything before step 1
    acc, stage, state, out, params = run.acc, run.stage, run.state, run.out, run.params
    disc, d_opt = run.extra.get("discriminator", (None, None))
    fake, fake_opt = run.extra.get("fake_score", (None, None))
    no_sync = [m for m in (stage, fake) if m is not None]  # DDP modules whose gradients accumulate locally
    batches = iter(make_loader(run.dataset, cfg.batch_size // acc.num_processes, start=state.position,
                               rank=acc.process_index, world_size=acc.num_processes,
                               pin_memory=acc.device.type == "cuda"))
    weights = dataclasses.asdict(cfg.loss)
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=f"stage {cfg.stage}", unit="step",
               disable=not (progress and acc.is_main_process))
    meter, last = _Meter(), {}
    stage.train()  # the stages keep their frozen parts in eval mode (training/stages.py)
    while state.step < cfg.max_steps:
        # forward and backward over grad_accum micro-batches; DDP all-reduces the gradients on the last one
        terms, indices = {}, []
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            if cfg.log_rank_checksums:
                indices += batch["index"].tolist()
            lq = batch["lq"].to(acc.device, non_blocking=True)  # (B, T, 3, h, w)
            gt = batch["gt"].to(acc.device, non_blocking=True)  # (B, T, 3, H, W)
            extra = {"z": batch["z"].to(acc.device, non_blocking=True)} if "z" in batch else {}  # (B, T, 4, H/8, W/8)
            if disc is not None:
                disc.requires_grad_(False)  # the generator's GAN term does not train the discriminator
            with contextlib.ExitStack() as sync:
                if micro < cfg.grad_accum - 1:
                    for m in no_sync:
                        sync.enter_context(acc.no_sync(m))
                with acc.autocast():
                    losses, output = stage(lq, gt, state.step, **extra)
                    total = sum(weights[k] * v for k, v in losses.items())
                acc.backward(total / cfg.grad_accum)
            for k, v in {**losses, "total": total}.items():
                v = v.detach().float() / cfg.grad_accum
                terms[k] = terms[k] + v if k in terms else v
            state.position += cfg.batch_size
        # clip, then step the generator, its schedule, VSD's fake score (its own loss term) and the EMA
        grad_norm = acc.clip_grad_norm_(params, cfg.optim.max_grad_norm or math.inf)
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        if fake_opt is not None:
            fake_opt.step()
            fake_opt.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.step(params)
        # the discriminator's step, on the last micro-batch
        if disc is not None and state.step >= cfg.loss.gan_start_step:
            terms["disc"] = _discriminator_step(acc, disc, d_opt, gt, output)
        meter.add(terms, torch.as_tensor(grad_norm, device=acc.device).detach().float())
        state.step += 1
        if cfg.log_rank_checksums:
            _log_rank(out, acc.process_index, acc.num_processes, state.step, indices, _fingerprint(params))
        # a log line every log_every steps and at each checkpoint step: the loop's only host sync
        checkpoint_now = state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps
        if state.step % cfg.log_every == 0 or checkpoint_now:
            last = _log_line(run, meter, bar)
        bar.update(1)
        # validation and the checkpoint (their seconds are not training time)
        t_pause = time.perf_counter()
        if run.validator is not None and (state.step % cfg.val.every == 0 or state.step == cfg.max_steps):
            _validate(run.validator, run.inner, acc.device, DTYPES[run.mp], state.step, out, run.ema, params)
        if checkpoint_now:
            save_checkpoint(acc, cfg, run.mcfg, state.step, out, run.trainable_state, run.ema, params)
        meter.paused += time.perf_counter() - t_pause
    bar.close()
    return _finish(run, last)


@dataclasses.dataclass
class Run:
    """What the loop works with (:func:`setup` makes it)."""

    cfg: TrainConfig
    acc: Any  # accelerate's Accelerator
    out: Path  # output_dir
    mp: str  # the precision used: "no", "bf16" or "fp16"
    dataset: Any  # the training samples
    model: nn.Module  # the whole model (frozen SD parts and new modules)
    mcfg: Any  # its config
    stage: nn.Module  # the stage (the model and its losses), DDP-wrapped with several processes
    inner: nn.Module  # the stage unwrapped
    params: list[nn.Parameter]  # the generator's trainable parameters
    opt: torch.optim.Optimizer
    sched: Any
    ema: Any  # diffusers' EMAModel of params, or None
    state: TrainState  # step and data position
    extra: dict  # {"discriminator" | "fake_score": (prepared module, its optimiser)}
    validator: Validator | None = None  # rank 0 with val.clip
    frozen: list[torch.Tensor] = dataclasses.field(default_factory=list)  # the frozen weights (SD's)
    frozen_print: torch.Tensor | None = None  # their checksums at the start (rank 0)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint saves, fp32 host copies."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.inner.trainable_state().items()}


def setup(cfg: TrainConfig) -> Run:
    """Everything before the first step: checks, the model and its stage, optimisers, DDP, resume."""
    from accelerate.utils import set_seed

    # 1. check what can be checked before any compute: the output folder, the checkpoint to resume from,
    #    the data (the validation clip held out of it), the precision; then start accelerate
    if not cfg.output_dir:
        raise SdatcError("output_dir is not set (output_dir=DIR)")
    out, resume, Stage = Path(cfg.output_dir), resolve_resume(cfg), stage_class(cfg)
    data_cfg, val_root = cfg.data, cfg.val.root or cfg.data.root
    if cfg.val.clip and Path(val_root or "") == Path(data_cfg.root or "") and cfg.val.clip not in data_cfg.exclude:
        data_cfg = dataclasses.replace(data_cfg, exclude=[*data_cfg.exclude, cfg.val.clip])  # held out
    dataset = Stage.dataset(cfg, data_cfg)
    mp = resolve_precision(cfg.mixed_precision, torch.cuda.is_available(), vsd=Stage.trains_fake_score(cfg))
    acc = _accelerator(cfg, mp, out, data_cfg.num_workers)
    device, main = acc.device, acc.is_main_process

    # 2. build: the same initial weights on every process; the stage casts SD's frozen parts once (new modules
    #    stay fp32) and builds its helpers (LPIPS, RAFT, a discriminator, VSD's fake score)
    set_seed(cfg.seed)
    model, mcfg, modules, notes = build_model(cfg)
    stage = Stage.build(model.to(device), cfg, device, mp, main)
    params = [p for n in cfg.trainable for p in modules[n].parameters()]

    # 3. prepare: the optimisers and schedule, the EMA, DDP, what a checkpoint holds, the setup checks
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    from diffusers.optimization import get_scheduler

    sched = get_scheduler(cfg.optim.scheduler, opt, num_warmup_steps=cfg.optim.warmup_steps,
                          num_training_steps=cfg.max_steps)
    state, ema = TrainState(), None
    if cfg.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
    extra = stage.extra_optimizers()
    stage, opt, extra = _prepare(acc, stage, opt, extra)
    acc.register_for_checkpointing(sched, state)
    if ema is not None:
        acc.register_for_checkpointing(ema)
    run = Run(cfg, acc, out, mp, dataset, model, mcfg, stage, acc.unwrap_model(stage), params, opt, sched, ema,
              state, extra)
    _checkpoint_hooks(acc, run.inner, modules, model)
    optimizers, placed = _tensors_to_check(run)
    check_fp32_optimizers(optimizers)
    check_devices(device, placed, optimizers, ema, "setup")
    run.frozen = run.inner.frozen_weights()
    run.frozen_print = device_checksums(run.frozen) if main and run.frozen else None  # on the device, rank 0, once

    # 4. start or resume: config.yaml, the RNG of each process, the checkpoint's state, the log cut to its step
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", f"# {describe_precision(mp)}\n" + dump_config(cfg))
        for n in notes:
            print(f"init: {n}")
    set_seed(cfg.seed + 1 + acc.process_index)  # noise and timesteps differ across processes
    if resume is not None:
        _resume(run, resume)
    if main:  # the log holds no row after the checkpoint behind it (a new run: none)
        truncate_metrics(out / "metrics.jsonl", state.step)
    run.validator = Validator(cfg.val, val_root, out / "val") if cfg.val.clip and main else None
    if cfg.tensorboard:
        try:
            acc.init_trackers("sdatc")
        except Exception as e:
            raise SdatcError(f"tensorboard=true but TensorBoard is not usable ({e}); pip install tensorboard") from None
    if main:
        print(f"stage {cfg.stage}: {sum(p.numel() for p in params) / 1e6:.2f} M trainable "
              f"({', '.join(cfg.trainable)}), {acc.num_processes} process(es), batch {cfg.batch_size} "
              f"x accumulation {cfg.grad_accum} = effective batch {cfg.batch_size * cfg.grad_accum}, "
              f"device {device}; {describe_precision(mp)}")
    return run


def _accelerator(cfg: TrainConfig, mp: str, out: Path, num_workers: int):
    """accelerate's Accelerator for the run (DDP with several processes); says how many processes run."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    AcceleratorState._reset_state()  # another run in this process may have used another precision
    acc = Accelerator(cpu=not cuda, mixed_precision=mp, log_with="tensorboard" if cfg.tensorboard else None,
                      project_dir=str(out),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    world, main = acc.num_processes, acc.is_main_process
    if cfg.batch_size % world:
        raise SdatcError(f"batch_size {cfg.batch_size} is not divisible across {world} processes")
    if main:
        kind = f" ({acc.distributed_type.value.lower()})" if world > 1 else ""
        print(f"processes: {world}{kind}, device {acc.device}")
    note = process_note(world)
    if note and main:
        print(f"warning: {note}", file=sys.stderr)
    if not cuda:  # oversubscribed OpenMP threads spin and can slow a step down several times
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // world - num_workers))
    return acc


def _prepare(acc, stage: _Stage, opt, extra: dict) -> tuple[nn.Module, Any, dict]:
    """DDP-wrap the stage, VSD's fake score and the discriminator with their optimisers (accelerate); the
    stage calls the prepared fake score and discriminator."""
    fake, fake_opt = extra.get("fake_score", (None, None))
    disc, d_opt = extra.get("discriminator", (None, None))
    if fake is not None:
        fake, fake_opt = acc.prepare(fake, fake_opt)
        stage.fake[0] = fake
    if disc is not None:
        stage, opt, disc, d_opt = acc.prepare(stage, opt, disc, d_opt)
        acc.unwrap_model(stage).disc[0] = disc
    else:
        stage, opt = acc.prepare(stage, opt)
    prepared = {"fake_score": (fake, fake_opt), "discriminator": (disc, d_opt)}
    return stage, opt, {k: v for k, v in prepared.items() if v[0] is not None}


def _checkpoint_hooks(acc, inner: _Stage, modules: dict, model: nn.Module) -> None:
    """accelerate's state holds no stage weights (the frozen backbone is not saved; the trainable weights go
    to their own file, :func:`save_checkpoint`); a resume loads them back into the new modules."""

    def save_hook(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if acc.unwrap_model(models[i]) is inner and len(weights) == len(models):
                weights.pop(i)

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            if acc.unwrap_model(models[i]) is inner:
                models.pop(i)
                init_modules(modules, [input_dir], model)

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)


def _tensors_to_check(run: Run) -> tuple[dict, dict]:
    """(optimisers, modules) by name, for the device and fp32 checks."""
    fake, fake_opt = run.extra.get("fake_score", (None, None))
    disc, d_opt = run.extra.get("discriminator", (None, None))
    return ({"optimizer": run.opt, "disc_optimizer": d_opt, "fake_optimizer": fake_opt},
            {"model": run.inner, "discriminator": disc, "fake_score": fake})


def _resume(run: Run, path: Path) -> None:
    """Load a checkpoint's full state (accelerate) and set the next step's learning rate from this run's schedule."""
    opt, sched, ema = run.opt, run.sched, run.ema
    load_checkpoint(run.acc, path)
    # the checkpoint's optimiser holds the rate the saving run's schedule set last, another one when max_steps
    # changed (a cosine that ended gave 0, and the first resumed step did not move the weights); with the same
    # schedule the same number
    for group, base, lr_lambda in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * lr_lambda(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in opt.param_groups]  # what get_last_lr() logs
    if ema is not None:
        # accelerate loads the EMA with map_location="cpu" and diffusers' EMAModel keeps it there
        ema.to(run.acc.device)
    optimizers, placed = _tensors_to_check(run)
    check_devices(run.acc.device, placed, optimizers, ema, "resume")
    if run.acc.is_main_process:
        print(f"resumed from {path} at step {run.state.step} (data position {run.state.position})")


class _Meter:
    """Per-term sums since the last log line, on the device (no host sync), and the seconds they took."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.t0, self.steps, self.paused = time.perf_counter(), 0, 0.0  # paused: validation, checkpoint seconds

    def add(self, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        for k, v in {**terms, "grad_norm": grad_norm}.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1


def _log_line(run: Run, meter: _Meter, bar) -> dict:
    """The means since the last line, averaged over the processes (the one host sync), into metrics.jsonl."""
    cfg, acc = run.cfg, run.acc
    seconds = (time.perf_counter() - meter.t0 - meter.paused) / meter.steps  # wall time: the sync below ends it
    keys = sorted(meter.sums)
    vec = acc.reduce(torch.stack([meter.sums[k] / meter.counts[k] for k in keys]), reduction="mean")
    values = dict(zip(keys, vec.tolist()))
    row = {"step": run.state.step, **{k: v for k, v in values.items() if k != "grad_norm"},
           "lr": run.sched.get_last_lr()[0], "grad_norm": values["grad_norm"], "sec_per_step": seconds,
           "samples_per_s": cfg.batch_size * cfg.grad_accum / seconds, "log_steps": meter.steps,
           "effective_batch": cfg.batch_size * cfg.grad_accum, "precision": run.mp}
    meter.reset()  # the next window starts here
    if acc.is_main_process:
        _append_jsonl(run.out / "metrics.jsonl", row)
        if cfg.tensorboard:
            acc.log({k: v for k, v in row.items() if k != "step"}, step=run.state.step)
        bar.set_postfix(loss=f"{row['total']:.4f}")
    return row


def _discriminator_step(acc, disc: nn.Module, d_opt, gt: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """One hinge step of the discriminator on the last micro-batch: real GT frames, then the detached output."""
    disc.requires_grad_(True)
    with acc.autocast():
        real = gt.flatten(0, 1)  # (B*T, 3, H, W)
        logits = disc(torch.cat([real, output.detach().to(real.dtype)]))
        d_loss = hinge_d_loss(*logits.chunk(2))  # real first, then fake (frames, or clips for 3-D)
    acc.backward(d_loss)
    d_opt.step()
    d_opt.zero_grad(set_to_none=True)
    return d_loss.detach().float()


def _finish(run: Run, last: dict) -> dict:
    """The run's summary, after checking the frozen weights' bits are unchanged (rank 0)."""
    step = run.state.step
    summary = {"step": step, "last": last, "checkpoint": str(run.out / f"checkpoint-{step}"),
               "trainable_params": sum(p.numel() for p in run.params), "precision": run.mp,
               "weight_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in run.model.parameters()})}
    if run.frozen_print is not None:
        if not torch.equal(device_checksums(run.frozen), run.frozen_print):
            raise SdatcError("the frozen SD 2.1 weights changed during training (a bug: please report it)")
        summary["frozen_weights_unchanged"] = True
    run.acc.wait_for_everyone()
    run.acc.end_training()
    return summary


def _validate(validator: Validator, stage: _Stage, device, dtype, step: int, out: Path, ema=None,
              params=None) -> None:
    """Validation runs as inference does: eval mode, the run's dtype (autocast over the cast weights), the EMA
    weights when the run keeps an EMA. The training model is left as it was: weights (the EMA swap is undone
    bit for bit), module modes, memory layout and the process-wide flags the pipelines' speed_up sets."""
    model = stage.model
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        with speed_up_undone(model):
            row = {"step": step, **validator(stage.restorer(device, dtype), step),
                   "val_weights": "ema" if ema is not None else "live"}
    finally:
        if ema is not None:
            ema.restore(params)
        for m, mode in modes:
            m.training = mode
    _append_jsonl(out / "metrics.jsonl", row)
    print(f"step {step}: val PSNR-Y {row['val_psnr_y']:.2f} dB (bicubic {row['val_bicubic_psnr_y']:.2f} dB), "
          f"{row['val_picture']}")


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _fingerprint(tensors) -> str:
    """A hash of the exact bytes of some tensors (the trainable ones across ranks: a debug log, host copies)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _log_rank(out: Path, rank: int, world: int, step: int, indices: list[int], checksum: str) -> None:
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    _append_jsonl(out / "ranks" / f"rank{rank}.jsonl",
                  {"step": step, "rank": rank, "world_size": world, "indices": indices, "weights": checksum})

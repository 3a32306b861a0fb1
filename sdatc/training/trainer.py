"""The training loop (accelerate): any stage, one process or DDP through ``accelerate launch``.

    summary = train(load_config(TrainConfig, "configs/train/tiny_stage1.yaml", ["data.root=clips"]))

One optimiser step = ``grad_accum`` micro-steps of ``batch_size`` clips split over the processes.
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
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdatc.config import dump_config
from sdatc.data.datasets import VideoClipDataset, make_loader, scan_clips
from sdatc.errors import SdatcError
from sdatc.models.backbone import ENV_SD21, SD21_HELP, resolve_pretrained
from sdatc.models.dcm import DCM, init_as_interpolation, load_swinir_checkpoint
from sdatc.models.flow import RAFT_WEIGHTS_NAME, load_raft
from sdatc.models.sdatc import SDATC, WEIGHTS_NAME
from sdatc.models.ultravsr import WEIGHTS_NAME as ULTRAVSR_WEIGHTS
from sdatc.models.ultravsr import UltraVSR
from sdatc.pipelines.speed import speed_up_undone
from sdatc.training.checkpoints import (
    TrainState,
    load_checkpoint,
    model_config,
    resolve_resume,
    save_checkpoint,
    truncate_metrics,
)
from sdatc.training.config import TrainConfig
from sdatc.training.latents import GeneratedLatents, plan
from sdatc.training.losses import LPIPSLoss, PatchDiscriminator, hinge_d_loss
from sdatc.training.precision import (
    FrozenHelper,
    cast_frozen_backbone,
    describe_precision,
    resolve_precision,
)
from sdatc.training.stages import DCMStage, LatentStage, PixelStage
from sdatc.training.validation import Validator, dcm_restorer, pipeline_restorer, ultravsr_restorer
from sdatc.utils import atomic_write_text, tqdm

# --------------------------------------------------------------------------- model construction


def _read_weights(path: str | Path, name: str = WEIGHTS_NAME) -> tuple[dict[str, torch.Tensor], str]:
    path = Path(path)
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise SdatcError(f"init checkpoint not found: {file} (a folder with {name}, e.g. a checkpoint-<step>, or the file)")
    return load_file(str(file)), str(file)


def init_modules(modules: dict[str, torch.nn.Module], paths: list[str], model: torch.nn.Module | None = None) -> list[str]:
    """Load each listed checkpoint (either key format) into the new modules it holds, strictly per module."""
    loaded = []
    for path in paths:
        if isinstance(model, UltraVSR):  # one strict state for all groups
            state, where = _read_weights(path, ULTRAVSR_WEIGHTS)
            model.load_trainable_state_dict(state, where)
            loaded.append(f"{', '.join(modules)} <- {where}")
            continue
        state, where = _read_weights(path)
        if isinstance(model, SDATC):
            groups = model.group_state_dicts(state)
        else:  # the stage-0 DCM: keys dcm.* in both formats
            groups = {}
            for k, v in state.items():
                if not k.startswith("_"):
                    name, _, rest = k.partition(".")
                    groups.setdefault(name, {})[rest] = v
        unknown = [n for n in groups if n not in modules]
        if unknown and not any(n in modules for n in groups):
            raise SdatcError(f"{where} holds no module of this model (it has {', '.join(groups)}; the model has {', '.join(modules)})")
        for name, sd in groups.items():
            if name not in modules:
                continue  # e.g. a stage-1 checkpoint's decoder modules when this model has them switched off
            result = modules[name].load_state_dict(sd, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise SdatcError(f"{where}: module {name} does not match ({len(result.missing_keys)} missing, e.g. "
                                 f"{result.missing_keys[:3]}; {len(result.unexpected_keys)} unexpected, e.g. "
                                 f"{result.unexpected_keys[:3]})")
            loaded.append(f"{name} <- {where}")
    return loaded


def build_model(cfg: TrainConfig):
    """The model of the run (a DCM for stage 0, SDATC or UltraVSR otherwise) with only its modules trainable."""
    mcfg = model_config(cfg)
    if cfg.system == "sdatc" and cfg.stage == 0:
        model = DCM(mcfg.dcm)
        modules = {"dcm": model}
    else:
        if resolve_pretrained(mcfg.backbone) is None and not cfg.allow_random_weights:
            raise SdatcError(f"no SD 2.1 weights: set pretrained=PATH or ${ENV_SD21} ({SD21_HELP}); "
                             "allow_random_weights=true trains on a random backbone, for smoke runs (with "
                             "configs/train/tiny_stage1.yaml: seconds on a CPU)")
        model = (UltraVSR if cfg.system == "ultravsr" else SDATC).from_config(mcfg)
        modules = model.new_modules()
        missing = [n for n in cfg.trainable if n not in modules]
        if missing:
            what = "UltraVSR" if cfg.system == "ultravsr" else f"stage {cfg.stage}"
            raise SdatcError(f"{what} trains {', '.join(cfg.trainable)} but the model config switches "
                             f"off {', '.join(missing)} (enabled.*)")
    if cfg.dcm_init == "interpolation" and "dcm" in modules:
        init_as_interpolation(modules["dcm"])
    notes = init_modules(modules, cfg.init, model)
    if cfg.swinir_init:
        load_swinir_checkpoint(modules["dcm"], cfg.swinir_init)
        notes.append(f"dcm <- {cfg.swinir_init} (SwinIR)")
    model.requires_grad_(False)
    for name in cfg.trainable:
        modules[name].requires_grad_(True)
    return model, mcfg, modules, notes


def generated_latents(cfg: TrainConfig, data_cfg) -> GeneratedLatents:
    """Stage 2's samples with latents of the stage-1 model, checked against this run's model and init."""
    if not cfg.latents.dir:
        raise SdatcError("latent_source=generated needs latents.dir: write the stage-1 model's latents first with "
                         "scripts/make_stage2_latents.py --config <this config> latents.dir=DIR (or set "
                         "latent_source=gt_noise|stage1_x0, cheaper proxies)")
    want = plan(cfg)
    return GeneratedLatents(cfg.latents.dir, {k: want[k] for k in ("stage1", "model")}, data_cfg)


def _fingerprint(tensors) -> str:
    """A hash of the exact bytes of some tensors (the trainable ones across ranks: a debug log, host copies)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def device_checksums(tensors) -> torch.Tensor:
    """Two int64 sums of each tensor's exact bits (plain and position-weighted), computed where the tensors
    live: (n, 2). The frozen-weight check without copying ~1 B parameters to the host."""
    out = []
    for t in tensors:
        bits = t.detach().reshape(-1).view(_BITS[t.element_size()]).long()  # the exact bits, widened
        pos = torch.arange(1, bits.numel() + 1, device=bits.device)
        out.append(torch.stack([bits.sum(), (bits * pos).sum()]))  # integer sums: exact, order-free
    return torch.stack(out) if out else torch.zeros(0, 2, dtype=torch.long)


def _on(t: torch.Tensor, device: torch.device) -> bool:
    if t.device.type != device.type:
        return False
    return device.type == "cpu" or device.index is None or t.device.index == device.index  # "cpu" and "cpu:0" alike


def misplaced(device, modules: dict, optimizers: dict, ema=None) -> list[str]:
    """Names of the tensors not on ``device``: every parameter and buffer of ``modules`` (name -> module),
    every optimiser state tensor (name -> optimiser; AdamW's scalar ``step`` counters live on the host by
    design) and every EMA shadow."""
    device = torch.device(device)
    bad = []
    for name, m in modules.items():
        if m is not None:
            bad += [f"{name}.{n}" for n, t in [*m.named_parameters(), *m.named_buffers()] if not _on(t, device)]
    for name, opt in optimizers.items():
        if opt is None:
            continue
        for i, st in enumerate(opt.state.values()):
            bad += [f"{name}.state[{i}].{k}" for k, t in st.items()
                    if torch.is_tensor(t) and not (k == "step" and t.ndim == 0) and not _on(t, device)]
    if ema is not None:
        bad += [f"ema.shadow[{i}]" for i, t in enumerate(ema.shadow_params) if not _on(t, device)]
    return bad


def check_devices(device, modules: dict, optimizers: dict, ema=None, when: str = "setup") -> None:
    """Raise when any model, optimiser or EMA tensor is off the run's device (see :func:`misplaced`)."""
    bad = misplaced(device, modules, optimizers, ema)
    if bad:
        raise SdatcError(f"after {when}: {len(bad)} tensor(s) not on {device} (a bug: please report it), e.g. "
                         f"{', '.join(bad[:4])}")


def check_fp32_optimizers(optimizers: dict) -> None:
    """Every parameter an optimiser holds is fp32 (its own master copy: bf16 updates lose small steps)."""
    bad = [f"{name}: {tuple(p.shape)} {p.dtype}" for name, opt in optimizers.items() if opt is not None
           for g in opt.param_groups for p in g["params"] if p.dtype != torch.float32]
    if bad:
        raise SdatcError(f"{len(bad)} optimised parameter(s) not fp32 (a bug: please report it), e.g. {'; '.join(bad[:3])}")


def process_note(world: int, env=os.environ) -> str | None:
    """A warning when the launcher asked for more processes than this run has, else None."""
    asked = env.get("WORLD_SIZE", "")
    if asked.isdigit() and int(asked) > world:
        return f"the launcher asked for {asked} processes (WORLD_SIZE) but this run has {world}"
    if not asked and world == 1 and env.get("MASTER_ADDR"):  # accelerate's simple launcher, --num_processes > 1
        return ("the launcher asked for several processes (MASTER_ADDR is set) but this run is one process: "
                "without GPUs, `accelerate launch` needs --multi_gpu and ACCELERATE_USE_CPU=1 to start several")
    return None


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) one training stage; returns a summary of the run."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    if not cfg.output_dir:
        raise SdatcError("output_dir is not set (output_dir=DIR)")
    out = Path(cfg.output_dir)
    # Everything that can be checked before compute is checked here.
    resume = resolve_resume(cfg)
    data_cfg = cfg.data
    val_root = cfg.val.root or data_cfg.root
    if cfg.val.clip and Path(val_root or "") == Path(data_cfg.root or "") and cfg.val.clip not in data_cfg.exclude:
        data_cfg = dataclasses.replace(data_cfg, exclude=[*data_cfg.exclude, cfg.val.clip])  # held out
    if cfg.system == "ultravsr" and cfg.ultravsr.teacher == "sdatc":
        if not cfg.latents.dir:
            raise SdatcError("teacher sdatc needs latents.dir: a trained SDATC's latents, written by "
                             "scripts/make_stage2_latents.py with that SDATC's stage-2 config")
        ds = GeneratedLatents(cfg.latents.dir, None, data_cfg)
    elif cfg.system == "sdatc" and cfg.stage == 2 and cfg.latent_source == "generated":
        ds = generated_latents(cfg, data_cfg)
    else:
        ds = VideoClipDataset(data_cfg, scan_clips(data_cfg))
    cuda = torch.cuda.is_available()
    vsd = cfg.system == "ultravsr" and cfg.ultravsr.teacher == "vsd" and cfg.loss.distill > 0
    mp = resolve_precision(cfg.mixed_precision, cuda, vsd=vsd)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # another run in this process may have used another precision
    acc = Accelerator(cpu=not cuda, mixed_precision=mp, log_with="tensorboard" if cfg.tensorboard else None,
                      project_dir=str(out), kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    if cfg.batch_size % world:
        raise SdatcError(f"batch_size {cfg.batch_size} is not divisible across {world} processes")
    per_rank = cfg.batch_size // world
    if main:
        kind = f" ({acc.distributed_type.value.lower()})" if world > 1 else ""
        print(f"processes: {world}{kind}, device {acc.device}")
    note = process_note(world)
    if note and main:
        print(f"warning: {note}", file=sys.stderr)
    if not cuda:  # oversubscribed OpenMP threads spin and can slow a step down several times
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // world - data_cfg.num_workers))

    set_seed(cfg.seed)  # the same initial weights on every process
    model, mcfg, modules, notes = build_model(cfg)
    device = acc.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    model.to(device)
    if cfg.stage > 0 or cfg.system == "ultravsr":
        cast_frozen_backbone(model, weight_dtype)
    if cfg.gradient_checkpointing:
        if cfg.stage == 0 and cfg.system == "sdatc":
            model.gradient_checkpointing = True
        else:
            model.enable_gradient_checkpointing()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    params = [p for n in cfg.trainable for p in modules[n].parameters()]
    lp = None
    if (cfg.stage in (0, 2) or cfg.system == "ultravsr") and cfg.loss.lpips > 0:
        lp = LPIPSLoss(cfg.loss.lpips_pretrained_backbone).to(device)
    disc = d_opt = fake = fake_opt = None
    if cfg.system == "ultravsr":
        stage, disc, fake = _ultravsr_stage(model, cfg, lp, device, weight_dtype)
    elif cfg.stage == 0:
        stage = DCMStage(model, cfg, lp)
    elif cfg.stage == 1:
        stage = LatentStage(model, cfg)
    else:
        raft = None
        if cfg.loss.flow_warp > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # load_raft's warning speaks of inference; say it for training
                raft = load_raft(cfg.flow, device)
            raft = FrozenHelper(raft) if raft is not None else None
            if raft is None and main:
                print(f"note: flow_warp loss off: no RAFT weights (flow.raft_weights=.../{RAFT_WEIGHTS_NAME})")
        if cfg.loss.gan > 0:
            disc = PatchDiscriminator().to(device)
        stage = PixelStage(model, cfg, lp, raft, None, decode_fp32=mp == "fp16")
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    from diffusers.optimization import get_scheduler

    sched = get_scheduler(cfg.optim.scheduler, opt, num_warmup_steps=cfg.optim.warmup_steps,
                          num_training_steps=cfg.max_steps)
    state = TrainState()
    ema = None
    if cfg.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
    if fake is not None:  # UltraVSR's VSD fake score: its own module and optimiser
        fake_opt = torch.optim.AdamW([p for p in fake.parameters() if p.requires_grad], lr=cfg.ultravsr.vsd.fake_lr,
                                     betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=0.0)
        fake, fake_opt = acc.prepare(fake, fake_opt)
        stage.fake[0] = fake
    if disc is not None:
        d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.optim.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
        stage, opt, disc, d_opt = acc.prepare(stage, opt, disc, d_opt)
        acc.unwrap_model(stage).disc[0] = disc
    else:
        stage, opt = acc.prepare(stage, opt)
    acc.register_for_checkpointing(sched, state)
    if ema is not None:
        acc.register_for_checkpointing(ema)
    inner = acc.unwrap_model(stage)
    optimizers = {"optimizer": opt, "disc_optimizer": d_opt, "fake_optimizer": fake_opt}
    placed = {"model": inner, "discriminator": disc, "fake_score": fake}
    check_fp32_optimizers(optimizers)
    check_devices(device, placed, optimizers, ema, "setup")
    main_check = main and (cfg.stage > 0 or cfg.system == "ultravsr")
    frozen_print = device_checksums(frozen) if main_check else None  # on the device, rank 0, once

    def trainable_state() -> dict[str, torch.Tensor]:
        state = (model.trainable_state_dict() if isinstance(model, SDATC | UltraVSR)
                 else {f"dcm.{k}": v for k, v in model.state_dict().items()})
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def save_hook(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if acc.unwrap_model(models[i]) is inner and len(weights) == len(models):
                weights.pop(i)  # the frozen backbone is not saved; the trainable weights are, below

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            if acc.unwrap_model(models[i]) is inner:
                models.pop(i)
                init_modules(modules, [input_dir], model)

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", f"# {describe_precision(mp)}\n" + dump_config(cfg))
        for n in notes:
            print(f"init: {n}")
    set_seed(cfg.seed + 1 + rank)  # noise and timesteps differ across processes; a resume restores the RNG below
    if resume is not None:
        load_checkpoint(acc, resume)
        # the next step's learning rate from this run's schedule: the checkpoint's optimiser holds the rate the
        # saving run's schedule set last, another one when max_steps changed (a cosine that ended gave 0, and the
        # first resumed step did not move the weights); with the same schedule the same number
        for group, base, lr_lambda in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * lr_lambda(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in opt.param_groups]  # what get_last_lr() logs
        if ema is not None:
            ema.to(device)  # accelerate loads the EMA with map_location="cpu" and diffusers' EMAModel keeps it there
        check_devices(device, placed, optimizers, ema, "resume")
        if main:
            print(f"resumed from {resume} at step {state.step} (data position {state.position})")
    if main:  # the log holds no row after the checkpoint behind it (a new run: none)
        truncate_metrics(out / "metrics.jsonl", state.step)

    validator = None
    if cfg.val.clip and main:
        validator = Validator(cfg.val, val_root, out / "val")
    if cfg.tensorboard:
        try:
            acc.init_trackers("sdatc")
        except Exception as e:
            raise SdatcError(f"tensorboard=true but TensorBoard is not usable ({e}); pip install tensorboard") from None

    n_trainable = sum(p.numel() for p in params)
    if main:
        print(f"stage {cfg.stage}: {n_trainable / 1e6:.2f} M trainable ({', '.join(cfg.trainable)}), "
              f"{world} process(es), batch {cfg.batch_size} x accumulation {cfg.grad_accum} = effective batch "
              f"{cfg.batch_size * cfg.grad_accum}, device {device}; {describe_precision(mp)}")

    loader = make_loader(ds, per_rank, start=state.position, rank=rank, world_size=world, pin_memory=cuda)
    batches = iter(loader)
    weights = dataclasses.asdict(cfg.loss)
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=f"stage {cfg.stage}", unit="step",
               disable=not (progress and main))
    last: dict = {}
    sums: dict[str, torch.Tensor] = {}  # per-term sums over the steps since the last log line, on the device
    counts: dict[str, int] = {}
    window_t0, window_steps, paused = time.perf_counter(), 0, 0.0  # paused: validation and checkpoint seconds
    no_sync = [m for m in (stage, fake) if m is not None]  # DDP modules whose gradients accumulate locally

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value
        counts[key] = counts.get(key, 0) + 1

    stage.train()  # the stages keep their frozen parts in eval mode (training/stages.py)
    while state.step < cfg.max_steps:
        terms: dict[str, torch.Tensor] = {}
        indices = []
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            if cfg.log_rank_checksums:
                indices += batch["index"].tolist()
            lq = batch["lq"].to(device, non_blocking=True)  # (B, T, 3, h, w)
            gt = batch["gt"].to(device, non_blocking=True)  # (B, T, 3, H, W)
            extra = {"z": batch["z"].to(device, non_blocking=True)} if "z" in batch else {}  # (B, T, 4, H/8, W/8)
            if disc is not None:
                disc.requires_grad_(False)
            with contextlib.ExitStack() as sync:
                if micro < cfg.grad_accum - 1:  # all-reduce once, on the last micro-step
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
        grad_norm = acc.clip_grad_norm_(params, cfg.optim.max_grad_norm or math.inf)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if fake_opt is not None:
            fake_opt.step()
            fake_opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        if disc is not None and state.step >= cfg.loss.gan_start_step:  # discriminator on the last micro-batch
            disc.requires_grad_(True)
            with acc.autocast():
                real = gt.flatten(0, 1)
                logits = disc(torch.cat([real, output.detach().to(real.dtype)]))
                d_loss = hinge_d_loss(*logits.chunk(2))  # real first, then fake (frames, or clips for 3-D)
            acc.backward(d_loss)
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
            terms["disc"] = d_loss.detach().float()
        for k, v in terms.items():
            add(k, v)
        add("grad_norm", torch.as_tensor(grad_norm, device=device).detach().float())
        state.step += 1
        window_steps += 1
        if cfg.log_rank_checksums:
            _log_rank(out, rank, world, state.step, indices, _fingerprint(params))
        checkpoint_now = state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps
        if state.step % cfg.log_every == 0 or checkpoint_now:  # the only host sync of the loop
            seconds = (time.perf_counter() - window_t0 - paused) / window_steps  # wall time: the sync below ends it
            keys = sorted(sums)
            vec = acc.reduce(torch.stack([sums[k] / counts[k] for k in keys]), reduction="mean")  # over processes
            values = dict(zip(keys, vec.tolist()))
            row = {"step": state.step, **{k: v for k, v in values.items() if k != "grad_norm"},
                   "lr": sched.get_last_lr()[0], "grad_norm": values["grad_norm"], "sec_per_step": seconds,
                   "samples_per_s": cfg.batch_size * cfg.grad_accum / seconds, "log_steps": window_steps,
                   "effective_batch": cfg.batch_size * cfg.grad_accum, "precision": mp}
            sums, counts, window_t0, window_steps, paused = {}, {}, time.perf_counter(), 0, 0.0
            if main:
                _append_jsonl(out / "metrics.jsonl", row)
                if cfg.tensorboard:
                    acc.log({k: v for k, v in row.items() if k != "step"}, step=state.step)
                bar.set_postfix(loss=f"{row['total']:.4f}")
            last = row
        bar.update(1)
        t_pause = time.perf_counter()
        if validator is not None and (state.step % cfg.val.every == 0 or state.step == cfg.max_steps):
            _validate(validator, cfg, modules, model, device, weight_dtype, state.step, out, ema, params)
        if checkpoint_now:
            save_checkpoint(acc, cfg, mcfg, state.step, out, trainable_state, ema, params)
        paused += time.perf_counter() - t_pause  # not training time
    bar.close()
    summary = {"step": state.step, "last": last, "checkpoint": str(out / f"checkpoint-{state.step}"),
               "trainable_params": n_trainable, "precision": mp,
               "weight_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})}
    if frozen_print is not None:
        if not torch.equal(device_checksums(frozen), frozen_print):
            raise SdatcError("the frozen SD 2.1 weights changed during training (a bug: please report it)")
        summary["frozen_weights_unchanged"] = True
    acc.wait_for_everyone()
    acc.end_training()
    return summary


def _ultravsr_stage(model, cfg: TrainConfig, lp, device, weight_dtype):
    """UltraVSR's stage, its temporal discriminator and, for VSD, the fake score (frozen SD copy cast once)."""
    from sdatc.models.backbone import encode_prompt
    from sdatc.training.ultravsr_stage import FakeScore, PatchDiscriminator3D, UltraVSRStage

    u = cfg.ultravsr
    negative = fake = None
    if u.teacher == "vsd" and cfg.loss.distill > 0:
        negative = encode_prompt(model_config(cfg).backbone, u.vsd.negative_prompt).to(device)
        fake = FakeScore(model, u.vsd.fake_lora_rank).to(device)
        cast_frozen_backbone(fake, weight_dtype, parts=("unet",))
    disc = PatchDiscriminator3D(cfg.data.num_frames).to(device) if cfg.loss.gan > 0 else None
    return UltraVSRStage(model, cfg, lp, negative), disc, fake


def _validate(validator: Validator, cfg: TrainConfig, modules, model, device, dtype, step: int, out: Path,
              ema=None, params=None) -> None:
    """Validation runs as inference does: eval mode, the run's dtype (autocast over the cast weights), the EMA
    weights when the run keeps an EMA. The training model is left as it was: weights (the EMA swap is undone
    bit for bit), module modes, memory layout and the process-wide flags the pipelines' speed_up sets."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        with speed_up_undone(model):
            if cfg.system == "ultravsr":
                restore = ultravsr_restorer(model, cfg.ultravsr.val_d, cfg.val.num_frames, device, dtype)
            elif cfg.stage == 0:
                restore = dcm_restorer(modules["dcm"], device, dtype)
            else:
                restore = pipeline_restorer(model, cfg.val.steps, cfg.val.num_frames, device, dtype)
            row = {"step": step, **validator(restore, step), "val_weights": "ema" if ema is not None else "live"}
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


def _log_rank(out: Path, rank: int, world: int, step: int, indices: list[int], checksum: str) -> None:
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    _append_jsonl(out / "ranks" / f"rank{rank}.jsonl",
                  {"step": step, "rank": rank, "world_size": world, "indices": indices, "weights": checksum})

"""What the full configs' GPU runs rely on, checked on the CPU (issue 22): UltraVSR's gradient checkpointing
(its LoRA'd VAE encoder recomputed, no diffusers block without its checkpoint function), every tensor on the
run's device after setup and after resume, fp32 master weights in every optimiser, fp16 refused with VSD,
validation that leaves the training model and the process flags as they were and scores the EMA weights,
host syncs only at log lines, a frozen-weight check on the device, DDP without bucket-stride warnings, and
the number of processes said (and a launcher that asked for more warned about)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sdatc.training.trainer as trainer
from sdatc.config import load_config
from sdatc.data.video import write_frames
from sdatc.errors import SdatcError
from sdatc.training.config import TrainConfig
from sdatc.training.trainer import check_devices, device_checksums, process_note, train

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.num_workers=0", "data.gt_size=32", "data.num_frames=3", "batch_size=1", "val.gt_size=32",
         "val.num_frames=3"]


def cfg_for(name, data_root, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, f"configs/train/{name}.yaml",
                       [f"data.root={data_root}", f"output_dir={out}", *SMALL, *overrides])


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def val_root(tmp_path_factory, bunny_frames):
    root = tmp_path_factory.mktemp("integrity_val")
    write_frames(root / "bunnyval", bunny_frames[:5, 300:364, 700:764])
    return root


def _saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs (activation memory), and its output."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


# --------------------------------------------------------------------------- 1. UltraVSR checkpointing


def test_ultravsr_checkpointing_recomputes_the_lora_encoder(monkeypatch):
    """enable_gradient_checkpointing: UltraVSR's VAE encoder (LoRA, with grad) keeps less for backward, the
    gradients are the same, and no diffusers block is left with the flag but without its checkpoint function
    (the VAE encoder's UNetMidBlock2D crashed training at step 1)."""
    from sdatc.models.ultravsr import UltraVSR, UltraVSRConfig

    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    torch.manual_seed(0)
    model = UltraVSR.from_config(load_config(UltraVSRConfig, "configs/model/ultravsr_tiny.yaml")).train()
    lora = [p for n, p in model.vae.named_parameters() if ".lora_" in n]
    with torch.no_grad():  # lora_B starts at zero: give every adapter a non-trivial gradient
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
    img = torch.rand(2, 3, 64, 64)
    results = []
    for ckpt in (False, True):
        if ckpt:
            model.enable_gradient_checkpointing()
        nbytes, z = _saved_bytes(lambda: model.encode(img))
        results.append((nbytes, torch.autograd.grad(z.square().mean(), lora)))
    (plain, g0), (ckpt, g1) = results
    assert ckpt < 0.5 * plain, (ckpt, plain)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g0, g1))
    flagged = [n for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False)
               and type(m).__module__.startswith("diffusers") and not hasattr(m, "_gradient_checkpointing_func")]
    assert flagged == []


def test_ultravsr_trains_in_bf16_with_checkpointing_ema_and_validation(data_root, val_root, tmp_path, monkeypatch,
                                                                      spy_optimizers):
    """The full config's flags on the tiny UltraVSR: bf16, gradient checkpointing, EMA, GAN and VSD, two
    accumulation micro-steps; every optimiser (generator, fake score, discriminator) holds fp32 parameters;
    the fake score's gradients, like the generator's, are not all-reduced on the first micro-step."""
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    spy = spy_optimizers(monkeypatch)
    unsynced = []
    from accelerate import Accelerator

    real_no_sync = Accelerator.no_sync

    def no_sync(self, model):
        unsynced.append(type(self.unwrap_model(model)).__name__)
        return real_no_sync(self, model)

    monkeypatch.setattr(Accelerator, "no_sync", no_sync)
    out = tmp_path / "run"
    summary = train(cfg_for("tiny_ultravsr", data_root, out, "max_steps=1", "mixed_precision=bf16",
                            "gradient_checkpointing=true", "ema=true", "grad_accum=2", "val.clip=bunnyval",
                            f"val.root={val_root}", "val.every=1"), progress=False)
    assert summary["precision"] == "bf16" and summary["frozen_weights_unchanged"] is True
    assert set(summary["weight_dtypes"]) == {"bfloat16", "float32"}
    saved = load_file(str(out / "checkpoint-1" / "ultravsr_modules.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32}  # trainable weights stay fp32
    assert len(spy.made) == 3 and spy.param_dtypes() == {"float32"}  # generator, fake score, discriminator
    assert sorted(unsynced) == ["FakeScore", "UltraVSRStage"]
    val = [r for r in rows(out) if "val_psnr_y" in r]
    assert len(val) == 1 and val[0]["val_psnr_y"] > 5 and val[0]["val_weights"] == "ema"


def test_fp16_with_vsd_is_refused(data_root, tmp_path):
    with pytest.raises(SdatcError, match="fp16 with VSD"):
        train(cfg_for("tiny_ultravsr", data_root, tmp_path, "mixed_precision=fp16", "max_steps=1"), progress=False)
    assert not list(tmp_path.glob("checkpoint-*"))


# --------------------------------------------------------------------------- 3. devices


def test_device_check_fires_for_every_kind_of_tensor():
    from diffusers.training_utils import EMAModel

    def setup():
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        opt = torch.optim.AdamW(net.parameters())
        net(torch.rand(2, 3, 8, 8)).sum().backward()
        opt.step()  # optimiser state exists
        return net, opt, EMAModel(list(net.parameters()))

    net, opt, ema = setup()
    check_devices("cpu", {"net": net}, {"opt": opt}, ema)  # all on the CPU: passes
    cases = {"net.0.weight": lambda n, o, e: setattr(n[0], "weight", torch.nn.Parameter(n[0].weight.to("meta"))),
             "net.1.running_mean": lambda n, o, e: setattr(n[1], "running_mean", n[1].running_mean.to("meta")),
             "opt.state[0].exp_avg": lambda n, o, e: o.state[n[0].weight].update(exp_avg=torch.zeros(1, device="meta")),
             "ema.shadow[1]": lambda n, o, e: e.shadow_params.__setitem__(1, e.shadow_params[1].to("meta"))}
    for name, move in cases.items():
        net, opt, ema = setup()
        move(net, opt, ema)
        with pytest.raises(SdatcError, match=r"after resume: 1 tensor\(s\) not on cpu .*" + re.escape(name)):
            check_devices("cpu", {"net": net}, {"opt": opt}, ema, "resume")


def test_resume_with_ema_passes_the_device_check_and_validates_the_ema(data_root, val_root, tmp_path, monkeypatch):
    """Stage 0 with EMA and validation at every step, resumed once: the device check runs after setup and
    after resume (EMA shadows included) and passes; validation scores the EMA weights (the checkpoint's
    ema/ copy; at step 1 the EMA equals the weights, diffusers' EMA warm-up), not the live ones."""
    from sdatc.metrics.psnr_ssim import psnr_y
    from sdatc.models.dcm import DCM
    from sdatc.training.checkpoints import model_config
    from sdatc.training.precision import DTYPES, resolve_precision
    from sdatc.training.validation import Validator, dcm_restorer

    calls = []
    real = trainer.check_devices

    def spy(device, modules, optimizers, ema=None, when="setup"):
        calls.append((when, len(ema.shadow_params) if ema is not None else 0,
                      sum(len(o.state) for o in optimizers.values() if o is not None)))
        return real(device, modules, optimizers, ema, when)

    monkeypatch.setattr(trainer, "check_devices", spy)
    common = ["ema=true", "checkpoint_every=1", "checkpoints_total_limit=null", "val.clip=bunnyval",
              f"val.root={val_root}", "val.every=1"]
    out = tmp_path / "run"
    train(cfg_for("tiny_stage0", data_root, out, "max_steps=1", *common), progress=False)
    train(cfg_for("tiny_stage0", data_root, out, "max_steps=2", *common), progress=False)  # resume=latest
    n_params = calls[0][1]
    assert calls == [("setup", n_params, 0), ("setup", n_params, 0), ("resume", n_params, n_params)]
    val = {r["step"]: r for r in rows(out) if "val_psnr_y" in r}
    assert sorted(val) == [1, 2] and {r["val_weights"] for r in val.values()} == {"ema"}
    # the resumed step moved the weights: its learning rate is the max_steps=2 schedule's (cosine at 1/2), not
    # the 0 that the max_steps=1 run's finished cosine left in the checkpoint's optimiser
    before, after = (load_file(str(out / f"checkpoint-{s}" / "sdatc_modules.safetensors")) for s in (1, 2))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    validator = Validator(cfg_for("tiny_stage0", data_root, out, *common).val, val_root, tmp_path / "v")
    cfg = cfg_for("tiny_stage0", data_root, out)
    # validation ran in the run's precision (tiny_stage0 inherits stage0.yaml's bf16: autocast over the fp32
    # DCM); the same weights, frames and dtype through the same pipeline give the same frames, bit for bit
    dtype = DTYPES[resolve_precision(cfg.mixed_precision, cuda=False)]
    assert dtype == torch.bfloat16, "the tiny stage-0 config no longer inherits bf16: this test's premise"
    psnr = {}
    for kind in ("ema", "live"):
        dcm = DCM(model_config(cfg).dcm).eval()
        folder = out / "checkpoint-2" / ("ema" if kind == "ema" else "")
        saved = load_file(str(folder / "sdatc_modules.safetensors"))
        dcm.load_state_dict({k.removeprefix("dcm."): v for k, v in saved.items()})
        frames = dcm_restorer(dcm, "cpu", dtype)(validator.lq)
        psnr[kind] = float(np.mean([psnr_y(o, g) for o, g in zip(frames, validator.gt)]))
    assert val[2]["val_psnr_y"] == pytest.approx(psnr["ema"], abs=1e-9) and psnr["ema"] != psnr["live"]


# --------------------------------------------------------------------------- 7. validation leaves the model as it was


def test_validation_leaves_the_training_model_and_flags_unchanged(tiny_model, val_root, tmp_path, monkeypatch):
    """Stage-1 validation with an EMA, its pipeline's speed_up acting as on CUDA (TF32 on, UNet, guidance and
    VAE channels_last): afterwards every parameter and buffer has its values and strides, every module its
    mode, and torch.backends' flags are as before."""
    from diffusers.training_utils import EMAModel

    import sdatc.pipelines.sdatc_pipeline as restore
    from sdatc.training.precision import keep_frozen_in_eval
    from sdatc.training.stages import LatentStage
    from sdatc.training.validation import Validator

    real_speed_up = restore.speed_up

    def cuda_like_speed_up(model, device, compile=False):
        real_speed_up(model, "cuda")  # what it does on CUDA: TF32 on, UNet, guidance and VAE channels_last
        return real_speed_up(model, device, compile=compile)

    monkeypatch.setattr(restore, "speed_up", cuda_like_speed_up)
    cfg = load_config(TrainConfig, "configs/train/tiny_stage1.yaml", ["val.clip=bunnyval", "val.steps=1", *SMALL[4:]])
    model = tiny_model.train()
    keep_frozen_in_eval(model)
    params = model.trainable_parameters()
    ema = EMAModel(params)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)  # the live weights differ from the EMA's
    before = {n: (t.clone(), t.stride()) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    assert not flags[0]  # the test starts from torch's defaults
    validator = Validator(cfg.val, val_root, tmp_path / "val")
    trainer._validate(validator, LatentStage(model, cfg), torch.device("cpu"), torch.float32, 1, tmp_path, ema, params)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    changed = [n for n, (t, stride) in before.items() if after[n].stride() != stride or not torch.equal(after[n], t)]
    assert changed == []
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision()) == flags
    assert rows(tmp_path)[0]["val_weights"] == "ema"


# --------------------------------------------------------------------------- 8. per-step waste


def test_host_syncs_only_at_log_lines(data_root, tmp_path, monkeypatch):
    """The loop itself reads nothing back from the device between log lines: no .item(), float() or .tolist()
    in trainer.py but the one .tolist() of each log line (the mean over the processes). A log line holds the
    mean of the steps since the last one; one is written at every checkpoint too (so a resumed log continues)."""
    calls = []
    for name in ("item", "tolist", "__float__"):
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **k):
            if sys._getframe(1).f_code.co_filename.endswith(os.path.join("training", "trainer.py")):
                calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    train(cfg_for("tiny_stage0", data_root, tmp_path / "a", "max_steps=5", "log_every=5", "checkpoint_every=100"),
          progress=False)
    assert calls == ["tolist"]
    train(cfg_for("tiny_stage0", data_root, tmp_path / "b", "max_steps=5", "log_every=2", "checkpoint_every=3"),
          progress=False)
    log = rows(tmp_path / "b")
    assert [(r["step"], r["log_steps"]) for r in log] == [(2, 2), (3, 1), (4, 1), (5, 1)]


def test_device_checksums_see_any_change():
    torch.manual_seed(0)
    ts = [torch.randn(5, 7), torch.randn(3).bfloat16(), torch.randn(4, 4).half()]
    ref = device_checksums(ts)
    assert ref.shape == (3, 2) and torch.equal(device_checksums([t.clone() for t in ts]), ref)
    one_bit = ts[0].clone()
    one_bit.view(torch.int32)[2, 3] ^= 1  # the lowest mantissa bit of one element
    swapped = ts[2].clone()
    swapped[0, 0], swapped[1, 1] = ts[2][1, 1], ts[2][0, 0]
    for changed in ([one_bit, ts[1], ts[2]], [ts[0], ts[1], swapped]):
        assert not torch.equal(device_checksums(changed), ref)


# --------------------------------------------------------------------------- 3b. processes


def test_guidance_1x1_weight_gradients_keep_the_weights_strides(tiny_model, bunny_frames):
    """The latent from the VAE encoder and the guidance encoder's features are in the standard layout (diffusers'
    Attention returns a channels_last-strided view, which the blocks after it kept): the 1x1 zero convs' weight
    gradients then have the weights' strides. A (C_out, C_in, 1, 1) gradient with channels_last strides passes
    autograd's layout contract (size-1 dims) but not DDP's bucket-view stride check (the 2-process warning).
    Under the configs' bf16 autocast, as the runs train (the bf16 weight copy's gradient keeps the input's layout)."""
    m = tiny_model.train()
    img = torch.from_numpy(bunny_frames[:2, 300:332, 700:732]).permute(0, 3, 1, 2).float() / 255  # (2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, _ = m.encode(img)  # (2, 4, 4, 4)
        assert z.is_contiguous()
        down, mid = m.guidance(z, torch.randn_like(z), torch.tensor([10, 500]))
    g = torch.Generator().manual_seed(0)
    sum((d.float() * torch.randn(d.shape, generator=g)).sum() for d in [*down, mid]).backward()
    convs = dict(m.guidance.zero_convs.named_parameters())
    bad = {n: (p.stride(), p.grad.stride()) for n, p in convs.items() if p.ndim == 4 and p.grad.stride() != p.stride()}
    assert len(convs) > 2 and not bad, bad


def test_two_processes_without_bucket_stride_warnings(data_root, tmp_path):
    """Stage 1 (CAPM's depthwise convs, which got channels_last gradients from the LayerNorm's permuted
    output) in 2 DDP processes with 2 accumulation micro-steps: no "Grad strides do not match bucket view
    strides" warning, identical weights on both ranks, the process count said."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(ROOT / "scripts" / "train.py"), "--config", "configs/train/tiny_stage1.yaml",
              f"data.root={data_root}", *SMALL[:3], "batch_size=2", "grad_accum=2", "log_rank_checksums=true",
              f"output_dir={tmp_path}", "max_steps=2", "checkpoint_every=100"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    env.pop("PYTHONWARNINGS", None)
    p = subprocess.run(launch, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Grad strides do not match" not in p.stderr, p.stderr[-3000:]
    assert "processes: 2 (multi_cpu)" in p.stdout
    r0, r1 = ([json.loads(x) for x in (tmp_path / "ranks" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1))
    assert [a["weights"] for a in r0] == [b["weights"] for b in r1]


def test_launcher_asking_for_more_processes_warns(data_root, tmp_path):
    assert process_note(2, {"WORLD_SIZE": "2"}) is None and process_note(1, {}) is None
    assert "asked for 4 processes (WORLD_SIZE) but this run has 2" in process_note(2, {"WORLD_SIZE": "4"})
    assert "--multi_gpu" in process_note(1, {"MASTER_ADDR": "127.0.0.1"})
    # README's GPU form on a machine without GPUs: accelerate's simple launcher starts one process
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        str(ROOT / "scripts" / "train.py"),
                        "--config", "configs/train/tiny_stage0.yaml", f"data.root={data_root}", *SMALL[:3],
                        f"output_dir={tmp_path}", "max_steps=1"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "processes: 1" in p.stdout and "warning: the launcher asked for several processes" in p.stderr

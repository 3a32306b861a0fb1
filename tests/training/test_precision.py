"""The paths real runs take, on the CPU: bf16 training of every stage (validation, EMA, flow-warp term
with a random-weight RAFT, each stage-2 latent source), stage-1 weights kept exact through stage 2,
frozen helpers kept in eval/fp32, the stage-1 clamp, and gradient checkpointing of the decoder modules."""

import json
from pathlib import Path

import pytest
import torch
from ci_switches import (
    SUITE_OVERRIDES,  # tests/ci_switches.py: the suite's one departure from the configs
)
from safetensors.torch import load_file

from sdatc.config import load_config
from sdatc.data.video import write_frames
from sdatc.errors import SdatcError
from sdatc.models.sites import pretrained_modules, sites
from sdatc.training.config import TrainConfig
from sdatc.training.latents import GeneratedLatents, generate, shard_name
from sdatc.training.precision import FrozenHelper, cast_frozen_backbone, keep_frozen_in_eval
from sdatc.training.trainer import train


@pytest.fixture(scope="module")
def val_root(tmp_path_factory, bunny_frames):
    root = tmp_path_factory.mktemp("bf16_val")
    write_frames(root / "bunnyval", bunny_frames[:5, 300:364, 700:764])
    return root


@pytest.fixture(scope="module")
def raft_file(tmp_path_factory):
    """torchvision RAFT-large with seeded random weights, saved as a local weights file."""
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raft") / "raft_random.pth"
    torch.save(raft_large(weights=None, progress=False).state_dict(), path)
    return path


# bf16 convolutions on a CPU without native bf16 (AVX2) take torch's slow generic path, ~7x fp32:
# these runs use 3-frame clips of 32x32 GT (one sample per step) to stay quick.
SMALL = ["data.num_workers=0", "data.gt_size=32", "data.num_frames=3", "batch_size=1", "val.gt_size=32",
         "val.num_frames=3"]


def cfg_for(stage, data_root, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, f"configs/train/tiny_stage{stage}.yaml",
                       [f"data.root={data_root}", f"output_dir={out}", *SMALL, *overrides])


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage1_run(data_root, val_root, tmp_path_factory, spy_optimizers):
    """Tiny stage 1 in bf16 with gradient checkpointing, validation and EMA: the run stage 2 starts from. The
    frozen-weight check runs on the device (no host copies of SD's weights: _fingerprint is not called)."""
    out = tmp_path_factory.mktemp("s1")

    def host_fingerprint(tensors):
        raise AssertionError("the frozen weights were copied to the host")

    with pytest.MonkeyPatch.context() as mp:
        spy = spy_optimizers(mp)
        mp.setattr("sdatc.training.trainer._fingerprint", host_fingerprint)
        summary = train(cfg_for(1, data_root, out, "mixed_precision=bf16", "max_steps=2", "checkpoint_every=2",
                                "ema=true", "gradient_checkpointing=true", "val.clip=bunnyval", f"val.root={val_root}",
                                "val.every=2"), progress=False)
    return out, summary, spy.param_dtypes()


def test_stage1_bf16_validation_ema(stage1_run):
    out, summary, optimised = stage1_run
    assert summary["precision"] == "bf16" and "bfloat16" in summary["weight_dtypes"]  # SD weights really cast
    assert optimised == {"float32"} and summary["frozen_weights_unchanged"] is True
    log = rows(out)
    assert all(r["precision"] == "bf16" for r in log if "eps_mse" in r)
    assert [r["step"] for r in log if "val_psnr_y" in r] == [2]  # validation ran under bf16 (it crashed before)
    assert (out / "config.yaml").read_text().startswith("# precision: bf16 autocast")
    assert (out / "checkpoint-2" / "ema" / "sdatc_modules.safetensors").is_file()


def test_fp16_on_cpu_is_a_clear_error(data_root, tmp_path):
    with pytest.raises(SdatcError, match="fp16 needs a GPU"):
        train(cfg_for(0, data_root, tmp_path, "mixed_precision=fp16", "max_steps=1"), progress=False)
    assert not list(tmp_path.glob("checkpoint-*"))


def test_stage0_bf16(data_root, val_root, tmp_path, monkeypatch, spy_optimizers):
    spy = spy_optimizers(monkeypatch)
    summary = train(cfg_for(0, data_root, tmp_path, "mixed_precision=bf16", "max_steps=2", "checkpoint_every=2",
                            "ema=true", "gradient_checkpointing=true", "val.clip=bunnyval", f"val.root={val_root}",
                            "val.every=2"), progress=False)
    assert summary["precision"] == "bf16" and summary["weight_dtypes"] == ["float32"]  # the DCM trains in fp32
    assert spy.param_dtypes() == {"float32"}
    assert [r["step"] for r in rows(tmp_path) if "val_psnr_y" in r] == [2]


class RaftSpy:
    """Wraps the stage-2 build's load_raft: keeps the RAFT it builds and records how it is called."""

    def __init__(self, monkeypatch):
        import sdatc.training.stages as stages

        self.raft, self.calls = None, []
        real = stages.load_raft

        def load(cfg, device):
            self.raft = real(cfg, device)
            self.buffers = {k: v.clone() for k, v in self.raft.named_buffers()}
            self.raft.register_forward_pre_hook(self.record)
            return self.raft

        monkeypatch.setattr(stages, "load_raft", load)

    def record(self, module, args):
        self.calls.append({"training": module.training, "autocast": torch.is_autocast_enabled("cpu"),
                           "dtype": args[0].dtype})


@pytest.mark.parametrize("source", ["generated", "gt_noise", "stage1_x0"])
def test_stage2_bf16_every_latent_source(source, stage1_run, data_root, val_root, raft_file, tmp_path, monkeypatch,
                                         spy_optimizers):
    """Stage 2 in bf16 from the stage-1 checkpoint: validation, EMA, flow-warp with RAFT, GAN; RAFT
    stays in eval mode, fp32, autocast off, its BatchNorm buffers untouched; every stage-1 tensor is
    bit-identical in every stage-2 checkpoint."""
    s1 = stage1_run[0] / "checkpoint-2"
    common = ["mixed_precision=bf16", f"init=[{s1}]", f"flow.raft_weights={raft_file}", "flow.raft_iters=2",
              f"latent_source={source}"]
    if source == "generated":
        lat = tmp_path / "latents"
        gen = cfg_for(2, data_root, tmp_path / "unused", *common, f"latents.dir={lat}")
        assert generate(gen, progress=False) == {"shards": 2, "written": 2, "skipped": 0, "held_by_others": 0}
        assert generate(gen, progress=False)["skipped"] == 2  # a rerun skips finished shards
        manifest = json.loads((lat / "manifest.json").read_text())
        assert manifest["steps"] == 2 and len(manifest["stage1"][0]["sha256"]) == 64
        common.append(f"latents.dir={lat}")
    spy = RaftSpy(monkeypatch)
    optimisers = spy_optimizers(monkeypatch)
    out = tmp_path / "run"
    summary = train(cfg_for(2, data_root, out, *common, "max_steps=3", "checkpoint_every=2", "ema=true",
                            "gradient_checkpointing=true", "val.clip=bunnyval", f"val.root={val_root}", "val.every=3"),
                    progress=False)
    assert summary["precision"] == "bf16"
    assert len(optimisers.made) == 2 and optimisers.param_dtypes() == {"float32"}  # decoder modules, discriminator
    log = rows(out)
    assert {"l1", "frame_diff", "flow_warp", "gan", "disc"} <= set(log[-2])  # log[-1] is the validation line
    assert [r["step"] for r in log if "val_psnr_y" in r] == [3]
    # RAFT: called, always eval, fp32 inputs, autocast off; BatchNorm running stats unchanged
    assert spy.calls and all(not c["training"] and not c["autocast"] and c["dtype"] == torch.float32 for c in spy.calls)
    assert all(torch.equal(spy.buffers[k], v) for k, v in spy.raft.named_buffers())
    # stage-1 modules: bit-identical to the stage-1 checkpoint in every stage-2 checkpoint (and its EMA copy)
    ref = load_file(str(s1 / "sdatc_modules.safetensors"))
    stage1 = [k for k in ref if k.split(".")[0] in ("dcm", "guidance", "unet")]  # unet.up_blocks.*.mid.capm.*
    assert any(k.startswith("unet.") for k in stage1)
    for ck in ("checkpoint-2", "checkpoint-3", "checkpoint-3/ema"):
        saved = load_file(str(out / ck / "sdatc_modules.safetensors"))
        assert all(torch.equal(saved[k], ref[k]) for k in stage1), ck
        assert any(not torch.equal(saved[k], ref[k]) for k in saved if ".mid.cfw." in k), ck  # stage 2 trained


def test_generated_latents_refuse_other_settings(stage1_run, data_root, tmp_path):
    s1 = stage1_run[0] / "checkpoint-2"
    lat = tmp_path / "lat"
    cfg = cfg_for(2, data_root, tmp_path / "o", f"init=[{s1}]", f"latents.dir={lat}", "latents.num_samples=2",
                  "latents.shard_size=1", "latent_source=generated", "mixed_precision=bf16")
    generate(cfg, progress=False)
    ds = GeneratedLatents(lat)
    item = ds[0]
    assert item["z"].shape == (3, 4, 4, 4) and item["gt"].shape == (3, 3, 32, 32) and item["lq"].shape == (3, 3, 8, 8)
    with pytest.raises(SdatcError, match="other settings"):
        generate(cfg_for(2, data_root, tmp_path / "o", f"init=[{s1}]", f"latents.dir={lat}", "latents.num_samples=2",
                         "latents.shard_size=1", "latents.steps=3"), progress=False)
    (lat / shard_name(1)).unlink()
    with pytest.raises(SdatcError, match="incomplete"):
        GeneratedLatents(lat)
    with pytest.raises(SdatcError, match="needs latents.dir"):
        train(cfg_for(2, data_root, tmp_path / "o2", "latent_source=generated"), progress=False)


def test_cast_frozen_backbone_keeps_new_modules_and_fp16_decoder(tiny_model):
    cast_frozen_backbone(tiny_model, torch.float16)
    assert next(tiny_model.unet.parameters()).dtype == torch.float16
    assert next(tiny_model.vae.encoder.parameters()).dtype == torch.float16
    assert {p.dtype for p in tiny_model.vae.decoder.parameters()} == {torch.float32}  # SD's VAE overflows in fp16
    assert all(p.dtype == torch.float32 for m in tiny_model.new_modules().values() for p in m.parameters())


def test_frozen_helper_and_eval_modes(tiny_model):
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    helper = FrozenHelper(bn)
    root = torch.nn.ModuleDict({"helper": helper, "sd": tiny_model})
    root.train()
    keep_frozen_in_eval(root)
    assert not helper.training and not bn[1].training
    sd = pretrained_modules(tiny_model.unet) + pretrained_modules(tiny_model.vae)
    frozen = [m for m in sd if not any(p.requires_grad for p in m.parameters())]  # all but Sites' containers
    assert len(frozen) > 0.8 * len(sd) and not any(m.training for m in frozen)
    assert any(isinstance(m, torch.nn.Dropout) for m in frozen)
    assert all(m.training for m in tiny_model.cfw.values()) and tiny_model.dcm.training  # trainable: train mode
    x = torch.rand(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert helper(x).dtype == torch.float32


def test_stage1_encodes_the_clamped_dcm_output(tiny_model, monkeypatch):
    """Inference clamps the DCM output before the VAE encoder; stage 1 does the same (straight-through)."""
    from sdatc.training.stages import LatentStage

    cfg = load_config(TrainConfig, "configs/train/tiny_stage1.yaml")
    stage = LatentStage(tiny_model, cfg).train()
    seen = []
    real_encode = tiny_model.encode
    monkeypatch.setattr(tiny_model, "encode", lambda x: (seen.append(x), real_encode(x))[1])
    with torch.no_grad():
        for p in tiny_model.dcm.parameters():  # an output far outside [0, 1]
            p.mul_(50)
    lq, gt = torch.rand(1, 2, 3, 16, 16), torch.rand(1, 2, 3, 64, 64)
    losses, i_c = stage(lq, gt)
    assert i_c.min() < 0 or i_c.max() > 1
    assert seen[0].min() >= 0 and seen[0].max() <= 1  # the DCM output as encoded
    (grad,) = torch.autograd.grad(seen[0].sum(), i_c)
    assert torch.equal(grad, torch.ones_like(i_c))  # straight through, also where the clamp acts


def test_discriminator_g_pass_never_sees_a_fake_only_batch(tiny_model):
    from sdatc.training.losses import PatchDiscriminator
    from sdatc.training.stages import PixelStage

    config = "configs/train/tiny_stage2.yaml"
    cfg = load_config(TrainConfig, config, [*SUITE_OVERRIDES[config], "loss.lpips=0", "loss.flow_warp=0"])
    disc = PatchDiscriminator()
    sizes = []
    for m in disc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    stage = PixelStage(tiny_model, cfg, None, None, disc).train()
    lq, gt = torch.rand(1, 2, 3, 16, 16), torch.rand(1, 2, 3, 64, 64)
    losses, y = stage(lq, gt, step=cfg.loss.gan_start_step)
    assert "gan" in losses and sizes and set(sizes) == {4}  # 2 real + 2 fake frames in every BatchNorm call


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs (activation memory)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_checkpointing_cfw_and_capm_saves_memory_same_gradients(tiny_model):
    """A stage-2 step (decode at w = 1 with STAM, CFW, CAPM): less activation memory held for
    backward with checkpointing, identical gradients."""
    tiny_model.train()
    keep_frozen_in_eval(tiny_model)
    torch.manual_seed(0)
    z = torch.randn(4, 4, 16, 16)
    with torch.no_grad():
        _, feats = tiny_model.encode(torch.rand(4, 3, 128, 128))
    params = [p for n in ("cfw", "stam", "capm_vae") for p in getattr(tiny_model, n).parameters()]
    with torch.no_grad():  # leave the zero init, so every module's gradient is non-trivial
        for p in params:
            p.add_(0.01 * torch.randn_like(p))

    def step():
        return tiny_model.decode(z, feats, num_frames=2, w=1.0).square().mean()

    results = []
    for ckpt in (False, True):
        for _, site in sites(tiny_model.vae):  # what enable_gradient_checkpointing() switches in the decoder
            site.gradient_checkpointing = ckpt
        nbytes, loss = _saved_bytes(step)
        grads = torch.autograd.grad(loss, params)
        results.append((nbytes, grads))
    (plain, g0), (ckpt, g1) = results
    assert ckpt < 0.5 * plain, (ckpt, plain)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g0, g1))
    assert all(g.abs().sum() > 0 for g in g0[:1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_targets_follow_the_prediction_type(prediction_type, tiny_model, monkeypatch):
    """An oracle UNet that outputs the exact epsilon / v of the clean GT latent scores a zero stage-1
    loss and gives back z_gt as stage 2's stage1_x0 proxy, only when the model's type is honoured."""
    from diffusers import DDPMScheduler

    from sdatc.training.stages import LatentStage, PixelStage

    m = tiny_model.eval()
    m.scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type=prediction_type, clip_sample=False)
    m.prediction_type = prediction_type
    lq, gt = torch.rand(1, 2, 3, 16, 16), torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        z_gt, _ = m.encode(gt.flatten(0, 1))

    def oracle(kind):
        def predict(z_t, t, z_c):
            a = m.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
            eps = (z_t - a.sqrt() * z_gt) / (1 - a).sqrt()
            return eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z_gt
        return predict

    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    s1 = LatentStage(m, load_config(TrainConfig, "configs/train/tiny_stage1.yaml"))
    cfg2 = load_config(TrainConfig, "configs/train/tiny_stage2.yaml", ["latent_source=stage1_x0", "proxy_t=[100,900]"])
    s2 = PixelStage(m, cfg2)
    for kind, right in ((prediction_type, True), (other, False)):
        monkeypatch.setattr(m, "predict", oracle(kind))
        torch.manual_seed(0)
        with torch.no_grad():
            loss = s1(lq, gt)[0]["eps_mse"]
            x0, _ = s2.latents(lq.flatten(0, 1), gt.flatten(0, 1))
        err = (x0 - z_gt).abs().max()
        if right:
            assert loss < 1e-6 and err < 1e-3, (loss, err)
        else:
            assert loss > 1e-2 and err > 1e-2, (loss, err)


def test_fp16_runs_decode_in_fp32(tiny_model):
    """fp16 runs keep the VAE decoder fp32: PixelStage decodes with autocast off (checked under CPU bf16
    autocast, the only low-precision autocast a CPU has)."""
    from sdatc.training.stages import PixelStage

    cfg = load_config(TrainConfig, "configs/train/tiny_stage2.yaml")
    z, feats = torch.randn(2, 4, 8, 8), None
    with torch.no_grad():
        _, feats = tiny_model.encode(torch.rand(2, 3, 64, 64))
    seen = []
    tiny_model.vae.decoder.conv_out.register_forward_hook(lambda mod, a, y: seen.append(y.dtype))
    for fp32 in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            PixelStage(tiny_model, cfg, decode_fp32=fp32).decode(z, feats, num_frames=2)
    assert seen == [torch.bfloat16, torch.float32]

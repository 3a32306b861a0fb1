"""prediction_type (epsilon, v_prediction) as the SD folder's scheduler config says: the formulas against
diffusers, a tiny v-prediction SD folder through inference against an independent DDPM chain, SDATC.reconstruct's
one-step x0, and a one-line error for a type sdatc does not run."""

import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from sdatc.config import ConfigError, apply_overrides, load_config
from sdatc.data.video import read_video
from sdatc.errors import SdatcError
from sdatc.inference import InferConfig, run
from sdatc.models.backbone import EMPTY_PROMPT_FILE, BackboneConfig, load_backbone, split_prediction, training_target
from sdatc.models.sdatc import SDATC
from sdatc.pipelines.colour import colour_correct
from sdatc.pipelines.sampler import frame_noise

# stabilityai/stable-diffusion-2-1 (768, v-prediction): scheduler/scheduler_config.json as published
SD21_768_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}


def _alphas_cumprod() -> torch.Tensor:
    """SD 2.1's alpha-bar (scaled_linear 0.00085 .. 0.012, 1000 steps) in float64, computed here."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         prediction_type=prediction_type)


def _write_sd_folder(root, backbone: BackboneConfig, scheduler: dict):
    """A diffusers SD folder with the tiny architecture, random weights, the given scheduler config and
    the cached empty-prompt embedding (so no text encoder or tokenizer is needed)."""
    torch.manual_seed(3)
    UNet2DConditionModel(**backbone.unet).save_pretrained(root / "unet")
    AutoencoderKL(**backbone.vae).save_pretrained(root / "vae")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    dim = backbone.unet["cross_attention_dim"]
    save_file({"embeds": torch.randn(1, 77, dim), "text_encoder_params": torch.tensor([1234])},
              str(root / EMPTY_PROMPT_FILE))
    return root


def _perturb_new_modules(model, scale=0.05):
    """Move the new modules off their (partly zero) init, so every path reaches the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory, tiny_model_config):
    return _write_sd_folder(tmp_path_factory.mktemp("sd21v"), tiny_model_config.backbone, SD21_768_SCHEDULER)


@pytest.fixture(scope="module")
def v_model(v_folder, tiny_model_config):
    cfg = apply_overrides(tiny_model_config, [f"backbone.pretrained={v_folder}"])
    torch.manual_seed(0)
    model = SDATC.from_config(cfg).eval()
    _perturb_new_modules(model)
    return model


# ---------------------------------------------------------------------------- (a) the formulas


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_split_and_target_round_trip_against_diffusers(prediction_type):
    s = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    z0, noise, out = (torch.randn(4, 4, 6, 6, generator=g) for _ in range(3))
    t = torch.tensor([0, 10, 500, 999])
    z_t = s.add_noise(z0, noise, t)
    a = s.alphas_cumprod[t]  # (N,)
    target = training_target(z0, noise, a, prediction_type)
    assert torch.allclose(target, noise if prediction_type == "epsilon" else s.get_velocity(z0, noise, t), atol=1e-6)
    x0, eps = split_prediction(target, z_t, a, prediction_type)  # the perfect output gives back z0 and noise
    assert torch.allclose(x0, z0, atol=1e-4) and torch.allclose(eps, noise, atol=1e-4)
    # any output: x0 is diffusers' pred_original_sample; a scalar alpha-bar is the same as one per row
    s.set_timesteps(timesteps=[999, 500, 10, 0])
    for j in range(4):
        ref = s.step(out[j:j + 1], int(t[j]), z_t[j:j + 1]).pred_original_sample
        x0_j, _ = split_prediction(out[j:j + 1], z_t[j:j + 1], float(a[j]), prediction_type)
        assert torch.allclose(x0_j, ref, atol=1e-4, rtol=1e-5), int(t[j])


def test_split_and_target_reject_other_types():
    z = torch.zeros(1, 4, 2, 2)
    with pytest.raises(SdatcError, match="unknown prediction_type 'sample'"):
        split_prediction(z, z, 0.5, "sample")
    with pytest.raises(SdatcError, match="unknown prediction_type 'sample'"):
        training_target(z, z, 0.5, "sample")


# ---------------------------------------------------------------------------- the backbone reads the folder


def test_folder_decides_and_config_overrides(v_folder, v_model, tiny_model, tiny_model_config, capsys):
    assert v_model.prediction_type == "v_prediction" and v_model.scheduler.config.prediction_type == "v_prediction"
    assert torch.allclose(v_model.scheduler.alphas_cumprod.double(), _alphas_cumprod(), rtol=1e-5)
    assert tiny_model.prediction_type == "epsilon"  # random weights: SD 2.1-base's schedule
    assert capsys.readouterr().out == ""  # nothing overridden, nothing said
    cfg = apply_overrides(tiny_model_config,
                          [f"backbone.pretrained={v_folder}", "backbone.scheduler.prediction_type=epsilon"])
    assert load_backbone(cfg.backbone).scheduler.config.prediction_type == "epsilon"
    note = capsys.readouterr().out
    assert note.count("\n") == 1 and note.startswith("note: backbone.scheduler overrides ")
    assert str(v_folder) in note and "prediction_type=epsilon (folder: v_prediction)" in note
    with pytest.raises(ConfigError, match="prediction_type must be one of"):
        apply_overrides(tiny_model_config, ["backbone.scheduler.prediction_type=sample"])


# ---------------------------------------------------------------------------- (c) a type sdatc does not run


def test_unsupported_prediction_type_is_one_line_error(tmp_path, tiny_model_config):
    """The scheduler is read first: the error comes before (here: instead of) loading any weights."""
    root = tmp_path / "sd"
    for sub in ("unet", "vae"):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text("{}")  # not loadable: never reached
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SD21_768_SCHEDULER, "prediction_type": "sample"}))
    cfg = apply_overrides(tiny_model_config, [f"backbone.pretrained={root}"])
    with pytest.raises(SdatcError) as e:
        load_backbone(cfg.backbone)
    msg = str(e.value)
    assert "\n" not in msg and re.search(rf"prediction_type 'sample' from {re.escape(str(root))}"
                                         r"\S*scheduler_config.json is not supported "
                                         r"\(sdatc runs epsilon and v_prediction\)", msg), msg


# ---------------------------------------------------------------------------- (d) SDATC.reconstruct, one step


def test_reconstruct_v_prediction_is_the_one_step_x0(v_model):
    g = torch.Generator().manual_seed(4)
    lq, noise = torch.rand(2, 3, 16, 16, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 700])
    m = v_model
    with torch.no_grad():
        ours = m.reconstruct(lq, 2, t=t, noise=noise, w=1.0)
        z_c, feats = m.encode(m.upscale(lq))
        a = _alphas_cumprod()[t].view(-1, 1, 1, 1)
        z_t = (a.sqrt() * z_c + (1 - a).sqrt() * noise).float()
        v = m.predict(z_t, t, z_c).double()
        x0 = a.sqrt() * z_t - (1 - a).sqrt() * v  # v-prediction
        x0_eps = (z_t - (1 - a).sqrt() * v) / a.sqrt()  # what reading v as epsilon would give
        ref, wrong = (((m.decode(x.float(), feats, 2, 1.0) + 1) / 2).clamp(0, 1) for x in (x0, x0_eps))
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()
    assert (ours - wrong).abs().mean() > 1e-2


# ---------------------------------------------------------------------------- (b) inference end to end


def _infer(clip, out, folder, ckpt, overrides=()):
    cfg = load_config(InferConfig, "configs/infer/tiny.yaml", [
        f"input={clip}", f"output={out}", f"pretrained={folder}", f"checkpoint={ckpt}", "allow_random_weights=false",
        "pipeline.flow.enabled=false", "pipeline.sampler.steps=3", "pipeline.window.length=5",
        "pipeline.window.stride=5", "pipeline.tiling.mode=off", "save_frames=true", "copy_audio=false", *overrides])
    rows = run(cfg, progress=False)
    assert [r["status"] for r in rows] == ["done"], rows
    return cfg, read_video(out / clip.stem)  # (T, 4h, 4w, 3) uint8, from the lossless PNGs


def _reference_chain(model, lq_frames: np.ndarray, seed: int, w: float, colour: str) -> np.ndarray:
    """An independent respaced v-prediction DDPM: timesteps 999, 500, 0 (round(k * 999 / 2)), float64
    coefficients, the pipeline's per-frame seeded noise; the model's modules called directly."""
    lq = torch.from_numpy(lq_frames).permute(0, 3, 1, 2).float() / 255  # (T, 3, h, w), sizes multiples of 4
    acp = _alphas_cumprod()
    ts = [999, 500, 0]
    n = lq.shape[0]
    with torch.no_grad():
        z_c, feats = model.encode(model.upscale(lq).clamp(0, 1))  # (T, 4, 4h/8, 4w/8)

        def noise(step):
            return torch.stack([frame_noise(seed, i, step, tuple(z_c.shape[1:])) for i in range(n)]).double()

        a = float(acp[ts[0]])
        z = math.sqrt(a) * z_c.double() + math.sqrt(1 - a) * noise(-1)  # q_sample(z_c, 999)
        for k, t in enumerate(ts):
            a, a_prev = float(acp[t]), float(acp[ts[k + 1]]) if k + 1 < len(ts) else 1.0
            v = model.predict(z.float(), torch.full((n,), t), z_c).double()
            x0 = math.sqrt(a) * z - math.sqrt(1 - a) * v
            beta = 1 - a / a_prev  # of the respaced chain
            mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(a / a_prev) * (1 - a_prev) / (1 - a) * z
            z = mean + math.sqrt(beta * (1 - a_prev) / (1 - a)) * noise(k) if k + 1 < len(ts) else mean
        y = (model.decode(z.float(), feats, num_frames=n, w=w) + 1) / 2  # unclamped: fix, then clamp (StableSR)
        y = colour_correct(y, lq, colour).clamp(0, 1)
    return (y * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def test_infer_v_prediction_folder_matches_independent_chain(v_folder, v_model, lq_small_clip, tmp_path, capsys):
    """Float32 (pipeline) vs float64 (here) arithmetic: the frames agree to one uint8 level where a value
    sits on a rounding boundary, exactly elsewhere; reading the folder as epsilon is far off."""
    ckpt = v_model.save_pretrained(tmp_path / "ckpt")
    cfg, ours = _infer(lq_small_clip, tmp_path / "v", v_folder, ckpt)
    assert "note:" not in capsys.readouterr().out
    p = cfg.pipeline
    ref = _reference_chain(v_model, read_video(lq_small_clip), p.sampler.seed, p.cfw_weight, p.colour)
    assert ours.shape == ref.shape == (5, 144, 256, 3)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    # the same folder read as epsilon (a config override, with its note) gives another picture
    _, as_eps = _infer(lq_small_clip, tmp_path / "eps", v_folder, ckpt,
                       ["model_overrides=[backbone.scheduler.prediction_type=epsilon]"])
    assert "prediction_type=epsilon (folder: v_prediction)" in capsys.readouterr().out
    assert np.abs(as_eps.astype(int) - ref.astype(int)).mean() > 5

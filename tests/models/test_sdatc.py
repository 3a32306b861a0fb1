"""The composed SDATC model: plain SD 2.1 at init, freeze policy, save/load, shapes, budget, bad input."""

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdatc.config import ConfigError, apply_overrides, load_config
from sdatc.errors import SdatcError
from sdatc.models.backbone import EMPTY_PROMPT_FILE, BackboneConfig, load_backbone
from sdatc.models.sdatc import SDATC, ModelConfig
from sdatc.models.sites import pretrained_modules, pretrained_state_dict


def _plain_unet(model):
    unet = UNet2DConditionModel(**model.cfg.backbone.unet)
    unet.load_state_dict(pretrained_state_dict(model.unet))  # strict: exactly SD's keys
    return unet.eval()


def _perturb_new_modules(model, scale=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_unet_path_equals_plain_sd_at_init(tiny_model):
    torch.manual_seed(0)
    z_t, z_c = torch.randn(3, 4, 8, 12), torch.randn(3, 4, 8, 12)
    t = torch.tensor([10, 500, 999])
    with torch.no_grad():
        ours = tiny_model.predict(z_t, t, z_c)
        text = tiny_model.empty_prompt_embeds.expand(3, -1, -1)
        ref = _plain_unet(tiny_model)(z_t, t, encoder_hidden_states=text).sample
        # our UNet path against diffusers' own forward: the same math in other kernels / order (fp32 rounding)
        assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()
        _perturb_new_modules(tiny_model)  # the check can fail: perturbed modules change the output
        assert not torch.allclose(tiny_model.predict(z_t, t, z_c), ref, atol=1e-4)


def test_vae_path_equals_plain_autoencoder_at_init(tiny_model):
    torch.manual_seed(0)
    img = torch.rand(6, 3, 32, 48)  # B=2 windows of T=3 frames
    vae = AutoencoderKL(**tiny_model.cfg.backbone.vae)
    vae.load_state_dict(pretrained_state_dict(tiny_model.vae))
    with torch.no_grad():
        z, feats = tiny_model.encode(img)
        # against diffusers' AutoencoderKL: the same math in another call order (fp32 rounding)
        assert torch.allclose(z, vae.encode(img * 2 - 1).latent_dist.mode() * 0.18215, atol=1e-5)
        assert sorted(feats) == [1, 2] and feats[1].shape == (6, 32, 16, 24) and feats[2].shape == (6, 32, 8, 12)
        ours = tiny_model.decode(z, feats, num_frames=3, w=0.75)
        ref = vae.decode(z / 0.18215).sample
        # float tolerance: CAPM/CFW outputs can change a tensor's memory layout, hence conv kernels
        assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()
        _perturb_new_modules(tiny_model)
        assert not torch.allclose(tiny_model.decode(z, feats, num_frames=3), ref, atol=1e-4)


def test_freeze_policy_only_new_modules_train(tiny_model):
    torch.manual_seed(0)
    def sd_weights():
        return {**pretrained_state_dict(tiny_model.unet),
                **{"vae." + k: v for k, v in pretrained_state_dict(tiny_model.vae).items()}}

    frozen = {k: v.clone() for k, v in sd_weights().items()}
    before = {n: copy.deepcopy(m.state_dict()) for n, m in tiny_model.new_modules().items()}
    assert set(before) == {"dcm", "guidance", "capm_unet", "capm_vae", "stam", "cfw"}
    sd_modules = pretrained_modules(tiny_model.unet) + pretrained_modules(tiny_model.vae)
    assert all(not p.requires_grad for m in sd_modules for p in m.parameters(recurse=False))
    assert ({id(p) for p in tiny_model.parameters() if p.requires_grad}
            == {id(p) for p in tiny_model.trainable_parameters()})
    opt = torch.optim.Adam(tiny_model.trainable_parameters(), lr=1e-3)
    lq, gt = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 64, 64)
    for _ in range(2):  # the second step reaches the modules behind the zero-initialised outputs
        opt.zero_grad()
        loss = (tiny_model.reconstruct(lq, num_frames=3, t=torch.tensor([300, 500, 700])) - gt).abs().mean()
        loss = loss + (tiny_model.upscale(lq) - gt).abs().mean()
        loss.backward()
        opt.step()
    after = sd_weights()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), "a pretrained weight changed"
    for name, m in tiny_model.new_modules().items():
        changed = [k for k, v in m.state_dict().items() if not torch.equal(v, before[name][k])]
        assert changed, f"{name} did not change"
    report = tiny_model.parameter_report()
    assert report["trainable"] == sum(p.numel() for p in tiny_model.trainable_parameters())
    assert report["modules"]["unet"]["trainable"] == 0 and report["modules"]["vae"]["trainable"] == 0


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_shapes_odd_lr_sizes(tiny_model, frames):
    lq = torch.rand(frames, 3, 45, 80)
    with torch.no_grad():
        out = tiny_model.reconstruct(lq, num_frames=frames, t=500)
    assert out.shape == (frames, 3, 180, 320) and 0 <= out.min() and out.max() <= 1
    assert tiny_model.upscale(lq).shape == (frames, 3, 180, 320)


def test_trainable_save_load_round_trip(tiny_model, tiny_model_config, tmp_path):
    _perturb_new_modules(tiny_model)
    tiny_model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checksums.json", "config.yaml",
                                                                        "sdatc_modules.safetensors"]
    loaded = SDATC.from_pretrained(tmp_path / "ckpt")
    a, b = tiny_model.trainable_state_dict(), loaded.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lq = torch.rand(2, 3, 16, 16)
    noise = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(tiny_model.reconstruct(lq, 2, t=400, noise=noise),
                           loaded.reconstruct(lq, 2, t=400, noise=noise))
    # a checkpoint from another configuration is refused, naming keys
    other = SDATC.from_config(apply_overrides(tiny_model_config, ["enabled.capm_vae=false"]))
    with pytest.raises(SdatcError, match=r"1?\d* unexpected \(e\.g\. vae\.decoder\.up_blocks\.0\.mid\.capm\."):
        other.load_trainable_state_dict(a)
    del a["vae.decoder.mid_block.resnets.0.post.stam.a"]
    with pytest.raises(SdatcError, match=r"missing \(e\.g\. vae\.decoder\.mid_block\.resnets\.0\.post\.stam\.a"):
        tiny_model.load_trainable_state_dict(a)


def _write_tiny_sd_folder(cfg: BackboneConfig, root, with_text=True):
    torch.manual_seed(3)
    unet, vae = UNet2DConditionModel(**cfg.unet), AutoencoderKL(**cfg.vae)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    if with_text:
        CLIPTextModel(CLIPTextConfig(**{**cfg.text_encoder, "vocab_size": 8, "bos_token_id": 0, "eos_token_id": 1,
                                        "pad_token_id": 2})).save_pretrained(root / "text_encoder")
        (root / "tok").mkdir()
        (root / "tok" / "vocab.json").write_text(
            json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3}))
        (root / "tok" / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt"),
                      pad_token="!").save_pretrained(root / "tokenizer")
    return unet, vae


def test_load_local_sd_folder_and_cache_empty_prompt(tiny_model_config, tmp_path, monkeypatch):
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    unet, vae = _write_tiny_sd_folder(tiny_model_config.backbone, tmp_path / "sd")
    bb = load_backbone(dataclasses.replace(tiny_model_config.backbone, pretrained=str(tmp_path / "sd")))
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in bb.unet.state_dict().items())
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in bb.vae.state_dict().items())
    assert bb.empty_prompt_embeds.shape == (1, 77, 32) and (tmp_path / "sd" / EMPTY_PROMPT_FILE).is_file()
    # the cache alone suffices (no text encoder needed at inference), and gives the same embedding
    import shutil

    shutil.rmtree(tmp_path / "sd" / "text_encoder")
    monkeypatch.setenv("SDATC_SD21_PATH", str(tmp_path / "sd"))
    bb2 = load_backbone(dataclasses.replace(tiny_model_config.backbone, pretrained=None))
    assert torch.equal(bb2.empty_prompt_embeds, bb.empty_prompt_embeds) and bb2.source == str(tmp_path / "sd")
    assert bb2.text_encoder_params == bb.text_encoder_params > 0


def test_missing_or_incomplete_sd_folder(tiny_model_config, tmp_path):
    with pytest.raises(SdatcError, match="SD 2.1 folder not found.*stable-diffusion-2-1-base"):
        load_backbone(dataclasses.replace(tiny_model_config.backbone, pretrained=str(tmp_path / "nope")))
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(SdatcError, match=r"missing unet/, vae/, scheduler/.*"
                                         r"expected unet/, vae/, text_encoder/, tokenizer/, scheduler/"):
        load_backbone(dataclasses.replace(tiny_model_config.backbone, pretrained=str(tmp_path / "sd")))
    _write_tiny_sd_folder(tiny_model_config.backbone, tmp_path / "sd2", with_text=False)
    with pytest.raises(SdatcError, match="no cached empty-prompt embedding"):
        load_backbone(dataclasses.replace(tiny_model_config.backbone, pretrained=str(tmp_path / "sd2")))


def test_bad_config_values(tiny_model_config, tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="unknown key 'enabled.flow'"):
        apply_overrides(tiny_model_config, ["enabled.flow=true"])
    with pytest.raises(ConfigError, match="unknown key 'cfw_weight'"):  # an inference setting: pipeline.cfw_weight
        apply_overrides(tiny_model_config, ["cfw_weight=0.5"])
    z = torch.randn(4, 4, 4, 4)
    with pytest.raises(SdatcError, match="windows of 0"):
        tiny_model.decode(z, num_frames=0)
    with pytest.raises(SdatcError, match="windows of 3"):
        tiny_model.decode(z, num_frames=3)
    with pytest.raises(SdatcError, match=r"w must be in \[0, 1\]"):
        tiny_model.decode(z, num_frames=2, w=1.2)


def test_ablation_switches(tiny_model_config):
    switches = ("dcm", "guidance", "capm_unet", "capm_vae", "stam", "cfw")
    cfg = apply_overrides(tiny_model_config, [f"enabled.{m}=false" for m in switches])
    model = SDATC.from_config(cfg)
    assert model.new_modules() == {} and model.parameter_report()["trainable"] == 0
    with torch.no_grad():
        assert model.reconstruct(torch.rand(2, 3, 12, 20), num_frames=2).shape == (2, 3, 48, 80)


def test_full_size_parameter_budget():
    """SD 2.1 sizes, built on the meta device (no memory): trainable 135.1 M +- 3 %, total 1.3-1.6 B."""
    cfg = load_config(ModelConfig, "configs/model/sdatc_sd21.yaml")
    with torch.device("meta"):
        report = SDATC.from_config(cfg).parameter_report()
    m = {k: v["total"] / 1e6 for k, v in report["modules"].items()}
    assert abs(report["trainable"] / 1e6 - 135.1) <= 0.03 * 135.1, m
    assert 1300 <= report["total"] / 1e6 <= 1600, report["total"]
    assert abs(m["dcm"] - 11.90) < 0.05 and abs(m["stam"] - 14.58) < 0.3 and abs(m["cfw"] - 25.07) < 0.8
    assert abs(m["unet"] - 865.9) < 1 and abs(m["vae"] - 83.65) < 0.1


@pytest.mark.slow
def test_full_size_forward_smoke(monkeypatch):
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    cfg = load_config(ModelConfig, "configs/model/sdatc_sd21.yaml")
    model = SDATC.from_config(cfg)
    with torch.no_grad():
        out = model.reconstruct(torch.rand(2, 3, 16, 16), num_frames=2, t=500)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_sd21_yaml_is_the_code_default():
    """configs/model/sdatc_sd21.yaml spells out the defaults: the two cannot drift apart."""
    assert load_config(ModelConfig, "configs/model/sdatc_sd21.yaml") == ModelConfig()


def test_inspect_model_script_json(run_script):
    p = run_script("inspect_model.py", "--config", "configs/model/sdatc_tiny.yaml", "--json", "--height", "64",
                   "--width", "96")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    names = {"dcm", "guidance", "zero_convs", "capm_unet", "capm_vae", "stam", "cfw", "unet", "vae", "text_encoder"}
    assert names == set(report["modules"]) and report["trainable"] > 0 and report["total"] > report["trainable"]
    assert report["trainable"] == sum(v["trainable"] for v in report["modules"].values())
    f = report["flops"]
    assert f["frame"] == [64, 96] and min(f["dcm"], f["vae_encode"], f["denoise_step"], f["vae_decode"]) > 0
    assert f["per_frame_50_steps"] == f["dcm"] + f["vae_encode"] + 50 * f["denoise_step"] + f["vae_decode"]

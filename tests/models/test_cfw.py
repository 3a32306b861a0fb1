"""CFW: identity at init, linearity in w, gradients, argument checks, full-size budget."""

import pytest
import torch

from sdatc.models.cfw import CFW, CFWConfig

C = 32


def tiny_cfw(seed: int = 0, channels: int = C, **kw) -> CFW:
    torch.manual_seed(seed)
    return CFW(channels, CFWConfig(growth=8, **kw))


def perturb_zero_conv(cfw: CFW) -> None:
    with torch.no_grad():
        cfw.zero_out.weight.normal_(0, 0.1)
        cfw.zero_out.bias.normal_(0, 0.1)


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0])
def test_identity_at_init(w):
    cfw = tiny_cfw()
    dec, enc = torch.randn(2, C, 6, 5), torch.randn(2, C, 6, 5)
    assert torch.equal(cfw(dec, enc, w=w), dec)


def test_linear_in_w_once_perturbed():
    cfw = tiny_cfw(channels=64)
    perturb_zero_conv(cfw)
    dec, enc = torch.randn(1, 64, 5, 7), torch.randn(1, 64, 5, 7)
    full = cfw(dec, enc, w=1.0)
    assert not torch.allclose(full, dec)
    assert torch.equal(cfw(dec, enc, w=0.0), dec)
    for w in (0.25, 0.6):
        torch.testing.assert_close(cfw(dec, enc, w=w), dec + w * (full - dec))


def test_uses_the_encoder_feature():
    cfw = tiny_cfw()
    perturb_zero_conv(cfw)
    dec = torch.randn(1, C, 4, 4)
    assert not torch.allclose(cfw(dec, torch.randn(1, C, 4, 4)), cfw(dec, torch.randn(1, C, 4, 4)))


def test_gradients_reach_every_parameter():
    cfw = tiny_cfw()
    dec, enc = torch.randn(2, C, 4, 4), torch.randn(2, C, 4, 4)
    target = torch.randn_like(dec)
    (cfw(dec, enc) - target).square().mean().backward()
    assert cfw.zero_out.weight.grad.abs().sum() > 0

    perturb_zero_conv(cfw)
    cfw.zero_grad(set_to_none=True)
    (cfw(dec, enc, w=0.7) - target).square().mean().backward()
    for name, p in cfw.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_small_widths_use_fewer_groups():
    cfw = CFW(16, CFWConfig(growth=4))
    assert cfw.res_in.norm1.num_groups == 16
    perturb_zero_conv(cfw)
    assert cfw(torch.randn(1, 16, 3, 3), torch.randn(1, 16, 3, 3), w=0.5).shape == (1, 16, 3, 3)


def test_bad_arguments():
    cfw = tiny_cfw()
    dec = torch.randn(1, C, 4, 4)
    for w in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="w must be"):
            cfw(dec, dec, w=w)
    with pytest.raises(ValueError, match="same shape"):
        cfw(dec, torch.randn(1, C, 4, 5))
    with pytest.raises(ValueError, match="groups"):
        CFW(48, CFWConfig(groups=32))
    with pytest.raises(ValueError, match="num_rdb"):
        CFWConfig(num_rdb=-1)


def test_full_size_budget():
    total = sum(p.numel() for c in (512, 256) for p in CFW(c, CFWConfig()).parameters())
    assert total == pytest.approx(25.07e6, rel=0.03)


# --------------------------------------------------------------------------- the one knob: pipeline.cfw_weight


def test_old_model_config_with_cfw_weight_loads_with_a_note(tmp_path, capsys, tiny_model):
    """Checkpoints written before the knob moved carry ``cfw_weight: 0.75`` in their model config."""
    from sdatc.config import REPO_ROOT, ConfigError, apply_overrides, load_config
    from sdatc.models.sdatc import SDATC, ModelConfig

    text = (REPO_ROOT / "configs" / "model" / "sdatc_tiny.yaml").read_text()
    assert "cfw_weight" not in text
    old = tmp_path / "old.yaml"
    old.write_text(text + "cfw_weight: 0.75\n")
    capsys.readouterr()
    cfg = load_config(ModelConfig, old)
    note = capsys.readouterr().out
    assert note.count("\n") == 1 and note.startswith("note: ") and "ignoring cfw_weight: 0.75" in note
    assert "pipeline.cfw_weight" in note
    assert cfg == load_config(ModelConfig, REPO_ROOT / "configs" / "model" / "sdatc_tiny.yaml")
    assert not hasattr(cfg, "cfw_weight")
    with pytest.raises(ConfigError, match=r"cfw_weight is gone .*pipeline\.cfw_weight"):
        apply_overrides(cfg, ["cfw_weight=0.5"])
    old.write_text(text + "cfw_wieght: 0.75\n")  # other unknown keys stay errors
    with pytest.raises(ConfigError, match="unknown key 'cfw_wieght'"):
        load_config(ModelConfig, old)
    # a checkpoint folder written before: config.yaml with the key, loaded by from_pretrained
    folder = tiny_model.save_pretrained(tmp_path / "ckpt")
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text() + "cfw_weight: 0.75\n")
    capsys.readouterr()
    SDATC.from_pretrained(folder)
    assert "ignoring cfw_weight" in capsys.readouterr().out


def test_pipeline_cfw_weight_reaches_decode(tiny_model, monkeypatch):
    import numpy as np

    from sdatc.pipelines.flow import FlowConfig
    from sdatc.pipelines.restore import PipelineConfig, RestorePipeline, WindowConfig
    from sdatc.pipelines.sampler import SamplerConfig

    with pytest.raises(ValueError, match=r"cfw_weight must be in \[0, 1\]"):
        PipelineConfig(cfw_weight=1.5)
    assert PipelineConfig().cfw_weight == 0.75
    seen = []
    decode = tiny_model.decode

    def spy(*args, **kwargs):
        seen.append(kwargs["w"])
        return decode(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "decode", spy)
    cfg = PipelineConfig(sampler=SamplerConfig(steps=1), flow=FlowConfig(enabled=False),
                         window=WindowConfig(length=2, stride=2), cfw_weight=0.3)
    frames = [np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(2)]
    assert len(list(RestorePipeline(tiny_model, cfg, progress=False).restore(frames, 2))) == 2
    assert seen == [0.3]
    # and w changes the decoded output once CFW is not the identity (zero-initialised at first)
    monkeypatch.undo()
    with torch.no_grad():
        for cfw in tiny_model.cfw.values():
            perturb_zero_conv(cfw)
        z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        _, feats = tiny_model.encode(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        one, low = tiny_model.decode(z, feats, num_frames=2), tiny_model.decode(z, feats, num_frames=2, w=0.3)
        assert torch.equal(one, tiny_model.decode(z, feats, num_frames=2, w=1.0))  # the default is training's w = 1
        assert not torch.allclose(one, low, atol=1e-4)

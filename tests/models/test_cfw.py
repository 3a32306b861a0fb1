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
    # w arrives as pipeline.cfw_weight, checked by PipelineConfig (test_pipeline_cfw_weight_reaches_decode)
    with pytest.raises(ValueError, match="groups"):
        CFW(48, CFWConfig(groups=32))
    with pytest.raises(ValueError, match="num_rdb"):
        CFWConfig(num_rdb=-1)


def test_full_size_budget():
    total = sum(p.numel() for c in (512, 256) for p in CFW(c, CFWConfig()).parameters())
    assert total == pytest.approx(25.07e6, rel=0.03)


# --------------------------------------------------------------------------- the one knob: pipeline.cfw_weight


def test_pipeline_cfw_weight_reaches_decode(tiny_model, monkeypatch):
    import numpy as np

    from sdatc.models.flow import FlowConfig
    from sdatc.pipelines.config import PipelineConfig, WindowConfig
    from sdatc.pipelines.sampler import SamplerConfig
    from sdatc.pipelines.sdatc_pipeline import SDATCPipeline

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
    assert len(list(SDATCPipeline(tiny_model, cfg, progress=False).stream(frames, 2))) == 2
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


def _peer_fusion(state: dict, enc, dec, w: float, num_rdb: int):
    """MGLD-VSR's Fuse_sft_block_ResidualDenseBlock (ldm/modules/diffusionmodules/model.py:1312-1368 at 9aa7731)
    written from its formula with the peer's own key names: ResBlock(2C -> C), RDBs, ResBlock(C -> C), then
    ``dec + w * out`` (no final 1x1 conv)."""
    import torch.nn.functional as F

    def gn(x, k):
        return F.group_norm(x, 32 if x.shape[1] >= 32 else x.shape[1], state[k + ".weight"], state[k + ".bias"], 1e-6)

    def res(x, p):
        h = F.conv2d(F.silu(gn(x, p + "norm1")), state[p + "conv1.weight"], state[p + "conv1.bias"], padding=1)
        h = F.conv2d(F.silu(gn(h, p + "norm2")), state[p + "conv2.weight"], state[p + "conv2.bias"], padding=1)
        skip = (F.conv2d(x, state[p + "conv_out.weight"], state[p + "conv_out.bias"])
                if p + "conv_out.weight" in state else x)
        return h + skip

    def rdb(x, p):
        feats = [x]
        for j in range(1, 5):
            feats.append(F.leaky_relu(F.conv2d(torch.cat(feats, 1), state[f"{p}conv{j}.weight"],
                                               state[f"{p}conv{j}.bias"], padding=1), 0.2))
        return F.conv2d(torch.cat(feats, 1), state[p + "conv5.weight"], state[p + "conv5.bias"], padding=1) * 0.2 + x

    h = res(torch.cat([enc, dec], 1), "encode_enc_1.")
    for k in range(num_rdb):
        h = rdb(h, f"encode_enc_2.{k}.")
    return dec + w * res(h, "encode_enc_3.")


def test_peer_weights_load_and_compute_the_peer_block():
    """A StableSR / MGLD-VSR fusion block's weights (peer key names) load into our CFW, whose extra zero 1x1 conv
    becomes the identity: the output equals the peer block's."""
    from sdatc.models.cfw import cfw_state_from_peer

    ours = CFW(64, CFWConfig(growth=16, num_rdb=2))
    g = torch.Generator().manual_seed(0)
    shapes = {"encode_enc_1.norm1": (128,), "encode_enc_1.conv1": (64, 128, 3, 3), "encode_enc_1.norm2": (64,),
              "encode_enc_1.conv2": (64, 64, 3, 3), "encode_enc_1.conv_out": (64, 128, 1, 1),
              "encode_enc_3.norm1": (64,), "encode_enc_3.conv1": (64, 64, 3, 3), "encode_enc_3.norm2": (64,),
              "encode_enc_3.conv2": (64, 64, 3, 3)}
    for k in range(2):
        for j in range(1, 6):
            shapes[f"encode_enc_2.{k}.conv{j}"] = (64 if j == 5 else 16, 64 + 16 * (j - 1), 3, 3)
    peer = {}
    for name, shape in shapes.items():
        peer[name + ".weight"] = torch.randn(shape, generator=g) * (0.5 if "norm" in name else 0.05) + ("norm" in name)
        peer[name + ".bias"] = torch.randn(shape[0], generator=g) * 0.05
    ours.load_state_dict(cfw_state_from_peer(peer, 64), strict=True)
    enc, dec = torch.randn(2, 64, 6, 7, generator=g), torch.randn(2, 64, 6, 7, generator=g)
    for w in (1.0, 0.5):
        torch.testing.assert_close(ours(dec, enc, w=w), _peer_fusion(peer, enc, dec, w, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a key"):
        cfw_state_from_peer({"fuse.weight": torch.zeros(1)}, 64)

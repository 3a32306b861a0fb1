"""CAPM: identity at init, prompt weights and resizing, gradients, heads, full-size budget."""

import pytest
import torch

from sdatc.models.capm import CAPM, CAPMConfig, ChannelLayerNorm, capm_params, fit_heads

C = 32


def tiny_cfg(**kw) -> CAPMConfig:
    base = dict(prompt_len=3, prompt_dim=8, prompt_size=8, max_width=64, cnn_width=16, num_heads=4)
    return CAPMConfig(**{**base, **kw})


def tiny_capm(seed: int = 0, channels: int = C, **kw) -> CAPM:
    torch.manual_seed(seed)
    return CAPM(channels, tiny_cfg(**kw))


def perturb_zero_conv(capm: CAPM) -> None:
    with torch.no_grad():
        capm.zero_out.weight.normal_(0, 0.1)
        capm.zero_out.bias.normal_(0, 0.1)


@pytest.mark.parametrize("weight_norm", ["none", "softmax", "sigmoid"])
def test_identity_at_init(weight_norm):
    capm = tiny_capm(weight_norm=weight_norm)
    x = torch.randn(2, C, 12, 10)
    assert torch.equal(capm(x), x)


def test_perturbed_zero_conv_changes_output():
    capm = tiny_capm()
    perturb_zero_conv(capm)
    x = torch.randn(1, C, 8, 8)
    y = capm(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)


def test_softmax_weights_sum_to_one_and_depend_on_input():
    capm = tiny_capm(weight_norm="softmax")
    x = torch.randn(3, C, 9, 7)
    v = capm.prompt_weights(x)
    assert v.shape == (3, 3)
    torch.testing.assert_close(v.sum(-1), torch.ones(3))
    assert not torch.allclose(v[0], v[1])
    sig = tiny_capm(weight_norm="sigmoid").prompt_weights(x)
    assert ((sig > 0) & (sig < 1)).all()


def test_odd_sizes_and_prompt_resized():
    capm = tiny_capm()
    perturb_zero_conv(capm)
    x = torch.randn(1, C, 45, 80)
    assert capm.prompt(x).shape == (1, 8, 45, 80)
    assert capm(x).shape == x.shape


def test_gradients_reach_every_parameter():
    capm = tiny_capm()
    opt = torch.optim.SGD(capm.parameters(), lr=0.1)
    x = torch.randn(2, C, 8, 8)
    target = torch.randn_like(x)

    loss = (capm(x) - target).square().mean()
    loss.backward()
    assert capm.zero_out.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad(set_to_none=True)

    (capm(x) - target).square().mean().backward()
    for name, p in capm.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_width_and_heads():
    assert CAPM(32, tiny_cfg(max_width=16)).width == 16
    assert CAPM(32, tiny_cfg(max_width=512)).width == 40
    assert fit_heads(40, 8) == 8
    assert fit_heads(36, 8) == 6
    assert fit_heads(7, 8) == 7
    assert fit_heads(13, 8) == 1
    # d = 36 with 8 heads asked: falls back to 6 heads and still runs.
    capm = CAPM(28, tiny_cfg(max_width=512, num_heads=8))
    assert capm.num_heads == 6
    perturb_zero_conv(capm)
    assert capm(torch.randn(1, 28, 5, 6)).shape == (1, 28, 5, 6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="weight_norm"):
        CAPMConfig(weight_norm="l2")
    with pytest.raises(ValueError, match="prompt_len"):
        CAPMConfig(prompt_len=0)
    with pytest.raises(ValueError, match="channels"):
        CAPM(0, CAPMConfig())


def test_capm_params_matches_built_modules():
    cfg = tiny_cfg()
    built = sum(p.numel() for c in (32, 64) for p in CAPM(c, cfg).parameters())
    assert capm_params([32, 64], cfg) == built


def test_full_size_budget_scales_with_width():
    widths = [1280, 1280, 640, 320, 512, 512, 256, 128]
    total = capm_params(widths, CAPMConfig())
    assert 20e6 < total < 40e6
    assert capm_params(widths, CAPMConfig(max_width=768)) > total
    assert capm_params(widths, CAPMConfig(cnn_width=256)) > total


def test_channel_layernorm_copies_only_for_gradients():
    """No grad (inference): the permuted LayerNorm output is returned as it is, a channels_last view (a copy
    would add a whole-frame tensor to the VAE decoder's peak, the planner's VAE_COEF). With grad: x's layout
    (the depthwise convs' weight gradients keep their strides for DDP's buckets)."""
    norm = ChannelLayerNorm(6)
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        fast = norm(x)
    slow = norm(x)
    assert fast.is_contiguous(memory_format=torch.channels_last) and not fast.is_contiguous()
    assert slow.is_contiguous()
    assert torch.equal(fast, slow)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert norm(cl).is_contiguous(memory_format=torch.channels_last) and torch.equal(norm(cl), slow)

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

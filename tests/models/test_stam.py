"""STAM: identity at init, temporal mixing, chunking, gradients, argument checks, budget."""

import pytest
import torch

from sdatc.models.stam import STAM, STAMConfig

C = 32


def tiny_stam(seed: int = 0, channels: int = C, a: float = 0.0, b: float = 0.0, **kw) -> STAM:
    torch.manual_seed(seed)
    stam = STAM(channels, STAMConfig(head_dim=16, **kw))
    with torch.no_grad():
        stam.a.fill_(a)
        stam.b.fill_(b)
    return stam


@pytest.mark.parametrize("t", [1, 2, 5])
def test_identity_at_init(t):
    stam = tiny_stam()
    assert stam.a.item() == 0 and stam.b.item() == 0
    x = torch.randn(2 * t, C, 6, 5)
    assert torch.equal(stam(x, num_frames=t), x)


@pytest.mark.parametrize("t", [1, 3])
def test_shapes_when_active(t):
    stam = tiny_stam(a=0.5, b=0.5)
    x = torch.randn(2 * t, C, 7, 9)
    y = stam(x, num_frames=t)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)


def test_heads_from_head_dim():
    assert STAM(32, STAMConfig(head_dim=16)).attn.num_heads == 2
    assert STAM(32, STAMConfig()).attn.num_heads == 1
    assert STAM(192, STAMConfig()).attn.num_heads == 3


def test_temporal_mixing():
    t = 3
    x = torch.randn(t, C, 4, 4)
    x2 = x.clone()
    x2[0] += 1.0
    active = tiny_stam(a=0.5, b=0.5)
    assert not torch.allclose(active(x, t)[1], active(x2, t)[1])
    idle = tiny_stam()
    assert torch.equal(idle(x, t)[1], idle(x2, t)[1])
    # Clips in the batch stay independent.
    xb = torch.cat([x, torch.randn(t, C, 4, 4)])
    torch.testing.assert_close(active(xb, t)[:t], active(x, t))


def test_chunked_equals_unchunked():
    x = torch.randn(2 * 4, C, 5, 7)  # B*H*W = 70 pixels
    whole = tiny_stam(a=0.3, b=0.7, chunk_size=10_000)(x, 4)
    chunked = tiny_stam(a=0.3, b=0.7, chunk_size=16)(x, 4)
    torch.testing.assert_close(chunked, whole)


def test_gradients_reach_every_parameter():
    stam = tiny_stam(a=0.5, b=0.5)
    x = torch.randn(2 * 3, C, 4, 4)
    (stam(x, 3) - torch.randn_like(x)).square().mean().backward()
    for name, p in stam.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_a_b_get_gradients_at_init():
    stam = tiny_stam()
    x = torch.randn(2 * 3, C, 4, 4)
    (stam(x, 3) - torch.randn_like(x)).square().mean().backward()
    assert stam.a.grad.abs() > 0 and stam.b.grad.abs() > 0


def test_bad_arguments():
    # a batch that does not split into windows is refused where it arrives: SDATC.decode (test_sdatc.py)
    with pytest.raises(ValueError, match="kernel_t"):
        STAMConfig(kernel_t=2)
    with pytest.raises(ValueError, match="chunk_size"):
        STAMConfig(chunk_size=0)


def test_full_size_budget():
    widths = [512] + [512] * 3 + [512] * 3 + [256] * 3 + [128] * 3
    total = sum(p.numel() for c in widths for p in STAM(c, STAMConfig()).parameters())
    assert total == pytest.approx(14.58e6, rel=0.02)

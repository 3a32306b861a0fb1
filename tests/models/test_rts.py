"""RTS units: identity at init, sizes of the reference layout, shift semantics, attention against a loop."""

import pytest
import torch
import torch.nn.functional as F

from sdatc.models.rts import RTS, RTSAttention, RTSConfig, RTSConv


def _randomise(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def test_identity_at_init():
    x = torch.randn(2 * 4, 64, 6, 5)
    assert torch.equal(RTS(64, RTSConfig())(x, num_frames=4), x)


def test_sizes_of_the_reference_layout():
    n = {c: sum(p.numel() for p in RTS(c, RTSConfig()).parameters()) for c in (320, 640, 1280, 512, 256)}
    assert round(n[320] / 1e3, 1) == 58.8 and round(n[640] / 1e3, 1) == 240.8 and round(n[1280] / 1e6, 2) == 1.0
    assert round(n[512] / 1e3, 1) == 158.8 and round(n[256] / 1e3, 1) == 34.4
    unet = [320, 640, 1280, 1280] + [1280, 1280, 1280, 640]  # after each down block, before each up block
    vae = [512, 512, 512, 256]  # before each decoder up block
    total = sum(n[c] for c in unet + vae)
    assert abs(total / 6.06e6 - 1) < 0.01, total


@pytest.mark.parametrize("unit", [RTSConv, RTSAttention])
def test_each_frame_sees_only_its_neighbours(unit):
    t = 6
    m = _randomise(unit(48, RTSConfig())).eval()
    x = torch.randn(2 * t, 48, 5, 4)
    with torch.no_grad():
        base = m(x, t)
        for j in range(t):
            y = x.clone()
            y[j] += torch.randn_like(y[j])  # clip 0, frame j
            changed = {i for i in range(2 * t) if not torch.allclose(m(y, t)[i], base[i], atol=1e-6)}
            assert changed == {i for i in (j - 1, j, j + 1) if 0 <= i < t}, (j, changed)


def test_conv_unit_ends_see_zeros():
    """RTS-conv's first/last frames see zero features: as a clip padded with zero frames (no bias before the shift)."""
    t = 4
    m = _randomise(RTSConv(48, RTSConfig())).eval()
    x = torch.randn(t, 48, 5, 4)
    padded = torch.cat([torch.zeros_like(x[:1]), x, torch.zeros_like(x[:1])])
    with torch.no_grad():
        # padded clip: another batch size, so other conv kernels (fp32 rounding differs on AVX2 / AVX-512)
        torch.testing.assert_close(m(x, t), m(padded, t + 2)[1:-1], atol=1e-5, rtol=1e-5)


def test_attention_equals_a_loop_over_frames_and_heads():
    t, c_in, heads = 4, 96, 8
    m = _randomise(RTSAttention(c_in, RTSConfig(num_heads=heads))).eval()
    x = torch.randn(2 * t, c_in, 3, 5)
    with torch.no_grad():
        q, k, v = m.qkv_dwconv(m.qkv(x)).chunk(3, dim=1)
        c = q.shape[1] // heads
        ref = torch.zeros_like(q)
        for b in range(2):
            for f in range(t):
                i = b * t + f
                for h in range(heads):
                    hs = slice(h * c, (h + 1) * c)
                    qh = F.normalize(q[i, hs].flatten(1), dim=-1)  # (c, HW)
                    for nb in (f - 1, f + 1):
                        if 0 <= nb < t:
                            kh = F.normalize(k[b * t + nb, hs].flatten(1), dim=-1)
                            vh = v[b * t + nb, hs].flatten(1)
                        else:  # past the ends: zero keys and values
                            kh = vh = torch.zeros_like(qh)
                        a = torch.softmax(qh @ kh.T * m.temperature[h], dim=-1)
                        ref[i, hs] += (a @ vh).view_as(ref[i, hs])
        expected = x + m.proj_out(ref)
        torch.testing.assert_close(m(x, t), expected, atol=1e-5, rtol=1e-5)



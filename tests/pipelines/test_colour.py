"""Colour correction: AdaIN matches the reference statistics, the wavelet fix swaps low frequencies."""

import pytest
import torch

from sdatc.pipelines.colour import adain, colour_correct, wavelet_fix


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _smooth(n, h, w, colour):
    """(n, 3, h, w) gentle gradients around a per-channel colour."""
    yy = torch.linspace(-1, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    base = torch.tensor(colour).view(1, 3, 1, 1)
    return (base + 0.05 * yy + 0.03 * xx).expand(n, 3, h, w).contiguous()


def test_adain_matches_reference_statistics():
    x = _rand(2, 3, 64, 48) * 0.5 + 0.3
    ref = _rand(2, 3, 16, 12, seed=1) ** 2  # different size and statistics
    out = adain(x, ref)
    assert out.shape == x.shape
    var_o, mean_o = torch.var_mean(out, dim=(-2, -1), correction=0)
    var_r, mean_r = torch.var_mean(ref, dim=(-2, -1), correction=0)
    torch.testing.assert_close(mean_o, mean_r, atol=1e-4, rtol=0)
    torch.testing.assert_close(var_o.sqrt(), var_r.sqrt(), atol=1e-4, rtol=0)


def test_wavelet_moves_mean_to_reference():
    x = _smooth(2, 96, 80, [0.7, 0.4, 0.2])
    ref = _smooth(2, 24, 20, [0.3, 0.5, 0.6])
    out = wavelet_fix(x, ref)
    assert out.shape == x.shape
    torch.testing.assert_close(out.mean(dim=(-2, -1)), ref.mean(dim=(-2, -1)), atol=1e-2, rtol=0)


def test_wavelet_keeps_high_frequencies():
    h, w = 96, 96
    checker = ((torch.arange(h).view(h, 1) + torch.arange(w).view(1, w)) % 2 * 2 - 1).float()  # +-1
    x = 0.5 + 0.1 * checker.expand(1, 3, h, w)
    ref = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, 24, 24)
    out = wavelet_fix(x, ref)
    expected = ref[..., :1, :1] + 0.1 * checker  # the checkerboard over the reference colour
    inner = (..., slice(32, -32), slice(32, -32))  # away from the replicated borders
    torch.testing.assert_close(out[inner], expected.expand_as(out)[inner], atol=1e-5, rtol=0)


def test_colour_correct_modes():
    x, ref = _rand(1, 3, 32, 32), _rand(1, 3, 8, 8, seed=1)
    assert colour_correct(x, ref, "none") is x
    torch.testing.assert_close(colour_correct(x, ref, "adain"), adain(x, ref))
    torch.testing.assert_close(colour_correct(x, ref, "wavelet"), wavelet_fix(x, ref))
    assert colour_correct(x.half(), ref.half(), "adain").dtype == torch.float16
    with pytest.raises(ValueError, match="unknown colour"):
        colour_correct(x, ref, "histogram")
    with pytest.raises(ValueError, match="differ"):
        adain(x, ref[:, :2])
    with pytest.raises(ValueError, match="levels"):
        wavelet_fix(x, ref, levels=0)

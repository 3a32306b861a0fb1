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


def _stablesr_adain(content, style, eps=1e-5):
    """StableSR's adaptive_instance_normalization (scripts/wavelet_color_fix.py:44-71), written from its formula:
    images in [-1, 1], ``feat.var(dim=2) + eps`` (unbiased) for both, float64."""
    def mean_std(f):
        b, c = f.shape[:2]
        return f.reshape(b, c, -1).mean(2).view(b, c, 1, 1), (f.reshape(b, c, -1).var(2) + eps).sqrt().view(b, c, 1, 1)
    (cm, cs), (sm, ss) = mean_std(content), mean_std(style)
    return (content - cm) / cs * ss + sm


def test_adain_matches_reference_statistics():
    x = _rand(2, 3, 64, 48) * 0.5 + 0.3
    ref = _rand(2, 3, 16, 12, seed=1) ** 2  # different size and statistics
    out = adain(x, ref)
    assert out.shape == x.shape
    var_o, mean_o = torch.var_mean(out, dim=(-2, -1), correction=1)
    var_r, mean_r = torch.var_mean(ref, dim=(-2, -1), correction=1)
    torch.testing.assert_close(mean_o, mean_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(var_o.sqrt(), var_r.sqrt(), atol=5e-5, rtol=0)  # eps moves the std by < 1e-5 / 2 std


def test_adain_is_stablesr_formula_in_its_range():
    """The peers' AdaIN on [-1, 1] images (unbiased variances, eps on both), not population statistics."""
    x = _rand(2, 3, 40, 36, seed=3) * 1.2 - 0.1  # unclamped decoder output, some values outside [0, 1]
    ref = _rand(2, 3, 10, 9, seed=4) * 0.02 + 0.5  # a flat reference: eps matters
    theirs = (_stablesr_adain(2 * x.double() - 1, 2 * ref.double() - 1) + 1) / 2
    torch.testing.assert_close(adain(x, ref).double(), theirs, atol=2e-6, rtol=0)  # float32 statistics
    pop = (x - x.mean((-2, -1), keepdim=True)) / (x.var((-2, -1), keepdim=True, correction=0) + 1e-5).sqrt()
    pop = pop * ref.var((-2, -1), keepdim=True, correction=0).sqrt() + ref.mean((-2, -1), keepdim=True)
    assert (adain(x, ref) - pop).abs().max() > 1e-4  # the former population form differs measurably here


def test_wavelet_reference_clamped_after_bicubic():
    """StableSR clamps its bicubic x4 reference (sr_val_ddpm_text_T_vqganfin_old.py:246): overshoot at a hard
    edge never reaches the low frequencies."""
    ref = torch.zeros(1, 3, 8, 8)
    ref[..., :, 4:] = 1.0  # a step edge: bicubic x4 overshoots below 0 and above 1
    x = torch.full((1, 3, 32, 32), 0.5)
    up = torch.nn.functional.interpolate(ref, size=(32, 32), mode="bicubic", align_corners=False)
    assert up.min() < -0.01 and up.max() > 1.01
    from sdatc.pipelines.colour import _low_pass

    expected = x - _low_pass(x, 5) + _low_pass(up.clamp(0, 1), 5)
    torch.testing.assert_close(wavelet_fix(x, ref), expected, atol=1e-6, rtol=0)


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

"""The DCM's inference path (``dcm_inference``) against its reference path (``dcm(x)``: timm's blocks as they are).

The inference path runs the same function with fewer memory passes (sdatc/models/dcm_fast.py,
called explicitly by the pipelines; ``dcm(x)`` is the reference with or without grad): window-ordered
tokens between Swin blocks, chunked blocks with
``scaled_dot_product_attention``, the shifted-window mask only on the windows where it is not zero,
channels-last maps, the upsampler folded into one LR convolution with exact border strips. Here both
paths run on the same weights (strong random ones, so that attention, the bias and the mask all
matter): float32 within rounding, float64 to 1e-12 relative, the FLOPs the fold predicts, and chunk
sizes that do not change the result.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock

from sdatc.models import dcm_fast
from sdatc.models.dcm import DCM, DCMConfig
from sdatc.models.dcm_fast import dcm_inference, folded_tail, upsampler_chain, window_layout
from sdatc.models.report import flop_counter_mode


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def strong_dcm(seed: int = 0, **kw) -> DCM:
    """A small DCM with weights large enough that every part of the body changes the output."""
    torch.manual_seed(seed)
    cfg = dict(embed_dim=24, depths=[2, 2], num_heads=[2, 3], window_size=8, num_feat=16)
    dcm = DCM(DCMConfig(**{**cfg, **kw})).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dcm.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(2.0 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                        + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return dcm


def both(dcm: DCM, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, inference-path) outputs."""
    with torch.inference_mode():
        return dcm(x), dcm_inference(dcm, x)


@pytest.mark.parametrize("size", [(16, 24), (37, 45), (9, 13), (3, 5)])
def test_inference_path_equals_reference(carphone_frames, size):
    h, w = size
    dcm = strong_dcm()
    x = torch.from_numpy(carphone_frames[:3, 20:20 + h, 30:30 + w].copy()).permute(0, 3, 1, 2).float() / 255
    ref, fast = both(dcm, x)
    assert fast.shape == ref.shape == (3, 3, 4 * h, 4 * w)
    assert ref.std() > 0.2
    torch.testing.assert_close(fast, ref, atol=2e-5 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("upscale, img_range", [(2, 1.0), (3, 1.0), (4, 255.0)])
def test_other_scales_and_img_range(upscale, img_range):
    dcm = strong_dcm(1, upscale=upscale, img_range=img_range)
    ref, fast = both(dcm, torch.rand(2, 3, 19, 27))
    assert fast.shape == (2, 3, 19 * upscale, 27 * upscale)
    torch.testing.assert_close(fast, ref, atol=2e-5 * ref.abs().max().item(), rtol=0)


def test_float64_same_function():
    dcm = strong_dcm(2).double()
    ref, fast = both(dcm, torch.rand(2, 3, 21, 30, dtype=torch.float64))
    torch.testing.assert_close(fast, ref, atol=1e-12 * ref.abs().max().item(), rtol=0)


def test_window_chunks_do_not_matter(monkeypatch):
    dcm = strong_dcm(3)
    x = torch.rand(2, 3, 26, 35)
    with torch.inference_mode():
        base = dcm_inference(dcm, x)
        for chunk in [1, 7, 10**6]:
            monkeypatch.setattr(dcm_fast, "CHUNK_WINDOWS", chunk)
            torch.testing.assert_close(dcm_inference(dcm, x), base, atol=2e-5 * base.abs().max().item(), rtol=0)


def test_frames_do_not_depend_on_the_batch():
    dcm = strong_dcm(4)
    x = torch.rand(3, 3, 16, 24)
    with torch.inference_mode():
        together = dcm_inference(dcm, x)
        alone = torch.cat([dcm_inference(dcm, x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=2e-5 * alone.abs().max().item(), rtol=0)


def conv_flops(pixels: int, c_out: int, c_in: int, k: int) -> int:
    return 2 * pixels * c_out * c_in * k * k


def chain_flops(h: int, w: int, nf: int, s: int = 4) -> int:
    """FLOPs of the x4 upsampler and conv_last on (h, w) LR features: 3x3 convs at 1x, 2x, then 4x."""
    return conv_flops(h * w, 4 * nf, nf, 3) + conv_flops(4 * h * w, 4 * nf, nf, 3) + conv_flops(16 * h * w, 3, nf, 3)


def test_flops_are_the_reference_with_the_upsampler_folded():
    """The body's FLOPs are unchanged; the upsampler's become one 5x5 conv to 48 sub-pixel channels on
    the LR grid plus the four border strips (2 LR pixels deep, computed from 4-pixel crops). ``dcm(x)`` is
    the reference with or without grad: nothing switches paths behind the caller's back."""
    dcm = strong_dcm(5)
    h, w, nf = 24, 40, dcm.cfg.num_feat
    x = torch.rand(1, 3, h, w)
    with torch.inference_mode():
        folded_tail(dcm)  # folded once, before counting
    counts = []
    for grad, fn in ((True, dcm), (False, dcm), (False, lambda x: dcm_inference(dcm, x))):
        with torch.set_grad_enabled(grad), flop_counter_mode() as fc:
            fn(x)
        counts.append(fc.get_total_flops())
    strips = 2 * chain_flops(4, w, nf) + 2 * chain_flops(h, 4, nf)
    expected = counts[0] - chain_flops(h, w, nf) + conv_flops(h * w, 48, nf, 5) + strips
    assert counts[0] == counts[1]
    assert counts[2] == expected < counts[0]


@pytest.mark.parametrize("upscale", [2, 3, 4, 8])
def test_folded_upsampler_is_the_chain(upscale):
    """Away from the border the fold is the chain itself (float64); its kernel radius is 2 LR pixels."""
    dcm = strong_dcm(6, upscale=upscale).double()
    with torch.inference_mode():
        fold = folded_tail(dcm)
        z = torch.randn(2, dcm.cfg.num_feat, 14, 17, dtype=torch.float64)
        mods = list(dcm.upsample)
        convs = [(c.weight, c.bias, sh.upscale_factor) for c, sh in zip(mods[0::2], mods[1::2])]
        ref = upsampler_chain(z, convs, (dcm.conv_last.weight, dcm.conv_last.bias))  # (B, 3, sH, sW)
        y = F.conv2d(z, fold.weight, fold.bias, padding=fold.radius)  # (B, s*s*3, H, W), channels (i, j, o)
        ours = y.view(2, upscale, upscale, 3, 14, 17).permute(0, 3, 4, 1, 5, 2).reshape(ref.shape)
    assert fold.radius == 2 and fold.weight.shape == (upscale * upscale * 3, dcm.cfg.num_feat, 5, 5)
    inner = (slice(None), slice(None), slice(2 * upscale, -2 * upscale), slice(2 * upscale, -2 * upscale))
    torch.testing.assert_close(ours[inner], ref[inner], atol=1e-12 * ref.abs().max().item(), rtol=0)
    assert (ours[:, :, 0] - ref[:, :, 0]).abs().max() > 1e-3 * ref.abs().max()  # the border is not (so strips)


def test_fold_follows_weight_changes():
    dcm = strong_dcm(7)
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        dcm_inference(dcm, x)
        first = folded_tail(dcm)
        with torch.no_grad():
            dcm.conv_last.weight.mul_(2.0)
        assert folded_tail(dcm) is not first
    ref, fast = both(dcm, x)
    torch.testing.assert_close(fast, ref, atol=2e-5 * ref.abs().max().item(), rtol=0)
    assert not any("fold" in k for k in dcm.state_dict())


@pytest.mark.parametrize("h, w, shift", [(16, 24, 4), (8, 8, 4), (24, 16, 0), (16, 32, 2)])
def test_window_layout_matches_timm(h, w, shift):
    """The order is a permutation into windows of the rolled grid; the masked windows come last with
    timm's own shifted-window mask, and timm's mask is zero on every other window."""
    b, ws = 2, 8
    lay = window_layout(b, h, w, ws, (shift, shift), torch.device("cpu"))
    n_tok = b * h * w
    assert torch.equal(lay.order.sort().values, torch.arange(n_tok))
    assert torch.equal(lay.order[lay.inverse], torch.arange(n_tok))
    grid = torch.arange(n_tok).view(b, h, w, 1)
    rolled = torch.roll(grid, (-shift, -shift), (1, 2))
    windows = rolled.view(b, h // ws, ws, w // ws, ws).transpose(2, 3).reshape(b, -1, ws * ws)
    ours = lay.order.view(-1, ws * ws)
    assert {tuple(r) for r in ours.tolist()} == {tuple(r) for r in windows.reshape(-1, ws * ws).tolist()}
    block = SwinTransformerBlock(8, (h, w), num_heads=1, window_size=ws, shift_size=shift,
                                 always_partition=True, dynamic_mask=True)
    timm_mask = block.get_attn_mask(torch.zeros(1, h, w, 8))  # (nW, N, N) or None, windows row-major
    if not shift:
        assert timm_mask is None and lay.mask is None and lay.n_masked == 0
        return
    masked = [i for i in range(len(timm_mask)) if timm_mask[i].any()]
    n_masked = len(lay.mask)
    assert lay.n_masked == b * n_masked and len(masked) <= n_masked
    first = {tuple(r): i for i, r in enumerate(windows[0].tolist())}  # window -> timm's index, frame 0
    plain = ours[:len(ours) - lay.n_masked]
    for i in range(b):  # frame i's masked windows: the i-th group of the last n_masked * b
        group = ours[len(ours) - lay.n_masked + i * n_masked:len(ours) - lay.n_masked + (i + 1) * n_masked]
        for j, win in enumerate(group.tolist()):
            k = first[tuple(v - i * h * w for v in win)]
            assert torch.equal(lay.mask[j], timm_mask[k])
    for win in plain.tolist():
        f = win[0] // (h * w)
        assert not timm_mask[first[tuple(v - f * h * w for v in win)]].any()

"""Spatial tiling: tile starts cover every pixel, blended per-pixel functions equal the untiled result."""

import pytest
import torch
import torch.nn.functional as F

from sdatc.pipelines.tiling import blend_weights, tile_starts, tiled_apply

SIZES = [(45, 16, 8), (77, 32, 16), (101, 64, 32), (45, 32, 16), (101, 16, 8), (64, 64, 32), (65, 64, 32)]


def _check_starts(size, tile, overlap, align=1):
    starts = tile_starts(size, tile, overlap, align)
    t = min(tile // align * align, size)
    assert starts[0] == 0 and starts[-1] + t == size
    assert starts == sorted(set(starts))
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + t] = True
        assert s % align == 0
    assert covered.all()
    for a, b in zip(starts, starts[1:]):
        assert a + t - b >= overlap  # overlap of consecutive tiles
    return starts


@pytest.mark.parametrize("size,tile,overlap", SIZES)
def test_tile_starts_cover_with_overlap(size, tile, overlap):
    _check_starts(size, tile, overlap)


@pytest.mark.parametrize("size,tile,overlap,align", [(96, 32, 9, 8), (200, 64, 16, 8), (88, 24, 8, 8),
                                                     (104, 64, 32, 8), (45, 16, 8, 1)])
def test_tile_starts_align(size, tile, overlap, align):
    _check_starts(size, tile, overlap, align)


def test_tile_starts_single_and_errors():
    assert tile_starts(45, 64, 32) == [0] and tile_starts(64, 64, 100) == [0]  # no tiling needed
    assert tile_starts(48, 50, 8, align=8) == [0]
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 16, 16)
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(96, 16, 9, align=8)  # overlap rounds up to 16 = the tile
    with pytest.raises(ValueError, match="tile"):
        tile_starts(100, 0, 0)
    with pytest.raises(ValueError, match="multiple of align"):
        tile_starts(100, 32, 8, align=8)
    with pytest.raises(ValueError, match="smaller than align"):
        tile_starts(96, 4, 0, align=8)
    with pytest.raises(ValueError):
        tile_starts(0, 16, 8)
    with pytest.raises(ValueError):
        tile_starts(100, 16, -1)


@pytest.mark.parametrize("kind", ["gaussian", "linear"])
@pytest.mark.parametrize("h,w", [(64, 64), (15, 32), (1, 7)])
def test_blend_weights_positive_centred_symmetric(kind, h, w):
    wts = blend_weights(h, w, kind)
    assert wts.shape == (h, w) and (wts > 0).all() and wts.min() >= 1e-6
    assert torch.equal(wts, wts.flip(0)) and torch.equal(wts, wts.flip(1))
    assert wts[(h - 1) // 2, (w - 1) // 2] == wts.max()
    assert wts[h // 2, w // 2] == wts.max()
    with pytest.raises(ValueError, match="blend kind"):
        blend_weights(4, 4, "cosine")


def _img(h, w, c=3, n=2, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["gaussian", "linear"])
@pytest.mark.parametrize("size,tile,overlap", SIZES)
def test_pointwise_functions_match_untiled(kind, size, tile, overlap):
    x = _img(size, size + 6 if size + 6 <= 107 else size)
    for fn in (lambda t, b: t, lambda t, b: t * 2 + 1):
        out = tiled_apply(fn, x, tile, overlap, kind)
        torch.testing.assert_close(out, fn(x, None), atol=1e-6, rtol=0)


@pytest.mark.parametrize("h,w,tile,overlap", [(45, 77, 16, 8), (101, 33, 32, 16)])
def test_upsample_x4(h, w, tile, overlap):
    x = _img(h, w)
    up = lambda t, b: t.repeat_interleave(4, -1).repeat_interleave(4, -2)  # noqa: E731
    out = tiled_apply(up, x, tile, overlap)
    assert out.shape == (2, 3, 4 * h, 4 * w)
    torch.testing.assert_close(out, up(x, None), atol=1e-6, rtol=0)


def test_average_pool_eighth_with_align():
    x = _img(88, 120)
    pool = lambda t, b: F.avg_pool2d(t, 8)  # noqa: E731
    out = tiled_apply(pool, x, 32, 8, align=8)
    assert out.shape == (2, 3, 11, 15)
    torch.testing.assert_close(out, pool(x, None), atol=1e-6, rtol=0)


def test_tuple_output_half_and_quarter():
    x = _img(96, 136)
    fn = lambda t, b: (F.avg_pool2d(t, 2), F.avg_pool2d(t, 4)[:, :1])  # noqa: E731
    out = tiled_apply(fn, x, 40, 12, align=4)
    ref = fn(x, None)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == (2, 3, 48, 68) and out[1].shape == (2, 1, 24, 34)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=0)


def test_box_reads_a_second_tensor():
    x, y = _img(77, 45), _img(77, 45, seed=1)
    boxes = []

    def fn(t, box):
        boxes.append(box)
        y0, y1, x0, x1 = box
        assert t.shape[-2:] == (y1 - y0, x1 - x0)
        torch.testing.assert_close(t, x[..., y0:y1, x0:x1], atol=0, rtol=0)
        return t * y[..., y0:y1, x0:x1]

    out = tiled_apply(fn, x, 32, 16)
    torch.testing.assert_close(out, x * y, atol=1e-6, rtol=0)
    assert len(boxes) == len(tile_starts(77, 32, 16)) * len(tile_starts(45, 32, 16))


def test_decoder_style_scaled_crop():
    """A x8 decoder whose fn crops a x2 feature map with the box scaled by 2 (as the VAE decoder)."""
    z, feat = _img(20, 13, c=4), _img(40, 26, c=3, seed=1)

    def dec(zt, box):
        f = feat[..., box[0] * 2:box[1] * 2, box[2] * 2:box[3] * 2]
        return (zt[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)
                + f.repeat_interleave(4, -1).repeat_interleave(4, -2))

    out = tiled_apply(dec, z, 8, 4)
    torch.testing.assert_close(out, dec(z, (0, 20, 0, 13)), atol=1e-6, rtol=0)


def test_single_tile_is_bit_exact_and_called_once():
    x = _img(40, 50)
    calls = []
    ret = (x * 3, x[:, :1])

    def fn(t, box):
        calls.append(box)
        return ret

    out = tiled_apply(fn, x, 64, 32)
    assert calls == [(0, 40, 0, 50)] and out is ret


def test_half_precision_output_dtype():
    x = _img(45, 45).half()
    out = tiled_apply(lambda t, b: t, x, 16, 8)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, x, atol=1e-3, rtol=0)


def test_scale_errors():
    x = _img(45, 45)
    with pytest.raises(ValueError, match="whole pixel"):
        tiled_apply(lambda t, b: F.avg_pool2d(t, 2), x, 16, 8)  # odd size at 1/2
    with pytest.raises(ValueError, match="both axes"):
        tiled_apply(lambda t, b: t[..., :, ::2], _img(48, 48), 16, 8)
    with pytest.raises(ValueError, match="multiple of align"):
        tiled_apply(lambda t, b: t, x, 16, 8, align=8)
    with pytest.raises(ValueError, match="expects"):
        tiled_apply(lambda t, b: t, x[0], 16, 8)
    with pytest.raises(ValueError, match="outputs"):
        n = iter(range(100))
        tiled_apply(lambda t, b: (t,) * (1 + (next(n) > 0)), x, 16, 8)

"""MATLAB-compatible bicubic imresize: sizes, kernel taps, symmetric padding, batching, dtypes,
agreement with PIL and torch's antialiased bicubic on a real frame."""

import math

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdatc.data.imresize import bicubic_down, bicubic_up, imresize

UP_TAPS = [0.8671875, 0.2265625, -0.0703125, -0.0234375]  # k(0.25), k(0.75), k(1.25), k(1.75)
DOWN_TAPS = [t / 2 for t in UP_TAPS]  # x1/2: h(x) = 0.5 k(0.5 x) at distances 0.5, 1.5, 2.5, 3.5


def _k(x: float) -> float:
    """MATLAB cubic kernel (a = -0.5), written out for the hand computations."""
    x = abs(x)
    if x <= 1:
        return 1.5 * x**3 - 2.5 * x**2 + 1
    if x <= 2:
        return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2
    return 0.0


@pytest.fixture(scope="module")
def frame0(sample_video_path) -> np.ndarray:
    """Frame 0 of bigbuckbunny.mp4, (720, 1280, 3) uint8 RGB."""
    with av.open(str(sample_video_path)) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")


@pytest.mark.parametrize("scale", [1 / 4, 1 / 3, 0.37, 2, 4])
def test_constant_image_stays_constant(scale):
    u8 = np.full((37, 45, 3), 137, np.uint8)
    out = imresize(u8, scale=scale)
    assert out.dtype == np.uint8 and np.all(out == 137)
    f64 = np.full((37, 45), 0.3)
    assert np.abs(imresize(f64, scale=scale) - 0.3).max() < 1e-12
    f32 = torch.full((2, 3, 20, 24), 0.7, dtype=torch.float32)
    out32 = imresize(f32, scale=scale)
    assert out32.dtype == torch.float32 and (out32 - 0.7).abs().max() < 1e-6


def test_output_sizes():
    assert imresize(np.zeros((720, 1280, 3), np.uint8), scale=1 / 4).shape == (180, 320, 3)
    assert imresize(np.zeros((720, 1280), np.float32), scale=1 / 3).shape == (240, 427)  # ceil(426.67)
    assert imresize(np.zeros((37, 45, 3), np.uint8), scale=0.5).shape == (19, 23, 3)  # ceil rule
    assert imresize(np.zeros((19, 23, 3)), scale=4).shape == (76, 92, 3)
    assert imresize(np.zeros((30, 30)), scale=0.1).shape == (3, 3)  # 0.1 * 30 = 3.0000000000000004
    assert imresize(torch.zeros(2, 5, 3, 37, 45), size=(50, 17)).shape == (2, 5, 3, 50, 17)
    assert bicubic_down(np.zeros((144, 176, 3), np.uint8)).shape == (36, 44, 3)
    assert bicubic_up(torch.zeros(3, 36, 44, dtype=torch.uint8)).shape == (3, 144, 176)


def _impulse_check(out: np.ndarray, row: int, expect: dict[int, float]):
    want = np.zeros_like(out)
    for pos, v in expect.items():
        want[row, pos] = v
    assert np.abs(out - want).max() < 1e-12, (np.nonzero(out[row])[0], out[row][out[row] != 0])


def test_upscale_x2_impulse_gives_cubic_taps():
    n, i0 = 64, 31  # impulse at 0-based column 31, row 2 of 4
    img = np.zeros((4, n))
    img[2, i0] = 1.0
    out = imresize(img, size=(4, 2 * n))  # rows: scale 1, columns: scale 2
    # output column o (0-based) sits at input u = (o + 1) / 2 + 0.25 (1-based) = o / 2 - 0.25 (0-based),
    # so it sees column 31 at distance |o / 2 - 0.25 - 31|: 0.25 for o = 62, 63; 0.75 for 61, 64; ...
    left = {62 - j: t for j, t in enumerate(UP_TAPS)}  # 62, 61, 60, 59
    right = {63 + j: t for j, t in enumerate(UP_TAPS)}  # 63, 64, 65, 66
    _impulse_check(out, 2, left | right)
    # same along the rows (transpose): columns untouched
    out_t = imresize(np.ascontiguousarray(img.T), size=(2 * n, 4))
    _impulse_check(np.ascontiguousarray(out_t.T), 2, left | right)


def test_downscale_x2_impulse_gives_antialiased_taps():
    n, i0 = 64, 31
    img = np.zeros((4, n))
    img[1, i0] = 1.0
    out = imresize(img, size=(4, n // 2))
    # output o (0-based) is centred on input 2 o + 0.5 (0-based); column 31 lies at distance 0.5 from
    # o = 15, 1.5 from o = 16, 2.5 from o = 14, 3.5 from o = 17; the kernel is h(x) = 0.5 k(0.5 x).
    expect = {15: DOWN_TAPS[0], 16: DOWN_TAPS[1], 14: DOWN_TAPS[2], 17: DOWN_TAPS[3]}
    _impulse_check(out, 1, expect)
    assert sum(DOWN_TAPS) * 2 == 1.0  # weights already sum to 1 across the 8 in-range taps
    out_t = imresize(np.ascontiguousarray(img.T), scale=0.5)  # (32, 2): both dims halve
    assert out_t.shape == (32, 2)


def _mirror(j: int, n: int) -> int:
    """MATLAB 'symmetric' padding on 1-based index j -> 0-based index into a length-n axis."""
    j = (j - 1) % (2 * n)
    return j if j < n else 2 * n - 1 - j


def _hand_weights(x: int, scale: float):
    """1-based output x -> list of (1-based input index, normalised weight), MATLAB's contributions()."""
    width = 4 / scale
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = math.floor(u - width / 2)
    taps = [(j, scale * _k(scale * (u - j))) for j in range(left, left + math.ceil(width) + 2)]
    total = sum(w for _, w in taps)
    return [(j, w / total) for j, w in taps]


def test_symmetric_padding_first_and_last_pixel():
    h, w = 24, 28
    ii, jj = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    ramp = (ii + 1) ** 2 + 3.0 * np.sqrt(jj + 1) + 0.1 * ii * jj  # smooth, non-linear: mirroring matters
    out = imresize(ramp, scale=0.25)
    assert out.shape == (6, 7)
    for oy, ox in [(1, 1), (6, 7), (1, 7)]:
        wy, wx = _hand_weights(oy, 0.25), _hand_weights(ox, 0.25)
        assert any(j < 1 or j > h for j, _ in wy)  # the taps do reach outside the image
        sym = sum(a * b * ramp[_mirror(jy, h), _mirror(jx, w)] for jy, a in wy for jx, b in wx)
        clamp = sum(a * b * ramp[min(max(jy, 1), h) - 1, min(max(jx, 1), w) - 1] for jy, a in wy for jx, b in wx)
        assert abs(out[oy - 1, ox - 1] - sym) < 1e-10
        assert abs(out[oy - 1, ox - 1] - clamp) > 1e-3  # replicate padding would be detectably different


def test_batched_torch_matches_per_image_numpy_and_dtypes():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 3, 17, 22))  # (B, T, C, H, W)
    for kw in ({"scale": 0.25}, {"scale": 3}, {"size": (9, 30)}):
        out = imresize(torch.from_numpy(x), **kw)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
        for b in range(2):
            for t in range(3):
                ref = imresize(x[b, t].transpose(1, 2, 0), **kw)  # (H, W, C) numpy
                assert isinstance(ref, np.ndarray) and ref.dtype == np.float64
                assert np.abs(out[b, t].numpy().transpose(1, 2, 0) - ref).max() < 1e-12
    out32 = imresize(torch.from_numpy(x).float(), scale=0.5)
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), imresize(torch.from_numpy(x), scale=0.5), atol=1e-5)
    assert imresize(x[0, 0, 0].astype(np.float32), scale=2).dtype == np.float32  # (H, W) numpy


def test_uint8_is_float_result_rounded_and_clipped(frame0):
    crop = frame0[200:328, 400:560]  # real texture with edges, so overshoot gets clipped
    for scale in (0.25, 0.37, 4):
        u8 = imresize(crop, scale=scale)
        f = imresize(crop.astype(np.float64), scale=scale)
        assert u8.dtype == np.uint8 and u8.shape == f.shape
        assert np.abs(u8 - np.clip(f, 0, 255)).max() <= 0.5 + 1e-9
        assert np.array_equal(u8, np.clip(np.floor(f + 0.5), 0, 255).astype(np.uint8))
    t8 = imresize(torch.from_numpy(crop).permute(2, 0, 1), scale=0.25)
    assert t8.dtype == torch.uint8 and np.array_equal(t8.permute(1, 2, 0).numpy(), imresize(crop, scale=0.25))


def test_agrees_with_pil_and_torch_antialiased_bicubic(frame0):
    h, w = frame0.shape[:2]
    ours = imresize(frame0.astype(np.float64) / 255, scale=1 / 4)  # (180, 320, 3) in [0, 1]
    pil = np.asarray(Image.fromarray(frame0).resize((w // 4, h // 4), Image.Resampling.BICUBIC)) / 255
    mad_pil = float(np.abs(ours - pil).mean())
    x = torch.from_numpy(frame0).permute(2, 0, 1)[None].double() / 255
    tor = F.interpolate(x, size=(h // 4, w // 4), mode="bicubic", antialias=True, align_corners=False)
    tor = tor[0].permute(1, 2, 0).numpy()
    mad_torch = float(np.abs(ours - tor).mean())
    print(f"x1/4 MAD vs PIL: {mad_pil:.3e} ({mad_pil * 255:.3f}/255), "
          f"vs torch antialias: {mad_torch:.3e} ({mad_torch * 255:.4f}/255)")
    assert mad_pil < 1 / 255 and mad_torch < 1 / 255
    # Same a = -0.5 antialiased kernel: away from the borders (where torch renormalises instead of
    # mirroring) the results are identical up to float error.
    assert np.abs(ours - tor)[4:-4, 4:-4].max() < 1e-9
    # x4 upscale: torch's antialias path also uses a = -0.5 -> identical away from the borders
    up = imresize(ours, scale=4)
    tup = F.interpolate(torch.from_numpy(ours).permute(2, 0, 1)[None], scale_factor=4, mode="bicubic",
                        antialias=True, align_corners=False)
    assert np.abs(up - tup[0].permute(1, 2, 0).numpy())[8:-8, 8:-8].max() < 1e-9


def test_bicubic_down_requires_divisible_size():
    with pytest.raises(ValueError, match="721x1280"):
        bicubic_down(np.zeros((721, 1280, 3), np.uint8))
    with pytest.raises(ValueError, match="720x1282"):
        bicubic_down(torch.zeros(3, 720, 1282))
    with pytest.raises(ValueError, match="37x45"):
        bicubic_down(np.zeros((37, 45)), 3)


def test_bad_arguments():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img, scale=2, size=(4, 4))
    for bad in (0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive"):
            imresize(img, scale=bad)
    with pytest.raises(ValueError, match="positive"):
        imresize(img, size=(0, 4))
    with pytest.raises(ValueError, match="2 dims"):
        imresize(torch.zeros(8), scale=2)
    with pytest.raises(ValueError, match="empty"):
        imresize(np.zeros((0, 8)), scale=2)


def test_smaller_scale_dimension_is_resized_first():
    from sdatc.data.imresize import _plan

    assert [p[0] for p in _plan((10, 10), None, (20, 5))] == [-1, -2]  # W shrinks: W first
    assert [p[0] for p in _plan((10, 10), None, (5, 20))] == [-2, -1]
    assert [p[0] for p in _plan((10, 10), 0.5, None)] == [-2, -1]  # tie: rows first

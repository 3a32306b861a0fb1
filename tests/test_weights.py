"""The offline weights folder: where each file goes, check_weights.py's listing, no download."""

import subprocess
import sys
from pathlib import Path

import pytest

from sdatc.utils import sha256_file
from sdatc.weights import METRIC_FILES, SDATC_FILES, check_weights, packaged_copy, resolve_root

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SDATC_WEIGHTS", str(tmp_path / "a"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "b"))
    assert resolve_root(str(tmp_path / "c")) == tmp_path / "c"
    assert resolve_root(None) == tmp_path / "a"
    monkeypatch.delenv("SDATC_WEIGHTS")
    assert resolve_root(None) == tmp_path / "b"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert resolve_root(None) == tmp_path / "x" / "torch"


def test_layout_matches_the_protocol():
    where = {f.name: f.subdir for files in METRIC_FILES.values() for f in files}
    assert where == {
        "LPIPS_v0.1_alex-df73285e.pth": "hub/pyiqa", "DISTS_weights-f5e65c96.pth": "hub/pyiqa",
        "pt_inception-2015-12-05-6726825d.pth": "hub/pyiqa", "niqe_modelparameters.mat": "hub/pyiqa",
        "ckpt_koniq10k.pt": "hub/pyiqa", "alexnet-owt-7be5be79.pth": "hub/checkpoints",
        "vgg16-397923af.pth": "hub/checkpoints", "raft_large_C_T_SKHT_V2-ff5fadd5.pth": "hub/checkpoints",
        "RN50.pt": "hub/clip"}
    from sdatc.models.flow import RAFT_WEIGHTS_NAME
    from sdatc.models.saving import CONFIG_NAME
    from sdatc.models.sdatc import WEIGHTS_NAME

    assert SDATC_FILES == (WEIGHTS_NAME, CONFIG_NAME) and RAFT_WEIGHTS_NAME in where


def test_check_weights_statuses(tmp_path, monkeypatch):
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    copy = packaged_copy("LPIPS_v0.1_alex-df73285e.pth")
    if copy is None:
        pytest.skip("lpips package not installed")
    (tmp_path / "hub" / "pyiqa").mkdir(parents=True)
    (tmp_path / "hub" / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth").write_bytes(copy.read_bytes())
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"not vgg")
    rows = {r["file"]: r for r in check_weights(tmp_path)}
    assert rows["LPIPS_v0.1_alex-df73285e.pth"]["status"] == "present"
    assert rows["LPIPS_v0.1_alex-df73285e.pth"]["sha256"] == sha256_file(copy)
    assert rows["vgg16-397923af.pth"]["status"] == "sha256 mismatch"  # torchvision would reject it
    assert rows["RN50.pt"]["status"] == "missing" and rows["RN50.pt"]["expected_sha256"].startswith("afeb0e10")
    sd_unet = rows["unet/diffusion_pytorch_model.safetensors"]
    assert sd_unet["location"].startswith(str(tmp_path / "stable-diffusion-2-1-base"))
    assert rows["sdatc_modules.safetensors"]["status"] == "missing"
    assert len(rows) == 9 + 9 + 2


def test_check_weights_script(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_weights.py"), "--weights", str(tmp_path),
                        "--json", str(tmp_path / "w.json")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"weights folder: {tmp_path}" in p.stdout and "0 of 20 files present" in p.stdout
    for name in ("ckpt_koniq10k.pt", "RN50.pt", "raft_large_C_T_SKHT_V2-ff5fadd5.pth", "unet/config.json"):
        assert name in p.stdout
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in p.stdout
    assert (tmp_path / "w.json").is_file() and not (tmp_path / "hub").exists()

"""Damaged checkpoints are detected (checksums.json, written last) and a resume falls back to the newest one
that verifies, still bit-exact against an uninterrupted run; metrics.jsonl holds no duplicate or torn rows.

Stage 0 of the tiny config on the real clip of tests/training/conftest.py (a step takes well under a second on a
quiet CPU). The garbage RNG state keeps its size, so only its hash can tell; that a valid RNG state is restored
is test_train.py's stage-1 resume test."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdatc.config import load_config
from sdatc.errors import SdatcError
from sdatc.models.saving import CHECKSUMS_NAME, checksum_problem
from sdatc.training.config import TrainConfig
from sdatc.training.trainer import train

WEIGHTS = "sdatc_modules.safetensors"


def cfg(data_root, out, steps, *overrides) -> TrainConfig:
    return load_config(TrainConfig, "configs/train/tiny_stage0.yaml",
                       [f"data.root={data_root}", f"output_dir={out}", "data.num_workers=0", f"max_steps={steps}",
                        "checkpoint_every=1", "checkpoints_total_limit=null", *overrides])


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b) -> bool:
    x, y = load_file(str(Path(a) / WEIGHTS)), load_file(str(Path(b) / WEIGHTS))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def stopped(data_root, tmp_path_factory):
    """A 2-step run (checkpoints 1 and 2): each test copies it, damages or removes checkpoint-2, and resumes to
    step 2 from checkpoint-1, to compare with the intact checkpoint-2 of this uninterrupted run."""
    out = tmp_path_factory.mktemp("stopped")
    train(cfg(data_root, out, 2), progress=False)
    return out


def _cut_weights(ck: Path):
    f = ck / WEIGHTS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete_optimizer(ck: Path):
    (ck / "optimizer.bin").unlink()


def _flip_weight_bytes(ck: Path):
    f = ck / WEIGHTS
    data = bytearray(f.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the last tensor: the file still loads
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def _garbage_rng(ck: Path):
    f = ck / "random_states_0.pkl"
    f.write_bytes(random.Random(0).randbytes(f.stat().st_size))  # same size: only the hash can tell


DAMAGE = {"cut_weights": (_cut_weights, "sdatc_modules.safetensors has"),
          "missing_optimizer": (_delete_optimizer, "optimizer.bin is missing"),
          "flipped_weights": (_flip_weight_bytes, "sdatc_modules.safetensors differs"),
          "garbage_rng": (_garbage_rng, "random_states_0.pkl differs")}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_and_stays_bit_exact(kind, data_root, stopped, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    damage, why = DAMAGE[kind]
    damage(run / "checkpoint-2")
    assert why in checksum_problem(run / "checkpoint-2")
    capsys.readouterr()
    summary = train(cfg(data_root, run, 2), progress=False)  # resume=latest
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "skipping damaged checkpoint" in line]
    assert len(skipped) == 1 and str(run / "checkpoint-2") in skipped[0] and why in skipped[0]
    assert f"resumed from {run / 'checkpoint-1'} at step 1" in out
    assert summary["step"] == 2
    # step 2 written again equals the uninterrupted run's, and so does the log
    assert same_weights(stopped / "checkpoint-2", run / "checkpoint-2")
    assert checksum_problem(run / "checkpoint-2") is None
    assert [r["step"] for r in rows(run)] == [1, 2]
    assert [r["l1"] for r in rows(run)] == [r["l1"] for r in rows(stopped)]


def test_explicit_damaged_resume_is_one_line_and_none_verifying_is_an_error(data_root, stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    _flip_weight_bytes(run / "checkpoint-2")
    with pytest.raises(SdatcError) as e:
        train(cfg(data_root, run, 3, f"resume={run / 'checkpoint-2'}"), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint-2 is damaged" in msg and "sha256 mismatch" in msg
    _delete_optimizer(run / "checkpoint-1")
    with pytest.raises(SdatcError, match="resume=latest: no checkpoint in .* verifies .*checkpoint-2: .*"
                                         "checkpoint-1: optimizer.bin is missing"):
        train(cfg(data_root, run, 3), progress=False)  # never a silent new run over the old one
    assert not (run / "checkpoint-3").exists()


def test_checkpoint_without_manifest_resumes_unverified(data_root, stopped, tmp_path, capsys):
    """Checkpoints written before the manifest existed still resume (their files all there), with a note."""
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    shutil.rmtree(run / "checkpoint-2")
    (run / "checkpoint-1" / CHECKSUMS_NAME).unlink()
    train(cfg(data_root, run, 2), progress=False)
    out = capsys.readouterr().out
    assert "has no checksums.json" in out and "resuming unverified" in out
    assert f"resumed from {run / 'checkpoint-1'} at step 1" in out
    assert same_weights(stopped / "checkpoint-2", run / "checkpoint-2")


def test_metrics_log_new_run_starts_fresh_and_torn_line_is_dropped(data_root, stopped, tmp_path, capsys):
    # a new run where an old log has no checkpoint behind it: no duplicate rows
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(stopped / "metrics.jsonl", fresh / "metrics.jsonl")
    train(cfg(data_root, fresh, 1), progress=False)
    assert [r["step"] for r in rows(fresh)] == [1]
    assert rows(fresh)[0]["l1"] == rows(stopped)[0]["l1"]
    # a kill mid-write leaves a torn last line: dropped on resume, the log continues
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    shutil.rmtree(run / "checkpoint-2")  # killed after logging step 2, before its checkpoint
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "l1": 0.1')
    capsys.readouterr()
    train(cfg(data_root, run, 2), progress=False)
    assert "dropped 1 line(s) after step 1 and 1 unreadable line(s)" in capsys.readouterr().out
    assert [r["step"] for r in rows(run)] == [1, 2]
    assert [r["l1"] for r in rows(run)] == [r["l1"] for r in rows(stopped)]


def test_init_checkpoint_missing_or_damaged_is_one_line_before_the_run(data_root, stopped, tmp_path, capsys):
    with pytest.raises(SdatcError) as e:
        train(cfg(data_root, tmp_path / "a", 1, f"init=[{tmp_path / 'runs' / 'checkpoint-9'}]"), progress=False)
    assert "\n" not in str(e.value) and "init checkpoint not found" in str(e.value)
    assert "starting a new run" not in capsys.readouterr().out  # checked before anything starts
    bad = tmp_path / "bad"
    shutil.copytree(stopped / "checkpoint-2", bad)
    _flip_weight_bytes(bad)
    with pytest.raises(SdatcError, match=f"damaged checkpoint {bad}: sdatc_modules.safetensors differs"):
        train(cfg(data_root, tmp_path / "b", 1, f"init=[{bad}]"), progress=False)


def test_stage2_latents_with_missing_init_is_one_line(tmp_path):
    from sdatc.training.latents import generate

    c = load_config(TrainConfig, "configs/train/tiny_stage2.yaml",
                    [f"init=[{tmp_path / 'runs' / 'stage1' / 'checkpoint-100'}]", f"latents.dir={tmp_path / 'lat'}"])
    with pytest.raises(SdatcError, match="init checkpoint not found: .*checkpoint-100 does not exist"):
        generate(c, progress=False)


def test_infer_verifies_the_checkpoint(stopped, tmp_path, capsys):
    """infer.py checkpoint=: a damaged folder is a one-line error; one without checksums.json loads, said unverified."""
    from sdatc.inference import InferConfig, build_model

    good = stopped / "checkpoint-2"
    build_model(InferConfig(mode="dcm", checkpoint=str(good)))
    assert "unverified" not in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    _flip_weight_bytes(bad)
    with pytest.raises(SdatcError) as e:
        build_model(InferConfig(mode="dcm", checkpoint=str(bad)))
    assert "\n" not in str(e.value) and f"damaged checkpoint {bad}: sdatc_modules.safetensors differs" in str(e.value)
    with pytest.raises(SdatcError, match="damaged checkpoint"):  # the file given directly: its folder's manifest
        build_model(InferConfig(mode="dcm", checkpoint=str(bad / WEIGHTS)))
    (bad / CHECKSUMS_NAME).unlink()
    shutil.copy(good / WEIGHTS, bad / WEIGHTS)
    build_model(InferConfig(mode="dcm", checkpoint=str(bad)))
    assert "loaded unverified" in capsys.readouterr().out
    # the shipped preview model is verified
    build_model(InferConfig(mode="dcm", checkpoint="assets/preview", model_config="configs/model/preview.yaml"))
    assert "unverified" not in capsys.readouterr().out
    assert checksum_problem("assets/preview") is None

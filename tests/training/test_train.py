"""Training on a real clip (bigbuckbunny crops, degraded on the fly) with the tiny configs: every stage
runs, checkpoints resume exactly (also after a kill), frozen weights stay frozen, two CPU processes run
real DDP, and bad input fails before any compute."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ci_switches import (
    SUITE_OVERRIDES,  # tests/ci_switches.py: the suite's one departure from the configs
)
from safetensors.torch import load_file

from sdatc.config import load_config
from sdatc.errors import SdatcError
from sdatc.training.config import TrainConfig
from sdatc.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "scripts" / "train.py"


def cfg_for(stage: int, data_root, out, *overrides) -> TrainConfig:
    config = f"configs/train/tiny_stage{stage}.yaml"
    return load_config(TrainConfig, config, [*SUITE_OVERRIDES.get(config, []), f"data.root={data_root}",
                                             f"output_dir={out}", "data.num_workers=0", *overrides])


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "sdatc_modules.safetensors"))


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_every_stage_trains_and_writes_a_checkpoint(stage, data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    summary = train(cfg_for(stage, data_root, tmp_path, "max_steps=3", "checkpoint_every=2", "log_every=1"),
                    progress=False)
    assert summary["step"] == 3
    log = rows(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3]
    expected = {0: {"l1"}, 1: {"eps_mse", "dcm_l1"}, 2: {"l1", "lpips", "frame_diff", "gan", "disc"}}[stage]
    assert expected <= set(log[-1]) and all(k in log[-1] for k in ("lr", "grad_norm", "sec_per_step", "samples_per_s"))
    assert log[-1]["effective_batch"] == 2
    ckpts = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-3"] and not list(tmp_path.glob(".checkpoint-*"))
    ck = tmp_path / "checkpoint-3"
    for f in ("config.yaml", "train_config.yaml", "info.json", "optimizer.bin", "random_states_0.pkl"):
        assert (ck / f).is_file(), f
    saved = weights(ck)

    def group(key):  # the module group of a saved key (keys are module paths)
        return next((g for g in ("capm", "stam", "cfw") if f".{g}." in key), key.split(".")[0]).replace(
            "capm", "capm_unet" if key.startswith("unet.") else "capm_vae")

    prefixes = {group(k) for k in saved}
    assert prefixes == ({"dcm"} if stage == 0 else {"dcm", "guidance", "capm_unet", "capm_vae", "stam", "cfw"})
    if stage:
        assert summary["frozen_weights_unchanged"] is True
        # only this stage's modules moved away from their (seeded) initial values
        start = weights(tmp_path / "checkpoint-2")
        trained = {0: (), 1: ("dcm", "guidance", "capm_unet"), 2: ("cfw", "stam", "capm_vae")}[stage]
        changed = {group(k) for k in saved if not torch.equal(saved[k], start[k])}
        assert changed == set(trained)


def test_resume_matches_an_uninterrupted_run(data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    full, split = tmp_path / "full", tmp_path / "split"
    train(cfg_for(1, data_root, full, "max_steps=4", "checkpoint_every=2", "log_every=1"), progress=False)
    train(cfg_for(1, data_root, split, "max_steps=2", "checkpoint_every=2", "log_every=1"), progress=False)
    summary = train(cfg_for(1, data_root, split, "max_steps=4", "checkpoint_every=2", "log_every=1"),
                    progress=False)  # resume=latest
    assert summary["step"] == 4
    assert [r["step"] for r in rows(split)] == [1, 2, 3, 4]
    # in order, so that a failure says where the runs parted: before the checkpoint (the same steps in one process
    # gave other numbers) or after it (the resume restored something else)
    for step in (2, 4):
        a, b = weights(full / f"checkpoint-{step}"), weights(split / f"checkpoint-{step}")
        assert a.keys() == b.keys()
        differ = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
        assert not differ, (f"checkpoint-{step}: {len(differ)} of {len(a)} tensors differ (max |diff| per tensor, "
                            f"first 5: {dict(list(differ.items())[:5])}); "
                            f"eps_mse full {[r['eps_mse'] for r in rows(full)]} "
                            f"split {[r['eps_mse'] for r in rows(split)]}; {torch.backends.cpu.get_cpu_capability()}, "
                            f"{torch.get_num_threads()} threads")
    assert [r["eps_mse"] for r in rows(split)] == [r["eps_mse"] for r in rows(full)]  # the loss curve continues


def test_killed_run_resumes_from_last_complete_checkpoint(data_root, tmp_path):
    """Train 20 steps with a checkpoint at 10; SIGKILL after it; resume from 10; step 20 equals an uninterrupted run."""
    args = [sys.executable, str(TRAIN), "--config", "configs/train/tiny_stage0.yaml", f"data.root={data_root}",
            "max_steps=20", "checkpoint_every=10", "data.num_workers=0", "log_every=1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ref = subprocess.run([*args, f"output_dir={tmp_path / 'ref'}"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "killed"
    p = subprocess.Popen([*args, f"output_dir={run}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd=ROOT, env=env)
    deadline = time.time() + 300
    while not (run / "checkpoint-10").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (run / "checkpoint-10").exists() and not (run / "checkpoint-20").exists()
    done = subprocess.run([*args, f"output_dir={run}"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    a, b = weights(tmp_path / "ref" / "checkpoint-20"), weights(run / "checkpoint-20")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in rows(run)] == list(range(1, 21))


def test_two_processes_run_real_ddp(data_root, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN),
              "--config", "configs/train/tiny_stage0.yaml", f"data.root={data_root}", "data.num_workers=0",
              "log_rank_checksums=true", "checkpoint_every=100"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([*launch, f"output_dir={tmp_path / 'ok'}", "max_steps=3", "batch_size=4"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = ([json.loads(x) for x in (tmp_path / "ok" / "ranks" / f"rank{r}.jsonl").read_text().splitlines()]
              for r in (0, 1))
    assert [x["world_size"] for x in r0 + r1] == [2] * 6
    for a, b in zip(r0, r1):
        assert not set(a["indices"]) & set(b["indices"])  # different samples on each rank
        assert a["weights"] == b["weights"]  # identical weights after every step (gradients all-reduced)
    assert sorted(sum((x["indices"] for x in r0 + r1), [])) == list(range(12))
    assert "effective batch 4" in p.stdout
    bad = subprocess.run([*launch, f"output_dir={tmp_path / 'bad'}", "max_steps=1", "batch_size=3"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert bad.returncode != 0 and "batch_size 3 is not divisible across 2 processes" in bad.stderr
    assert not list((tmp_path / "bad").glob("checkpoint-*"))


def test_validation_and_overfitting_one_clip(data_root, tmp_path):
    """Stage 0 over-fits one 5-frame clip: the validation PSNR-Y of the DCM output climbs by several dB."""
    val_root = tmp_path / "val"
    (val_root).mkdir()
    os.symlink(data_root / "bunny", val_root / "bunny")
    cfg = cfg_for(0, data_root, tmp_path / "run", "max_steps=60", "checkpoint_every=60", "val.clip=bunny",
                  f"val.root={val_root}", "val.every=1", "val.gt_size=null", "data.flip=false",
                  "data.temporal_reverse=false", "batch_size=1", "data.gt_size=64", "optim.lr=2e-3")
    train(cfg, progress=False)
    vals = [r for r in rows(tmp_path / "run") if "val_psnr_y" in r]
    assert [v["step"] for v in vals] == list(range(1, 61))
    assert load_config(TrainConfig, tmp_path / "run" / "config.yaml").val.clip == "bunny"  # resolved config saved
    assert Path(vals[-1]["val_picture"]).is_file()
    assert vals[-1]["val_psnr_y"] > vals[0]["val_psnr_y"] + 5  # several dB up on the clip it trains on


def test_bad_input_fails_before_compute(data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    with pytest.raises(SdatcError, match="data.root not found"):
        train(cfg_for(0, tmp_path / "nope", tmp_path / "o1"), progress=False)
    with pytest.raises(SdatcError, match="smaller than the 256x256 crop"):
        train(cfg_for(0, data_root, tmp_path / "o2", "data.gt_size=256"), progress=False)
    with pytest.raises(SdatcError, match="fewer than 7 frames"):
        train(cfg_for(0, data_root, tmp_path / "o3", "data.num_frames=7"), progress=False)
    with pytest.raises(SdatcError, match="resume checkpoint not found"):
        train(cfg_for(0, data_root, tmp_path / "o4", f"resume={tmp_path / 'missing'}"), progress=False)
    with pytest.raises(SdatcError, match="no SD 2.1 weights"):
        train(cfg_for(1, data_root, tmp_path / "o5", "allow_random_weights=false"), progress=False)
    train(cfg_for(0, data_root, tmp_path / "o6", "max_steps=1"), progress=False)
    with pytest.raises(SdatcError, match="another config"):
        train(cfg_for(0, data_root, tmp_path / "o6", "max_steps=2", "model_overrides=[dcm.embed_dim=24]"),
              progress=False)
    with pytest.raises(SdatcError, match="init checkpoint not found"):
        train(cfg_for(1, data_root, tmp_path / "o7", f"init=[{tmp_path / 'nothing'}]"), progress=False)
    for o in ("o1", "o2", "o3", "o4", "o5", "o7"):
        assert not list((tmp_path / o).glob("checkpoint-*"))

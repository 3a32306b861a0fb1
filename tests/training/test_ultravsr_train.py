"""UltraVSR training (system: ultravsr) on a real clip with the tiny config: every loss term (VSD with its
fake score, temporal GAN), exact resume, two DDP processes, the SDATC teacher (bf16 with the full config's
flags: tests/training/test_run_integrity.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdatc.config import load_config
from sdatc.training.config import TrainConfig
from sdatc.training.latents import generate
from sdatc.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
FAST = ["data.num_workers=0", "data.gt_size=32", "data.num_frames=3", "checkpoint_every=2"]


def ucfg(data_root, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, "configs/train/tiny_ultravsr.yaml",
                       [f"data.root={data_root}", f"output_dir={out}", *FAST, *overrides])


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def modules(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "ultravsr_modules.safetensors"))


def test_vsd_and_gan_train_and_resume_exactly(data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    full, split = tmp_path / "full", tmp_path / "split"
    summary = train(ucfg(data_root, full, "max_steps=4"), progress=False)
    assert summary["frozen_weights_unchanged"] is True
    log = rows(full)
    assert {"mse", "lpips", "frame_diff", "distill", "fake_score"} <= set(log[0])
    assert {"gan", "disc"} <= set(log[-1])  # from gan_start_step 2
    start, end = modules(full / "checkpoint-2"), modules(full / "checkpoint-4")
    groups = {"rts_unet": ".rts.", "rts_vae": "vae.", "lora_unet": "unet.", "conv_in": "conv_in.base_layer"}
    for name, key in groups.items():  # every group moved (the zero-initialised outputs too)
        assert any(not torch.equal(start[k], end[k]) for k in end if key in k), name
    assert not any("decoder" in k and "lora_" in k for k in end)
    # resume: 2 steps, then 2 more from checkpoint-2, equal to the uninterrupted run (generator and fake score)
    train(ucfg(data_root, split, "max_steps=2"), progress=False)
    train(ucfg(data_root, split, "max_steps=4"), progress=False)
    a, b = modules(full / "checkpoint-4"), modules(split / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = (load_file(str(p / "checkpoint-4" / "model.safetensors")) for p in (full, split))  # the fake score
    assert any(".lora_" in k for k in fa) and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert [r["total"] for r in rows(split)] == [r["total"] for r in log]


def test_teacher_sdatc_distils_its_latents(data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    s1 = tmp_path / "s1"
    train(load_config(TrainConfig, "configs/train/tiny_stage1.yaml", [f"data.root={data_root}", f"output_dir={s1}",
                      *FAST, "max_steps=1"]), progress=False)
    lat = tmp_path / "lat"
    gen = load_config(TrainConfig, "configs/train/tiny_stage2.yaml", [
        f"data.root={data_root}", *FAST, f"init=[{s1 / 'checkpoint-1'}]", f"latents.dir={lat}",
        "latents.num_samples=2", "latents.steps=2", "latents.shard_size=2", "latent_source=generated"])
    generate(gen, progress=False)
    out = tmp_path / "uv"
    train(ucfg(data_root, out, "max_steps=2", "ultravsr.teacher=sdatc", f"latents.dir={lat}", "loss.gan=0"),
          progress=False)
    log = rows(out)
    assert all("distill" in r and "fake_score" not in r for r in log) and log[0]["distill"] > 0


def test_two_processes_run_real_ddp(data_root, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(ROOT / "scripts" / "train.py"), "--config", "configs/train/tiny_ultravsr.yaml",
              f"data.root={data_root}", *FAST, "log_rank_checksums=true", f"output_dir={tmp_path}", "max_steps=2",
              "batch_size=2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(launch, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = ([json.loads(x) for x in (tmp_path / "ranks" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1))
    assert [x["world_size"] for x in r0 + r1] == [2] * 4
    for a, b in zip(r0, r1):
        assert not set(a["indices"]) & set(b["indices"]) and a["weights"] == b["weights"]

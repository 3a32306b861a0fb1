"""scripts/bench_gpu.sh in its tiny CPU mode (the GPU run's flow: one process per configuration under
its own timeout, a JSON each, errors recorded, a summary) and the benchmark's FLOP and count fields."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdatc.pipelines.tiling import tile_starts

ROOT = Path(__file__).resolve().parents[1]

FIELDS = [
    "input", "output", "frames", "frames_out", "mode", "seconds_per_frame", "seconds_total", "peak_memory_mb",
    "memory_kind", "unet_calls_per_frame", "unet_batches_per_frame", "unet_evals", "steps", "window",
    "window_factor", "tiles_per_frame_step", "tiling", "useful_tflop_per_frame", "denoiser_tflop_per_frame",
    "executed_tflop_per_frame", "executed_tflop_total", "executed_tflop_stages_per_frame",
    "denoise_step_tflop_by_tile", "flops_stages", "flow_guidance", "warmup_steps", "denoiser_seconds",
    "achieved_tflops", "denoiser_achieved_tflops", "device", "dtype", "weights_dtype", "compile", "threads", "torch",
    "peak_tflops", "peak_source", "mfu", "denoiser_mfu", "matmul_bf16_tflops", "mfu_vs_matmul",
    "name", "config", "overrides", "timeout_s", "elapsed_s", "error",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run, latent tiles forced (16x24 latent, tiles of 16 with overlap 8: two per frame),
    and a configuration whose 1-s timeout must end in a recorded error."""
    out = tmp_path_factory.mktemp("bench_gpu")
    env = {**os.environ, "SDATC_BENCH_TINY": "1", "SDATC_BENCH_OUT": str(out), "PYTHON": sys.executable,
           "SDATC_BENCH_SET": "pipeline.tiling.mode=on pipeline.tiling.latent_tile=16 pipeline.tiling.latent_overlap=8"}
    p = subprocess.run(["bash", "scripts/bench_gpu.sh", "eager-s2:2:false:300", "late:2:false:1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p.stdout


def test_tiny_run_writes_every_field(tiny_run):
    out, stdout = tiny_run
    r = json.loads((out / "eager-s2.json").read_text())
    assert not r["error"], r
    missing = [k for k in FIELDS if k not in r]
    assert not missing, missing
    assert r["name"] == "eager-s2" and r["input"] == [32, 48] and r["output"] == [128, 192]
    assert r["frames"] == r["frames_out"] == 2 and r["steps"] == 2 and r["compile"] is False
    assert r["device"] and r["dtype"] == r["weights_dtype"] == "float32"
    assert r["flow_guidance"] is False and r["warmup_steps"] == 2
    assert r["seconds_per_frame"] > 0 and r["peak_memory_mb"] > 0 and r["elapsed_s"] >= r["seconds_total"]
    assert r["mfu"] is None and r["peak_tflops"] is None  # no peak on the CPU


def test_tiny_run_counts_and_flops(tiny_run):
    out, _ = tiny_run
    r = json.loads((out / "eager-s2.json").read_text())
    # the padded latent is 16x24; latent tiles of 16 (overlap 8, aligned to the UNet's factor 2): 1 x 2 tiles
    lat_h, lat_w = (x * 4 // 8 for x in r["flops_stages"]["lr_padded"])
    assert (lat_h, lat_w) == (16, 24)
    tiles = len(tile_starts(lat_h, 16, 8, 2)) * len(tile_starts(lat_w, 16, 8, 2))
    assert tiles == 2 and r["unet_evals"] == {"16x16": r["frames"] * r["steps"] * tiles}
    assert r["window_factor"] == 1.0 and r["tiles_per_frame_step"] == tiles
    assert r["unet_calls_per_frame"] == r["steps"] * r["window_factor"] * tiles
    assert 0 < r["unet_batches_per_frame"] <= r["unet_calls_per_frame"]
    per_tile = r["denoise_step_tflop_by_tile"]["16x16"]
    assert math.isclose(r["denoiser_tflop_per_frame"], r["steps"] * tiles * per_tile, rel_tol=1e-9)
    assert math.isclose(r["useful_tflop_per_frame"], r["steps"] * r["flops_stages"]["denoise_step"] / 1e12,
                        rel_tol=1e-9)
    assert r["denoiser_tflop_per_frame"] > r["useful_tflop_per_frame"] > 0  # 2 x 16x16 > 16x24
    stages = r["executed_tflop_stages_per_frame"]
    assert math.isclose(r["executed_tflop_per_frame"], sum(stages.values()), rel_tol=1e-9)
    assert r["executed_tflop_per_frame"] >= r["useful_tflop_per_frame"]
    assert math.isclose(r["executed_tflop_total"], r["executed_tflop_per_frame"] * r["frames"], rel_tol=1e-9)
    assert math.isclose(r["achieved_tflops"], r["executed_tflop_total"] / r["seconds_total"], rel_tol=1e-9)
    assert 0 < r["denoiser_seconds"] < r["seconds_total"]
    assert math.isclose(r["denoiser_achieved_tflops"],
                        r["denoiser_tflop_per_frame"] * r["frames"] / r["denoiser_seconds"], rel_tol=1e-9)


def test_tiny_run_records_a_failed_configuration_and_a_summary(tiny_run):
    out, stdout = tiny_run
    late = json.loads((out / "late.json").read_text())
    assert late["timed_out"] is True and late["rc"] in (124, 137) and "timed out after 1 s" in late["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == ["eager-s2", "late"]
    assert summary["runs"]["eager-s2"]["error"] is None and summary["runs"]["late"]["error"] == late["error"]
    assert summary["config"] == "configs/infer/tiny.yaml" and summary["frames"] == 2
    assert (out / "bench_gpu.log").is_file() and "summary" in stdout


def test_known_gpu_peaks():
    from sdatc.benchmark import known_bf16_peak

    assert known_bf16_peak("NVIDIA H200") == 989 and known_bf16_peak("NVIDIA H100 80GB HBM3") == 989
    assert known_bf16_peak("NVIDIA H100 PCIe") == 756 and known_bf16_peak("NVIDIA A100-SXM4-80GB") == 312
    assert known_bf16_peak("NVIDIA A10") == 125 and known_bf16_peak("NVIDIA L40S") == 362
    assert known_bf16_peak("NVIDIA GeForce RTX 4090") == 165 and known_bf16_peak("NVIDIA B200") is None


def test_mfu_uses_the_table_else_the_measured_matmul(monkeypatch):
    import sdatc.benchmark as b

    monkeypatch.setattr(b, "measure_bf16_matmul_tflops", lambda device: 800.0)
    r = {"device": "NVIDIA H200", "achieved_tflops": 98.9, "denoiser_achieved_tflops": 197.8}
    f = b.mfu_fields(r, None)
    assert f["peak_tflops"] == 989 and "datasheet" in f["peak_source"] and f["matmul_bf16_tflops"] == 800
    assert math.isclose(f["mfu"], 0.1) and math.isclose(f["denoiser_mfu"], 0.2)
    assert math.isclose(f["mfu_vs_matmul"], 98.9 / 800)
    f = b.mfu_fields({**r, "device": "Some Future GPU", "denoiser_achieved_tflops": None}, None)
    assert f["peak_tflops"] == 800 and f["peak_source"].startswith("measured") and f["denoiser_mfu"] is None

"""scripts/gpu_check.sh in its tiny CPU mode: the GPU check's flow (stage 1, stage 2 and UltraVSR trained
2 steps with bf16, gradient checkpointing and EMA, each resumed once; SDATC and UltraVSR inference untiled and
with forced tiles), one process per step under its own timeout, one JSON of outcomes; and the driver's
handling of a failing and a hanging step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

STEPS = ["stage1", "stage1-resume", "stage2", "stage2-resume", "ultravsr", "ultravsr-resume",
         "infer-sdatc", "infer-sdatc-tiled", "infer-ultravsr", "infer-ultravsr-tiled"]
ROW_KEYS = ["name", "kind", "command", "outcome", "error", "seconds", "rc", "timeout_s", "memory_kind",
            "peak_gpu_memory_mb", "peak_rss_mb", "device", "output_dir"]


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, work = tmp / "out", tmp / "work"
    env = {**os.environ, "SDATC_GPU_CHECK_TINY": "1", "SDATC_GPU_CHECK_OUT": str(out),
           "SDATC_GPU_CHECK_WORK": str(work), "SDATC_GPU_CHECK_KEEP": "1", "SDATC_GPU_CHECK_BUDGET": "1500",
           "PYTHON": sys.executable}
    p = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1800)
    r = json.loads((out / "gpu_check.json").read_text())
    assert p.returncode == (0 if r["ok"] else 1), p.stdout + p.stderr
    return r, out, work, p.stdout


def _steps(r):
    return {s["name"]: s for s in r["steps"]}


def _path(p: str, work: Path) -> Path:
    return Path(p.replace("$WORK", str(work)))


def test_the_json_has_every_step_and_field(tiny_check):
    r, out, work, stdout = tiny_check
    assert r["gpu_check"] == 1 and r["mode"] == "tiny" and r["complete"] is True
    assert [s["name"] for s in r["steps"]] == STEPS and list(r["outcomes"]) == STEPS
    assert r["device"] == "cpu" and r["torch"] and r["packages"]["diffusers"] and r["wall_s"] > 0
    assert r["launch"] == "fork" and r["preload_s"] > 0 and any("launch fork" in n for n in r["notes"])
    assert "bigbuckbunny" in r["data"]["source"] and r["data"]["infer_input_size"] == [5, 48, 80]
    assert any("ema=true" in n for n in r["notes"]) and any("gt_noise" in n for n in r["notes"])
    for s in r["steps"]:
        if s["outcome"] == "skipped":
            assert s["error"].startswith("skipped: ")
            continue
        missing = [k for k in ROW_KEYS if k not in s]
        assert not missing, (s["name"], missing)
        script = "train.py" if s["kind"] in ("train", "resume") else "infer.py"
        assert s["command"].startswith(f"python scripts/{script} --config configs/"), s["command"]
        assert s["memory_kind"] == "peak_rss" and s["peak_rss_mb"] > 0 and s["peak_gpu_memory_mb"] is None
        assert 0 < s["seconds"] <= s["timeout_s"] + 30
        assert (s["outcome"] == "ok") == (s["rc"] == 0 and s["error"] is None)
    assert (out / "gpu_check.log").is_file() and "gpu_check:" in stdout


@pytest.mark.parametrize("name", STEPS)
def test_every_step_succeeds(tiny_check, name):
    r, *_ = tiny_check
    step = _steps(r)[name]
    assert step["outcome"] == "ok", step


@pytest.mark.parametrize("system", ["stage1", "stage2", "ultravsr"])
def test_training_runs_the_users_flags_checkpoints_and_resumes(tiny_check, system):
    r, out, work, _ = tiny_check
    first, again = _steps(r)[system], _steps(r)[f"{system}-resume"]
    for step in (first, again):
        assert step["outcome"] == "ok", step
        assert step["flags"] == {"mixed_precision": "bf16", "gradient_checkpointing": True, "ema": True}
        assert step["precision"] == "bf16" and step["frozen_weights_unchanged"] is True
        assert step["ema_saved"] is True
        assert "mixed_precision=bf16" in step["command"] and "ema=true" in step["command"]
    assert first["steps_logged"] == [1, 2] and first["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
    assert again["resumed_from"] == "$WORK/" + f"{system}/checkpoint-1" and again["resumed_at_step"] == 1
    assert again["steps_logged"] == [2] and again["checkpoints"] == ["checkpoint-2"] and again["continued"] is True
    assert math.isfinite(again["step2_total_resumed"]) and math.isfinite(again["step2_total_first_run"])
    assert (_path(again["output_dir"], work) / "checkpoint-2" / "ema").is_dir()


@pytest.mark.parametrize("mode", ["sdatc", "ultravsr"])
def test_inference_untiled_and_forced_tiles_write_4x(tiny_check, mode):
    from sdatc.data.video import VideoReader

    r, out, work, _ = tiny_check
    untiled, tiled = _steps(r)[f"infer-{mode}"], _steps(r)[f"infer-{mode}-tiled"]
    assert untiled["outcome"] == tiled["outcome"] == "ok", (untiled, tiled)
    assert "tiling.mode=off" in untiled["command"] and "tiling.mode=on" in tiled["command"]
    for step in (untiled, tiled):
        mp4 = _path(step["output"], work)
        reader = VideoReader(mp4)
        assert len(reader) == step["output_frames"] == 5
        assert (reader.meta.height, reader.meta.width) == tuple(step["output_size"]) == (192, 320)
        assert step["input_size"] == [48, 80] and step["scale_ok"] is True
    # forced tiles change a random model's output (tile-local attention), so the tiled path did run
    assert tiled["mean_abs_diff_vs_untiled"] > 0
    trained = _steps(r)["stage2-resume" if mode == "sdatc" else "ultravsr-resume"]
    if trained["outcome"] == "ok":  # the restored clip used the run's own checkpoint
        assert untiled["checkpoint"] == tiled["checkpoint"] == trained["output_dir"] + "/checkpoint-2"
        assert f"checkpoint={trained['output_dir']}/checkpoint-2" in untiled["command"]
    else:
        assert untiled["checkpoint"] is None and "checkpoint=" not in untiled["command"]


@pytest.mark.parametrize("launch", ["exec", "fork"])
def test_a_failing_and_a_hanging_step_are_recorded(tmp_path, launch):
    """The driver's own handling, without the models: a script that raises gives outcome error with its
    error line; one that hangs is killed (with its process group) at the timeout. Both ways of starting a
    step: a new interpreter (the GPU run's) and a fork of the driver (the tiny mode's)."""
    (tmp_path / "boom.py").write_text("import sys\nprint('working', file=sys.stderr)\nraise RuntimeError('boom 42')\n")
    (tmp_path / "hang.py").write_text("import subprocess, sys, time\n"
                                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                                      "time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    boom = gpu_check.run_step(gpu_check.Step("boom", "infer", str(tmp_path / "boom.py"), ["a=1"], 60), 60,
                              tmp_path, env, launch)
    assert boom["outcome"] == "error" and boom["rc"] == 1 and boom["error"] == "RuntimeError: boom 42"
    assert boom["command"] == f"python {tmp_path / 'boom.py'} a=1" and boom["memory_kind"] == "peak_rss"
    assert boom["peak_rss_mb"] > 0 and "working" in boom["stderr_tail"]
    hang = gpu_check.run_step(gpu_check.Step("hang", "infer", str(tmp_path / "hang.py"), [], 3), 3, tmp_path, env,
                              launch)
    assert hang["outcome"] == "timeout" and hang["rc"] == 124 and hang["error"] == "timed out after 3 s"
    assert hang["seconds"] < 30


def test_error_line_picks_the_error_over_progress_bars_and_warnings():
    text = ("stage 1:  50%|#####     | 1/2 [00:03<00:03]\r stage 1: 100%|##########| 2/2\n"
            "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
            "AttributeError: 'UNetMidBlock2D' object has no attribute 'x'\n"
            "/site/accelerate/state.py:10: UserWarning: something at exit\n  warnings.warn(\n")
    assert gpu_check.error_line(text) == "AttributeError: 'UNetMidBlock2D' object has no attribute 'x'"
    assert gpu_check.error_line("error: data.root is not set\n") == "error: data.root is not set"
    assert gpu_check.error_line("just a line\n\n") == "just a line" and gpu_check.error_line("") is None

"""scripts/infer.py as a user runs it: tiny model, 2 steps, on the real sample clip (x4 down, CRF 25)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdatc.data.imresize import bicubic_down
from sdatc.data.video import VideoReader, read_video, write_video

ROOT = Path(__file__).resolve().parents[1]
INFER = ROOT / "scripts" / "infer.py"
TINY = ROOT / "configs" / "infer" / "tiny.yaml"


def infer(*args, env=None, launcher=None):
    """infer.py with the tiny config in a new process (as a shell runs it)."""
    cmd = [*(launcher or [sys.executable]), str(INFER), "--config", str(TINY), *map(str, args), "overwrite=false"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


@pytest.fixture
def infer_here(run_script):
    """infer.py with the tiny config, its main run in this process (tests/conftest.py::run_script)."""
    return lambda *args: run_script("infer.py", "--config", TINY, *args, "overwrite=false")


@pytest.fixture(scope="module")
def lq_clip(tmp_path_factory, sample_video_path):
    """7 frames of bigbuckbunny (its central 320x192, to keep CPU time low), bicubic x1/4 (80x48),
    x264 CRF 25, with the source's audio."""
    frames = read_video(sample_video_path, max_frames=7)[:, 264:456, 480:800]
    lr = np.stack([bicubic_down(f, 4) for f in frames])
    path = tmp_path_factory.mktemp("lq") / "bunny.mp4"
    write_video(path, lr, fps=VideoReader(sample_video_path).meta.rate, crf=25, audio_from=sample_video_path)
    return path


def test_infer_clip_rerun_and_overwrite(lq_clip, tmp_path, infer_here, run_script):
    out = tmp_path / "out"
    p = infer_here("--input", lq_clip, "--output", out, "save_frames=true")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 done, 0 skipped" in p.stdout
    m = VideoReader(out / "bunny.mp4").meta
    src = VideoReader(lq_clip).meta
    assert (m.num_frames, m.width, m.height) == (7, 320, 192) and m.fps == pytest.approx(src.fps)
    assert m.has_audio  # the input's audio is copied
    assert sorted(p.name for p in (out / "bunny").iterdir()) == [f"{i:08d}.png" for i in range(7)]
    assert read_video(out / "bunny", max_frames=1).shape == (1, 192, 320, 3)
    assert not [p for p in out.rglob(".*")], "temporary files left"
    mtime = (out / "bunny.mp4").stat().st_mtime_ns
    p = infer_here("--input", lq_clip, "--output", out, "save_frames=true")
    assert p.returncode == 0 and "0 done, 1 skipped" in p.stdout
    assert (out / "bunny.mp4").stat().st_mtime_ns == mtime
    p = run_script("infer.py", "--config", TINY, "--input", lq_clip, "--output", out, "overwrite=true",
                   "copy_audio=false")
    assert p.returncode == 0 and "1 done" in p.stdout
    assert (out / "bunny.mp4").stat().st_mtime_ns != mtime and not VideoReader(out / "bunny.mp4").meta.has_audio


def test_folder_with_bad_clip_and_stray_files(lq_clip, tmp_path, carphone_frames, infer_here):
    clips = tmp_path / "clips"
    clips.mkdir()
    write_video(clips / "car.mp4", carphone_frames[:3, :48, :64], fps=10, crf=25)  # short clip, < window
    (clips / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    (clips / "notes.txt").write_text("not a clip")
    out = tmp_path / "out"
    p = infer_here("--input", clips, "--output", out)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "skipped 1 entries" in p.stdout and "notes.txt" in p.stdout
    assert re.search(r"1 done, 0 skipped .*1 failed", p.stdout)
    assert re.search(r"broken: failed .*not a readable video", p.stdout)
    assert VideoReader(out / "car.mp4").meta.num_frames == 3 and not (out / "broken.mp4").exists()
    assert not [p for p in out.rglob(".*")]


def test_bad_inputs(tmp_path, lq_clip, infer_here, run_script, monkeypatch):
    """Each a one-line error and exit 2 (in this process; test_dcm_mode_and_default_config and
    tests/test_input_safety.py see the exit status of a new process)."""
    (tmp_path / "empty").mkdir()
    p = infer_here("--input", tmp_path / "empty", "--output", tmp_path / "o")
    assert p.returncode == 2 and "no clips" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0
    p = infer_here("--input", tmp_path, "--output", tmp_path / "inside")
    assert p.returncode == 2 and "must not be inside the input" in p.stderr
    full = ROOT / "configs" / "infer" / "sdatc.yaml"
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    p = run_script("infer.py", "--config", full, "--input", lq_clip, "--output", tmp_path / "o2")
    assert p.returncode == 2 and "no SD 2.1 weights: set pretrained=PATH" in p.stderr
    p = infer_here("--input", lq_clip, "--output", tmp_path / "o3", f"checkpoint={tmp_path / 'nope'}")
    assert p.returncode == 2 and "checkpoint not found" in p.stderr
    assert not (tmp_path / "o2").exists() and not list((tmp_path / "o3").glob("*.mp4"))


def test_two_processes_shard_clips(tmp_path, carphone_frames):
    clips = tmp_path / "clips"
    for i in range(3):
        write_video(clips / f"c{i}.mp4", carphone_frames[i:i + 2, :32, :48], fps=10, crf=25)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    p = infer("--input", clips, "--output", tmp_path / "out", env={"ACCELERATE_USE_CPU": "1"}, launcher=launcher)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("3 done, 0 skipped") == 1  # only rank 0 prints the summary of both
    done = re.findall(r"(c\d): done \(rank (\d)\)", p.stdout)
    assert sorted(c for c, _ in done) == ["c0", "c1", "c2"]  # each clip once (the ranks claim them as they go)
    assert all(VideoReader(tmp_path / "out" / f"c{i}.mp4").meta.num_frames == 2 for i in range(3))


def test_dcm_mode_and_default_config(lq_clip, tmp_path, run_script, monkeypatch):
    """mode=dcm (the preview model's path) with an untrained DCM, and the error without weights."""
    preview = ROOT / "configs" / "infer" / "preview.yaml"
    args = ["--config", preview, "--input", lq_clip, "--output", tmp_path / "o"]
    p = run_script("infer.py", *args, "checkpoint=null", "allow_random_weights=true", "pipeline.tiling.dcm_tile=64")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "model: DCM only" in p.stdout and "untrained" in p.stdout
    m = VideoReader(tmp_path / "o" / "bunny.mp4").meta
    assert (m.num_frames, m.width, m.height) == (7, 320, 192)
    p = run_script("infer.py", *args[:-1], tmp_path / "o2", "checkpoint=null")
    assert p.returncode == 2 and "no DCM weights: set checkpoint=PATH" in p.stderr
    assert not list((tmp_path / "o2").glob("*.mp4"))
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    p = run_script("infer.py", "--input", lq_clip, "--output", tmp_path / "d", "checkpoint=null",
                   "allow_random_weights=true")
    assert p.returncode == 0 and "config: configs/infer/preview.yaml (the default" in p.stdout, p.stderr[-2000:]


def test_bicubic_mode_equals_the_baseline(lq_clip, tmp_path):
    """In a new process, as a user runs it (the exit status a shell sees)."""
    from sdatc.data.imresize import bicubic_up

    p = subprocess.run([sys.executable, str(INFER), "--config", str(ROOT / "configs" / "infer" / "bicubic.yaml"),
                        "--input", str(lq_clip), "--output", str(tmp_path), "save_frames=true"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "model: bicubic x4" in p.stdout, p.stderr[-2000:]
    ours = read_video(tmp_path / "bunny").astype(int)
    ref = np.stack([bicubic_up(f, 4) for f in read_video(lq_clip)]).astype(int)
    assert ours.shape == ref.shape == (7, 192, 320, 3)
    assert np.abs(ours - ref).max() <= 1 and (ours != ref).mean() < 1e-4  # float64 vs uint8 path: rare ties

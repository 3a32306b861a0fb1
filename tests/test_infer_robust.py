"""infer.py under stress: two processes on one output folder, SIGINT/SIGTERM in the middle of a clip, a clip
that breaks midway. Nothing is written twice, nothing half-written is left, reruns finish the work."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np

from sdatc.data.video import VideoReader, write_video

ROOT = Path(__file__).resolve().parents[1]
INFER = ROOT / "scripts" / "infer.py"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _cmd(config, src, out, *extra):
    return [sys.executable, str(INFER), "--config", str(ROOT / "configs" / "infer" / config), "--input", str(src),
            "--output", str(out), *extra]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".")) if out.exists() else []


def test_two_processes_on_one_output_folder_restore_each_clip_once(tmp_path, carphone_frames):
    clips = tmp_path / "clips"
    for i in range(4):  # the preview model (a light DCM) at 144x176: about a second per clip, so the runs overlap
        write_video(clips / f"c{i}.mp4", np.concatenate([carphone_frames] * 2)[i:i + 6], fps=10, crf=25)
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cmd("preview.yaml", clips, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=ENV) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    done = [m for o in outs for m in re.findall(r"(c\d): done", o[0])]
    assert sorted(done) == ["c0", "c1", "c2", "c3"]  # every clip restored exactly once over both processes
    assert all(VideoReader(out / f"c{i}.mp4").meta.num_frames == 6 for i in range(4))
    assert sum(len(re.findall(r"c\d: skipped", o[0])) for o in outs) == 4  # each clip skipped by the other run
    for p, (stdout, stderr) in zip(procs, outs):  # a run that left a clip to the other's live lock says so: status 1
        left = re.findall(r"(c\d): skipped \(rank 0\) being restored by another process", stdout)
        assert p.returncode == (1 if left else 0), stderr[-2000:]
        assert not left or f"{len(left)} clips not restored: other processes hold their locks" in stdout
    assert _leftovers(out) == []


def _interrupt(clips: Path, out: Path, sig: int) -> None:
    """Run infer.py, send ``sig`` while clip b is being written; check the one-line exit and the cleanup."""
    p = subprocess.Popen(_cmd("preview.yaml", clips, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env=ENV)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:  # wait until clip b is being written
        if (out / "a.mp4").exists() and any(n.startswith(".b") and "tmp" in n for n in _leftovers(out)):
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted:") and "Traceback" not in stderr
    assert (out / "a.mp4").exists() and not (out / "b.mp4").exists()
    assert _leftovers(out) == []  # no temporary file, no lock


def test_sigterm_and_sigint_mid_clip_clean_up_and_a_rerun_finishes(tmp_path, carphone_frames, run_script):
    """With infer.py's default model (the preview DCM): clip b, 24 frames at 128x96, takes a few seconds."""
    clips = tmp_path / "clips"
    write_video(clips / "a.mp4", carphone_frames[:2, :48, :64], fps=10, crf=25)
    write_video(clips / "b.mp4", np.concatenate([carphone_frames] * 3)[:24, :96, :128], fps=10, crf=25)
    out = tmp_path / "out"
    _interrupt(clips, out, signal.SIGTERM)
    _interrupt(clips, out, signal.SIGINT)  # the rerun skips a, redoes b, and is interrupted again
    rerun = run_script("infer.py", *_cmd("preview.yaml", clips, out)[2:])  # the rerun needs no new process
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert re.search(r"1 done, 1 skipped", rerun.stdout) and VideoReader(out / "b.mp4").meta.num_frames == 24


def test_clip_broken_midway_names_clip_and_frame_and_leaves_nothing(tmp_path, carphone_frames, run_script):
    clips = tmp_path / "clips"
    write_video(clips / "good.mp4", carphone_frames[:3, :48, :64], fps=10, crf=25)
    bad = clips / "bad.mp4"
    with av.open(str(bad), "w", options={"movflags": "faststart"}) as box:  # the index first: it survives the cut
        s = box.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in np.concatenate([carphone_frames] * 3)[:20, :48, :64]:
            box.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        box.mux(s.encode())
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])  # cut: the index promises 20 frames, the last ones are gone
    out = tmp_path / "out"
    p = run_script("infer.py", *_cmd("bicubic.yaml", clips, out)[2:])
    assert p.returncode == 1
    assert re.search(r"bad: failed .*bad\.mp4.*(decoded \d+ of \d+ frames|after \d+ frames)", p.stdout), p.stdout
    assert (out / "good.mp4").exists() and not (out / "bad.mp4").exists() and _leftovers(out) == []

"""Fifty seeded mutants of real clips (mp4, faststart mp4, mkv, webm, PNG folder) beside the good clips, through
ONE infer.py run (bicubic: no model to load): each damaged clip fails in one line naming it, or restores
completely; no traceback, nothing left behind for failed clips, inputs untouched (issue 23, "Must show")."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mutants import make_sources, write_mutants

from sdatc.data.video import VideoReader

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (1, 2)  # 5 sources x 5 kinds x 2 seeds = 50 mutants
LINE = re.compile(r"^  (\S+): (done|failed|skipped) \(rank 0\) ?(.*)$")


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_restored(path: Path, frames: int = 10) -> None:
    r = VideoReader(path)
    assert (r.meta.width, r.meta.height, r.meta.num_frames) == (256, 192, frames), (path, r.meta)
    assert r.read_all().shape == (frames, 192, 256, 3), path


def test_mutants_fail_cleanly_or_restore_completely(tmp_path, carphone_path):
    frames = VideoReader(carphone_path).read_all(10)[:, :48, :64].copy()
    sources = make_sources(frames, tmp_path / "good")
    clips = tmp_path / "clips"
    shutil.copytree(tmp_path / "good", clips)
    mutants = [m for seed in SEEDS for src in sources.values() for m in write_mutants(src, clips, seed)]
    assert len(mutants) == 50
    names = {p.stem if p.is_file() else p.name: p for p in clips.iterdir()}
    before = _digests(clips)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore",  # this tree's sdatc in the subprocess too
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "scripts" / "infer.py"), "--config", str(ROOT / "configs/infer/bicubic.yaml"),
           "--input", str(clips), "--output", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]  # some clips failed
    assert "Traceback" not in p.stdout + p.stderr, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\d+ done, \d+ skipped", line))
    end = next(i for i, line in enumerate(lines) if line.startswith("outputs in "))
    rows = [LINE.match(line) for line in lines[start + 1:end]]
    assert all(rows), [line for line, m in zip(lines[start + 1:end], rows) if not m]  # one line per clip
    status = {m[1]: (m[2], m[3]) for m in rows}
    assert sorted(status) == sorted(names)  # every clip reported exactly once
    failed = {n for n, (s, _) in status.items() if s == "failed"}
    done = {n for n, (s, _) in status.items() if s == "done"}
    assert done | failed == set(names) and len(failed) >= 25, status
    for n in failed:  # our own one-line message naming the clip's file, not an internal exception
        error = status[n][1]
        assert n in error and not re.match(r"\w+(Error|Exception)\b", error), (n, error)
    assert set(sources) <= done  # the good clips
    assert sorted(q.name for q in out.iterdir()) == sorted(f"{n}.mp4" for n in done)  # nothing else, no temp files
    for n in done:  # every clip called done is complete: all 10 frames, 4x (was: 1-9 frames for cut mkv/webm)
        _check_restored(out / f"{n}.mp4")
    assert _digests(clips) == before  # inputs unchanged

"""The command-line scripts as users run them: outputs, one-line errors, exit codes, README == CI."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=600)


def assert_clean_error(p, pattern):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(pattern, last), last


def test_make_testsets_then_evaluate(gt_root, tmp_path):
    out = tmp_path / "sets"
    p = run(ROOT / "scripts/make_testsets.py", "--gt-root", gt_root, "--out", out, "--crf", 25, 35, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "2 clips (2 built, 0 reused)" in p.stdout and (out / "manifest.json").exists()
    p = run(ROOT / "scripts/evaluate.py", "--sr", out / "BIx4_crf25", "--gt", out / "BIx4", "--out", tmp_path / "r.csv")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^mean\s+12\s+\d+\.\d+\s+0\.\d+", p.stdout, re.M), p.stdout
    assert (tmp_path / "r.csv").read_text().startswith("clip,frames,psnr_y,ssim_y")


def test_bad_inputs_exit_cleanly(tmp_path, carphone_frames, run_script):
    """In this process, through run_cli as the scripts run (test_make_testsets_then_evaluate runs both as a
    shell does)."""
    make, evaluate = (lambda *a: run_script("make_testsets.py", *a)), (lambda *a: run_script("evaluate.py", *a))
    assert_clean_error(make("--gt-root", tmp_path / "nope", "--out", tmp_path / "o"), "not found")
    (tmp_path / "empty").mkdir()
    assert_clean_error(make("--gt-root", tmp_path / "empty", "--out", tmp_path / "o"), "no clips")
    assert_clean_error(make("--gt-root", tmp_path, "--out", tmp_path / "o", "crff=[1]"), "unknown key 'crff'")
    bad = tmp_path / "videos"
    bad.mkdir()
    (bad / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    p = make("--gt-root", bad, "--out", tmp_path / "o2")
    assert_clean_error(p, "broken.mp4: not a readable video")
    assert not list((tmp_path / "o2").rglob("*.png")) and not list((tmp_path / "o2").rglob("*.mp4"))
    assert_clean_error(evaluate("--sr", tmp_path / "nope", "--gt", tmp_path), "not found")
    (tmp_path / "cfg.yaml").write_text("metrics: [psnr]\nbogus: 1\n")
    assert_clean_error(evaluate("--config", tmp_path / "cfg.yaml"), r"cfg\.yaml.*unknown key 'bogus'")


def _readme_command(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split(heading, 1)[1]
    return re.search(r"```(?:bash|sh)?\n(.+?)\n```", block, re.S).group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    cmd = _readme_command("## Run the tests")
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmd in ci.splitlines(), f"{cmd!r} not a line of .ci/run"


def test_demo_runs(tmp_path, lq_small_clip):
    """The built-in job on a short clip: restored video, frames and the before/after picture."""
    out = tmp_path / "demo"
    p = run(ROOT / "scripts/demo.py", f"input={lq_small_clip}", f"out={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "model: DCM only" in p.stdout and "assets/preview" in p.stdout
    assert re.search(r"restored 5 frames in [\d.]+ s", p.stdout)
    assert (out / "small.mp4").is_file() and len(list((out / "small").glob("*.png"))) == 5
    assert (out / "before_after.png").is_file()


def test_preview_model_beats_bicubic_on_the_demo_clip():
    """The shipped preview weights on the first frames of the shipped demo clip, against its GT."""
    import numpy as np
    import torch

    from sdatc.config import load_config
    from sdatc.data.imresize import bicubic_up
    from sdatc.data.preview_data import demo_gt
    from sdatc.data.video import read_video
    from sdatc.inference import InferConfig, build_model
    from sdatc.metrics.psnr_ssim import psnr_y

    dcm = build_model(load_config(InferConfig, "configs/infer/preview.yaml"))
    lq = read_video(ROOT / "assets" / "demo.mp4", max_frames=3)
    gt = demo_gt()[:3]
    with torch.no_grad():
        out = dcm(torch.from_numpy(lq).permute(0, 3, 1, 2).float() / 255).clamp(0, 1)
    out = (out * 255).round().byte().permute(0, 2, 3, 1).numpy()
    ours = np.mean([psnr_y(o, g) for o, g in zip(out, gt)])
    bicubic = np.mean([psnr_y(bicubic_up(f, 4), g) for f, g in zip(lq, gt)])
    assert ours > bicubic + 0.2, (ours, bicubic)

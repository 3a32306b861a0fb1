"""reproduce_tables.py end to end on a tiny GT set cut from the real sample clip (bigbuckbunny):
every output file, the paper's numbers beside ours, resuming, skipped methods, and bad input."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdatc.config import ConfigError, load_config
from sdatc.data.video import list_frame_files, write_frames
from sdatc.errors import SdatcError
from sdatc.tables.config import FigureConfig, GTRoots, MethodConfig, TablesConfig
from sdatc.tables.paper import load_paper
from sdatc.tables.run import reproduce

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce_tables.py"
COLUMNS = ("table,dataset,crf,method,psnr_y,ssim_y,lpips,dists,fid,niqe,maniqa,clipiqa,"
           "vmaf,warping_error,tlp,tof,clips,frames")


@pytest.fixture
def gt(tmp_path, bunny_frames) -> Path:
    """Two 4-frame clips (128x192 crops of bigbuckbunny) in BasicSR layout."""
    root = tmp_path / "GT"
    write_frames(root / "bunnyA", bunny_frames[:4, 200:328, 400:592])
    write_frames(root / "bunnyB", bunny_frames[1:5, 360:488, 700:892])
    return root


def _cfg(tmp_path, gt, **kw) -> TablesConfig:
    base = dict(sets=["REDS4"], gt_roots=GTRoots(REDS4=str(gt)), official_clips=False, testsets=str(tmp_path / "ts"),
                results=str(tmp_path / "res"), out=str(tmp_path / "out"), weights=str(tmp_path / "w"),
                methods=["bicubic"], method_configs={"bicubic": MethodConfig(builtin="bicubic", label="Bicubic")},
                metrics=["psnr_y", "ssim_y"], figures=FigureConfig())
    base.update(kw)
    return TablesConfig(**base)


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _paper_row(dataset: str, crf: int, method: str = "SDATC") -> str:
    p = load_paper().quality[(dataset, crf, method)]
    cells = [f"{p['psnr_y']:.2f}", f"{p['ssim_y']:.4f}", f"{p['lpips']:.4f}", f"{p['dists']:.4f}", f"{p['fid']:.2f}",
             f"{p['niqe']:.3f}", f"{p['maniqa']:.4f}", f"{p['clipiqa']:.4f}"]
    return f"| **{method} (paper)** | {crf} | " + " | ".join(cells) + " |"


def test_cli_bicubic_every_output_then_resume(tmp_path, gt, run_script, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("SDATC_SD21_PATH", "SDATC_WEIGHTS")}
    args = [sys.executable, str(SCRIPT), "--config", str(ROOT / "configs/eval/tables.yaml"), "sets=[REDS4]",
            f"gt_roots.REDS4={gt}", "official_clips=false", f"testsets={tmp_path / 'ts'}",
            f"results={tmp_path / 'res'}", f"out={tmp_path / 'out'}", f"weights={tmp_path / 'w'}",
            "metrics=[psnr_y,ssim_y,lpips,fid,niqe,vmaf,tof]", "methods=[bicubic,sdatc]"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "out"
    for name in ("per_clip.csv", "summary.csv", "tables.json", "tables.md", "config.yaml",
                 "figures/REDS4_crf25_bunnyA_grid.png", "figures/REDS4_crf25_bunnyA_profile.png"):
        assert (out / name).is_file(), name
    for q in (15, 25, 35):
        frames = list_frame_files(tmp_path / "res" / "bicubic" / "REDS4" / f"crf{q}" / "bunnyB")
        assert [f.name for f in frames] == [f"{i:08d}.png" for i in range(4)]
    assert (tmp_path / "ts" / "REDS4" / "manifest.json").is_file()

    assert (out / "summary.csv").read_text().splitlines()[0] == COLUMNS
    summary = _rows(out / "summary.csv")
    assert [(r["table"], r["dataset"], r["crf"], r["method"], r["clips"], r["frames"]) for r in summary] == [
        ("I", "REDS4", str(q), "Bicubic", "2", "8") for q in (15, 25, 35)]
    for r in summary:
        assert r["lpips"] == r["fid"] == r["niqe"] == "missing" and r["dists"] == r["warping_error"] == ""
    psnr, ssim, vmaf = ([float(r[k]) for r in summary] for k in ("psnr_y", "ssim_y", "vmaf"))
    assert 20 < psnr[2] < psnr[1] < psnr[0] < 50 and 0 < ssim[2] < ssim[1] < ssim[0] < 1
    assert 0 < vmaf[2] < vmaf[1] < vmaf[0] < 100
    per_clip = _rows(out / "per_clip.csv")
    assert len(per_clip) == 6 and {r["clip"] for r in per_clip} == {"bunnyA", "bunnyB"}
    assert per_clip[0]["fid"] == "missing"

    md = (out / "tables.md").read_text()
    for q in (15, 25, 35):
        assert _paper_row("REDS4", q) in md
    assert "| Bicubic (ours) | 25 | " in md and "Not comparable to the paper" in md and "## Table VII" in md
    assert re.search(r"`lpips`: missing \(lpips: weights missing: .*LPIPS_v0\.1_alex-df73285e\.pth", md)
    assert "method sdatc: skipped, no SD 2.1 weights" in md

    meta = json.loads((out / "tables.json").read_text())
    v = meta["versions"]
    assert v["torch"] and v["pyiqa"] and v["ffmpeg"].startswith("ffmpeg") and v["x264"] and v["libvmaf"]
    assert meta["metrics"]["lpips"]["status"] == "missing" and "AlexNet" in meta["metrics"]["lpips"]["variant"]
    assert meta["methods"]["bicubic"]["status"] == "ran" and meta["methods"]["sdatc"]["status"] == "skipped"
    assert len(meta["sets"]["REDS4"]["manifest_sha256"]) == 64 and meta["failures"] == []

    units = sorted((out / "scores").rglob("*.json"))
    assert len(units) == 6
    stamps = [u.stat().st_mtime_ns for u in units]
    monkeypatch.chdir(tmp_path)  # the resume in this process (the first run above is the CLI a shell runs)
    for k in ("SDATC_SD21_PATH", "SDATC_WEIGHTS"):
        monkeypatch.delenv(k, raising=False)
    p = run_script("reproduce_tables.py", *args[2:])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "0 clips built, 2 reused" in p.stdout
    assert [u.stat().st_mtime_ns for u in units] == stamps  # finished units are not recomputed
    assert _rows(out / "summary.csv") == summary


def test_markdown_has_the_paper_numbers_of_each_set(tmp_path, gt):
    cfg = _cfg(tmp_path, gt, sets=["Vid4", "UDM10"], gt_roots=GTRoots(Vid4=str(gt), UDM10=str(gt)), crf=[35],
               figures=FigureConfig(enabled=False))
    reproduce(cfg, log=lambda *_: None)
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "## Table I: Vid4" in md and "## Table II: UDM10" in md
    assert _paper_row("Vid4", 35) in md and _paper_row("UDM10", 35) in md
    assert _paper_row("Vid4", 35, "CAVSR").replace("**", "") in md
    assert _paper_row("Vid4", 15) not in md  # only the CRFs asked for
    assert [r["table"] for r in _rows(tmp_path / "out" / "summary.csv")] == ["I", "II"]


def test_method_without_its_config_is_skipped(tmp_path, gt):
    methods = {"bicubic": MethodConfig(builtin="bicubic"),
               "dcm_only": MethodConfig(infer_config="configs/infer/nope.yaml")}
    meta = reproduce(_cfg(tmp_path, gt, crf=[25], methods=["dcm_only", "bicubic"], method_configs=methods),
                     log=lambda *_: None)
    assert meta["methods"]["dcm_only"] == {
        "status": "skipped",
        "reason": "method dcm_only: skipped, its inference config configs/infer/nope.yaml is not there"}
    assert meta["methods"]["bicubic"]["status"] == "ran"
    assert "- method dcm_only: skipped, its inference config configs/infer/nope.yaml is not there" in (
        tmp_path / "out" / "tables.md").read_text()


def test_unknown_names_and_missing_gt_roots(tmp_path, gt, run_script):
    with pytest.raises(SdatcError, match="unknown metric 'bogus'"):
        reproduce(_cfg(tmp_path, gt, metrics=["psnr_y", "bogus"]))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="unknown set 'REDS5'"):
        load_config(TablesConfig, ROOT / "configs/eval/tables.yaml", ["sets=[REDS5]"])
    with pytest.raises(SdatcError, match=r"set Vid4: no GT root \(set gt_roots\.Vid4=PATH"):
        reproduce(_cfg(tmp_path, gt, sets=["REDS4", "Vid4"]))
    with pytest.raises(SdatcError, match="set REDS4: GT root not found: .*nope"):
        reproduce(_cfg(tmp_path, gt, gt_roots=GTRoots(REDS4=str(tmp_path / "nope"))))
    with pytest.raises(ConfigError, match="method 'sdatc' is not defined"):
        load_config(TablesConfig, None, ["methods=[sdatc]"])
    p = run_script("reproduce_tables.py", "--config", ROOT / "configs/eval/tables.yaml", "sets=[Vid5]")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert re.fullmatch(r"error: .*unknown set 'Vid5' \(known: REDS4, Vid4, UDM10\)", p.stderr.strip().splitlines()[-1])


def test_own_clips_without_official_clips_false_say_so(tmp_path, gt):
    """README's quick look on one's own clips (official_clips left at true): the error names the switch."""
    with pytest.raises(SdatcError, match=r"set REDS4: .*GT lacks the paper's REDS4 clips \(000, 011, 015, 020; "
                                         r"it has bunnyA, bunnyB\): for your own clips set official_clips=false"):
        reproduce(_cfg(tmp_path, gt, official_clips=True, crf=[25]), log=lambda *_: None)
    assert not (tmp_path / "ts" / "REDS4").exists()  # refused before building anything


def test_size_not_divisible_by_4_names_the_clip_and_resumes(tmp_path, gt, bunny_frames):
    write_frames(gt / "odd", bunny_frames[:4, :130, :192])  # 130 rows: not divisible by 4
    cfg = _cfg(tmp_path, gt, crf=[25])
    with pytest.raises(SdatcError,
                       match=r"set REDS4: clip 'odd': GT size 192x130 is not divisible by 4.*rerun to resume"):
        reproduce(cfg, log=lambda *_: None)
    manifest = json.loads((tmp_path / "ts" / "REDS4" / "manifest.json").read_text())
    assert set(manifest["clips"]) == {"bunnyA", "bunnyB"}  # the clips built before it are kept
    assert (tmp_path / "out" / "tables.md").is_file()
    shutil.rmtree(gt / "odd")
    logs = []
    reproduce(cfg, log=logs.append)
    assert any("0 clips built, 2 reused" in m for m in logs)


def test_sr_frame_count_mismatch_keeps_the_rest_and_resumes(tmp_path, gt):
    cfg = _cfg(tmp_path, gt, crf=[15, 25])
    reproduce(cfg, log=lambda *_: None)
    bad = tmp_path / "res" / "bicubic" / "REDS4" / "crf25" / "bunnyB"
    list_frame_files(bad)[-1].unlink()
    keep = tmp_path / "out" / "scores" / "bicubic" / "REDS4" / "crf15" / "bunnyB.json"
    stamp = keep.stat().st_mtime_ns
    with pytest.raises(SdatcError, match=r"clip 'bunnyB': 3 SR frames .* vs 4 GT frames .*rerun to resume"):
        reproduce(cfg, log=lambda *_: None)
    summary = _rows(tmp_path / "out" / "summary.csv")
    assert [r["crf"] for r in summary] == ["15"]  # the incomplete group is left out, the rest is reported
    assert keep.stat().st_mtime_ns == stamp
    shutil.rmtree(bad)  # fix: remove the bad output; the rerun restores and scores only that clip
    reproduce(cfg, log=lambda *_: None)
    assert [r["crf"] for r in _rows(tmp_path / "out" / "summary.csv")] == ["15", "25"]
    assert keep.stat().st_mtime_ns == stamp


def test_inference_method_and_runtime(tmp_path, gt, monkeypatch):
    """An inference config (the tiny model, random weights, 2 steps) as a method, and runtime=true."""
    import sdatc.benchmark

    calls = []

    def fake_bench(cfg, height, width, frames, seed=0):
        calls.append((height, width, frames, cfg.pipeline.sampler.steps))
        return {"input": [height, width], "output": [4 * height, 4 * width], "frames": frames, "seconds_per_frame": 1.5,
                "steps": cfg.pipeline.sampler.steps, "tiling": {"mode": "auto"}, "flow_guidance": False,
                "device": "test-cpu", "dtype": "float32"}

    monkeypatch.setattr(sdatc.benchmark, "bench", fake_bench)
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    shutil.rmtree(gt / "bunnyB")  # one clip of 2 frames keeps the CPU time low
    tiny = MethodConfig(infer_config="configs/infer/tiny.yaml", paper="SDATC", label="tiny")
    cfg = _cfg(tmp_path, gt, sets=["Vid4"], gt_roots=GTRoots(Vid4=str(gt)), crf=[25], max_frames=2, methods=["tiny"],
               method_configs={"tiny": tiny}, runtime=True, runtime_method="tiny", runtime_frames=3)
    meta = reproduce(cfg, log=lambda *_: None)
    frames = list_frame_files(tmp_path / "res" / "tiny" / "Vid4_first2" / "crf25" / "bunnyA")
    assert len(frames) == 2 and (tmp_path / "res" / "tiny" / "Vid4_first2" / "crf25" / "bunnyA.mp4").is_file()
    from sdatc.data.video import read_image

    assert read_image(frames[0]).shape == (128, 192, 3)
    assert meta["methods"]["tiny"]["steps"] == 2 and meta["methods"]["tiny"]["seed"] == 0
    assert calls == [(180, 320, 3, 2)]
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "first 2 frames" in md and "| tiny (ours) | 25 |" in md and "| Δ tiny − SDATC (paper) | 25 |" in md
    assert "## Table III" in md and "| SDATC (paper, A100) |" in md
    assert "| tiny (ours, test-cpu, float32) | - | - | 1.500 |" in md
    assert json.loads((tmp_path / "out" / "runtime.json").read_text())["seconds_per_frame"] == 1.5
    assert np.isfinite(float(_rows(tmp_path / "out" / "summary.csv")[0]["psnr_y"]))


def test_packaged_paper_numbers_match_the_reference():
    paper = load_paper()
    assert len(paper.quality) == 57 and paper.quality[("UDM10", 25, "SDATC")]["fid"] == 66.15
    assert paper.runtime["SDATC"]["runtime_s"] == 11.6 and paper.vmaf["SDATC"]["vmaf"] == 67.22
    # summary.csv keeps the column order of the packaged file (docs/evaluation.md)
    from sdatc.tables.config import TABLE_METRICS
    from sdatc.tables.report import SUMMARY_COLUMNS

    header = (ROOT / "sdatc" / "reference" / "paper_tables.csv").read_text().splitlines()[0].split(",")
    assert header == ["table", "dataset", "crf", "method", *TABLE_METRICS] == SUMMARY_COLUMNS[: len(header)]

"""Test-set builder: layout, LR = GT / 4 exactly, manifest, reuse, video GT, bad clips."""

import json

import numpy as np
import pytest

from sdatc.data.imresize import bicubic_down
from sdatc.data.testsets import TestSetConfig, build_testsets, load_clip_list
from sdatc.data.video import read_video, write_frames
from sdatc.errors import SdatcError
from sdatc.utils import sha256_file


def test_layout_sizes_and_manifest(gt_root, tmp_path):
    out = tmp_path / "out"
    manifest, summary = build_testsets(TestSetConfig(gt_root=str(gt_root), out=str(out), crf=[15, 35]))
    assert summary == {"built": 2, "reused": 0}
    names = [f"{i:08d}.png" for i in range(6)]
    for clip in ("carA", "carB"):
        gt = read_video(gt_root / clip)
        lr = read_video(out / "BIx4" / clip)
        assert sorted(p.name for p in (out / "BIx4" / clip).iterdir()) == names
        assert lr.shape == (6, 36, 44, 3)  # exactly GT / 4
        assert np.array_equal(lr[0], bicubic_down(gt[0], 4))
        for q in (15, 35):
            dec = read_video(out / f"BIx4_crf{q}" / clip)
            assert dec.shape == lr.shape
            assert ((out / "mp4" / f"crf{q}" / f"{clip}.mp4").stat().st_size
                    == manifest["clips"][clip]["crf"][str(q)]["bytes"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"] == {"crf": [15, 35], "pix_fmt": "yuv420p", "fps": 10.0, "preset": "medium", "scale": 4,
                             "lossless_first": True, "x264_threads": 1, "max_frames": None}
    assert m["versions"]["x264"].startswith("x264 core")
    e = m["clips"]["carA"]
    assert e["frames"] == 6 and e["gt_size"] == [144, 176] and e["lr_size"] == [36, 44]
    c15, c35 = e["crf"]["15"], e["crf"]["35"]
    assert c15["bytes"] > c35["bytes"] and c15["kbps"] == pytest.approx(c15["bytes"] * 8 / 1000 / 0.6, rel=1e-3)
    assert "crf=15.0" in c15["x264"] and "crf=35.0" in c35["x264"]
    for name, digest in c35["png_sha256"].items():
        assert sha256_file(out / "BIx4_crf35" / "carA" / name) == digest
    assert e["lr_sha256"]["00000000.png"] == sha256_file(out / "BIx4" / "carA" / "00000000.png")
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def test_rerun_reuses_and_settings_guard(gt_root, tmp_path):
    out = tmp_path / "out"
    cfg = TestSetConfig(gt_root=str(gt_root), out=str(out), crf=[25])
    build_testsets(cfg)
    before = (out / "mp4" / "crf25" / "carA.mp4").stat().st_mtime_ns
    _, summary = build_testsets(cfg)
    assert summary == {"built": 0, "reused": 2}
    assert (out / "mp4" / "crf25" / "carA.mp4").stat().st_mtime_ns == before
    with pytest.raises(SdatcError, match="other settings"):
        build_testsets(TestSetConfig(gt_root=str(gt_root), out=str(out), crf=[25], fps=25))


def test_video_gt_source_is_extracted(carphone_path, tmp_path):
    out = tmp_path / "out"
    manifest, _ = build_testsets(TestSetConfig(gt_root=str(carphone_path), out=str(out), crf=[25], max_frames=5))
    assert list(manifest["clips"]) == ["carphone_pristine"]
    gt = read_video(out / "GT" / "carphone_pristine")
    assert gt.shape == (5, 144, 176, 3)
    assert np.array_equal(gt, read_video(carphone_path, max_frames=5))
    assert read_video(out / "BIx4_crf25" / "carphone_pristine").shape == (5, 36, 44, 3)


def test_size_not_divisible_by_4_names_clip(tmp_path, carphone_frames):
    root = tmp_path / "GT"
    write_frames(root / "good", carphone_frames[:2])
    write_frames(root / "odd", carphone_frames[:2, :142, :174])
    out = tmp_path / "out"
    with pytest.raises(SdatcError, match=r"clip 'odd': GT size 174x142 is not divisible by 4"):
        build_testsets(TestSetConfig(gt_root=str(root), out=str(out), crf=[25]))
    assert not (out / "BIx4" / "odd").exists()
    assert list(json.loads((out / "manifest.json").read_text())["clips"]) == ["good"]  # finished clip kept


def test_clip_lists():
    assert list(load_clip_list("reds4")) == ["000", "011", "015", "020"]
    assert load_clip_list("vid4") == {"calendar": 41, "city": 34, "foliage": 49, "walk": 47}
    assert len(load_clip_list("udm10")) == 10
    train = load_clip_list("reds_train")
    assert len(train) == 266 and not {"000", "011", "015", "020"} & set(train) and "269" in train


def test_clip_list_selection(gt_root, tmp_path):
    with pytest.raises(SdatcError, match="clips not found: 000, 011"):
        build_testsets(TestSetConfig(gt_root=str(gt_root), out=str(tmp_path / "o"), clip_list="reds4"))
    manifest, _ = build_testsets(TestSetConfig(gt_root=str(gt_root), out=str(tmp_path / "o"), crf=[25], clips=["carB"]))
    assert list(manifest["clips"]) == ["carB"]


def test_out_inside_gt_is_refused(gt_root):
    with pytest.raises(SdatcError, match="must not be inside"):
        build_testsets(TestSetConfig(gt_root=str(gt_root), out=str(gt_root / "sets")))


def test_odd_lr_size_survives_the_round_trip_and_restores_to_exactly_4x(tmp_path, bunny_frames):
    """GT 320x180 -> LR 80x45: 4:2:0 H.264 cannot code 45 rows (crop unit 2), so the mp4 holds 80x46 and its
    tag says 80x45; VideoReader crops to it, and infer.py restores 320x180 (was 80x46 -> 320x184)."""
    from sdatc.config import load_config
    from sdatc.data.video import VideoReader
    from sdatc.evaluation import score_clip
    from sdatc.inference import InferConfig, run

    root = tmp_path / "GT"
    write_frames(root / "odd", bunny_frames[:3, 200:380, 400:720])  # 320x180
    out = tmp_path / "sets"
    manifest, _ = build_testsets(TestSetConfig(gt_root=str(root), out=str(out), crf=[25]))
    mp4 = out / "mp4" / "crf25" / "odd.mp4"
    r = VideoReader(mp4)
    assert (r.meta.width, r.meta.height) == (80, 45)  # was 80x46
    assert r.meta.coded_size == (46, 80) and manifest["clips"]["odd"]["crf"]["25"]["coded_size"] == [46, 80]
    assert np.array_equal(r.read_all(), read_video(out / "BIx4_crf25" / "odd"))  # the same frames as the PNGs
    cfg = load_config(InferConfig, "configs/infer/bicubic.yaml", [f"input={mp4}", f"output={tmp_path / 'sr'}"])
    assert [x["status"] for x in run(cfg, progress=False)] == ["done"]
    sr = VideoReader(tmp_path / "sr" / "odd.mp4").meta
    assert (sr.width, sr.height, sr.num_frames) == (320, 180, 3)
    assert score_clip("odd", tmp_path / "sr" / "odd.mp4", root / "odd", {})["frames"] == 3  # evaluate.py accepts it
    import av

    with av.open(str(mp4)) as c:
        assert c.metadata["sdatc_frame_size"] == "80x45"  # video.SIZE_TAG


def test_even_sizes_are_not_tagged_and_a_reused_set_keeps_its_provenance(gt_root, tmp_path):
    import av

    out = tmp_path / "out"
    cfg = TestSetConfig(gt_root=str(gt_root), out=str(out), crf=[25])
    first, _ = build_testsets(cfg)
    again, summary = build_testsets(cfg)
    assert summary == {"built": 0, "reused": 2}
    assert first["versions"]["x264"].startswith("x264 core")
    assert again["versions"].get("x264") == first["versions"]["x264"]
    assert again["versions"] == first["versions"]  # the versions that built the set, not "x264 unknown"
    assert "coded_size" not in first["clips"]["carA"]["crf"]["25"]
    with av.open(str(out / "mp4" / "crf25" / "carA.mp4")) as c:
        assert "sdatc_frame_size" not in c.metadata  # even sizes: the mp4 is written as before

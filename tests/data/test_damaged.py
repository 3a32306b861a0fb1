"""Damaged inputs are found when a clip is opened and named in one line (issue 23, sections 4 and 6): frames
missing from Matroska/WebM timelines, unknown codecs, non-UTF-8 metadata, damaged PNGs in frame folders and
in training clips, settings that would fail only after a clip was restored."""

import sys
from pathlib import Path

import av
import numpy as np
import pytest

from sdatc.config import load_config
from sdatc.data.datasets import TrainDataConfig, VideoClipDataset, scan_clips
from sdatc.data.testsets import TestSetConfig
from sdatc.data.video import VideoReader, write_frames
from sdatc.errors import SdatcError
from sdatc.inference import InferConfig, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mutants import _encode  # noqa: E402


@pytest.fixture(scope="module")
def frames10(carphone_path):
    """10 real frames, 64x48 (carphone)."""
    return VideoReader(carphone_path).read_all(10)[:, :48, :64].copy()


@pytest.mark.parametrize("fmt,codec,ext", [("matroska", "libx264", "mkv"), ("webm", "libvpx", "webm")])
def test_cut_matroska_and_webm_are_refused_not_restored_short(tmp_path, frames10, fmt, codec, ext):
    good = _encode(tmp_path / f"good.{ext}", frames10, fmt, codec)
    data = good.read_bytes()
    for cut in (0.6, 0.75, 0.9):  # the mutants: 1-9 of 10 frames left, restored as "done"
        bad = tmp_path / f"cut{cut}.{ext}"
        bad.write_bytes(data[: int(len(data) * cut)])
        with pytest.raises(SdatcError, match=rf"cut{cut}\.{ext}: (truncated or damaged video: \d frames present; "
                                             r"(it ends|its timestamps skip)|holds no video packets)"):
            VideoReader(bad).read_all()  # was: 1-9 frames, no error
    m = VideoReader(good).meta
    assert (m.num_frames, m.frames_from) == (10, "timeline")  # no frame count in the file: checked against time


def _remux(src: Path, dst: Path, edit) -> Path:
    """Copy ``src``'s video packets into Matroska ``dst`` through ``edit(packet) -> keep?``."""
    with av.open(str(src)) as c, av.open(str(dst), "w", format="matroska") as out:
        s = c.streams.video[0]
        o = out.add_stream_from_template(s)
        for p in c.demux(s):
            if p.size and edit(p):
                p.stream = o
                out.mux(p)
    return dst


def test_lost_block_in_the_middle_is_found_and_vfr_with_durations_is_not(tmp_path, frames10):
    src = _encode(tmp_path / "good.mkv", frames10, "matroska", "libx264")
    lost = _remux(src, tmp_path / "lost.mkv", lambda p: p.pts != 700)  # frame 7's block lost (a flipped size byte)

    def later(p):  # VFR: frame 1 held 0.2 s, every later frame 0.1 s later; each packet carries its duration
        p.duration = 200 if p.pts == 100 else 100
        p.pts += 100 * (p.pts >= 200)
        p.dts = None if p.dts is None else p.dts + 100 * (p.dts >= 200)
        return True

    vfr = _remux(src, tmp_path / "vfr.mkv", later)
    with pytest.raises(SdatcError, match=r"lost\.mkv: truncated or damaged video: 9 frames present; its timestamps "
                                         r"skip about 1 frame \(from 0\.70 s\)$"):
        VideoReader(lost)
    r = VideoReader(vfr)
    assert (r.meta.num_frames, r.meta.frames_from) == (10, "timeline")
    assert len(r.read_all()) == 10 and r.timestamps[:3] == [0, 100, 300]


def test_container_without_count_or_duration_says_how_many_frames_were_found(tmp_path, frames10, capsys):
    live = _encode(tmp_path / "clips" / "live.mkv", frames10[:4], "matroska", "libx264", options={"live": "1"})
    cfg = load_config(InferConfig, "configs/infer/bicubic.yaml", [f"input={live}", f"output={tmp_path / 'out'}"])
    assert [r["status"] for r in run(cfg, progress=False)] == ["done"]
    note = "note: live: the container declares no frame count or duration; restoring the 4 frames found"
    assert note in capsys.readouterr().out
    m = VideoReader(live).meta
    assert (m.num_frames, m.frames_from) == (4, "packets")


def test_unknown_codec_and_bad_metadata_are_one_line(tmp_path, frames10):
    mkv = _encode(tmp_path / "a.mkv", frames10[:3], "matroska", "libx264")
    unknown = tmp_path / "unknown.mkv"
    unknown.write_bytes(mkv.read_bytes().replace(b"V_MPEG4/ISO/AVC", b"V_MPEG4/ISO/QQQ"))  # a codec id nobody knows
    with pytest.raises(SdatcError, match=r"unknown\.mkv: video stream of an unknown or unsupported codec"):
        VideoReader(unknown)
    tagged = tmp_path / "tagged.mp4"
    with av.open(str(tagged), "w", format="mp4") as c:
        c.metadata["comment"] = "QQQQ"
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in frames10[:3]:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    bad = tmp_path / "badtag.mp4"
    bad.write_bytes(tagged.read_bytes().replace(b"QQQQ", b"\xc9\xff\xfe\xc3"))  # not UTF-8
    r = VideoReader(bad)  # was: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xc9 ...
    assert r.meta.num_frames == 3 and len(r.read_all()) == 3


def test_no_packets_is_named_not_operation_not_permitted(tmp_path, frames10):
    good = _encode(tmp_path / "a.webm", frames10[:3], "webm", "libvpx")
    data = good.read_bytes()
    bad = tmp_path / "cut.webm"
    bad.write_bytes(data[: data.rindex(b"\x1f\x43\xb6\x75") + 12])  # cut in the cluster before its first block
    with pytest.raises(SdatcError, match=r"cut\.webm: holds no video packets \(truncated or corrupt file\)"):
        VideoReader(bad)


def test_settings_that_fail_late_are_refused_when_the_config_loads():
    for cls, path, key in ((InferConfig, "configs/infer/bicubic.yaml", "output_preset"),
                           (TestSetConfig, "configs/data/testsets.yaml", "preset")):
        with pytest.raises(SdatcError, match=rf"{key} 'medum' is not an x264 preset \(ultrafast, .*placebo\)"):
            load_config(cls, path, [f"{key}=medum"])
        with pytest.raises(SdatcError, match=r"fps must be a (positive number|frame rate > 0).*nan"):
            load_config(cls, path, ["fps=.nan"])
    from sdatc.training.trainer import TrainConfig

    with pytest.raises(SdatcError, match=r"preset 'medum' is not an x264 preset"):  # the training degradation's
        load_config(TrainConfig, "configs/train/tiny_stage0.yaml", ["data.degradation.preset=medum"])


def _png_folder(root: Path, name: str, frames: np.ndarray) -> Path:
    return write_frames(root / name, frames)


def test_damaged_png_in_a_frame_folder_is_named(tmp_path, frames10):
    clip = _png_folder(tmp_path, "clip", frames10[:4])
    f = clip / "00000002.png"
    f.write_bytes(f.read_bytes()[:-40])  # cut: the header is fine, IDAT and IEND are gone
    with pytest.raises(SdatcError, match=r"clip/00000002\.png: truncated or damaged PNG \(it does not end with an "
                                         r"IEND chunk\)"):
        VideoReader(clip)
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    with pytest.raises(SdatcError, match=r"00000002\.png: not a readable image \(damaged header, or not an image\)"):
        VideoReader(clip)


def test_training_scan_names_a_cut_frame_and_a_sample_with_damaged_data_is_skipped(tmp_path, carphone_frames, capsys):
    root = tmp_path / "train"
    for name in ("a", "b"):
        _png_folder(root, name, carphone_frames[:4])
    f = root / "a" / "00000001.png"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    cfg = TrainDataConfig(root=str(root), num_frames=2, gt_size=64, num_workers=0)
    with pytest.raises(SdatcError, match=r"a/00000001\.png: truncated or damaged PNG .*training clip 'a': repair it "
                                         r"or leave it out with data\.exclude=\[a\]"):
        scan_clips(cfg)
    data = bytearray(good)  # damage the scan cannot see: IDAT bytes (header and IEND intact)
    k = data.index(b"IDAT")
    data[k + 8:k + 208] = bytes(200)
    f.write_bytes(bytes(data))
    ds = VideoClipDataset(cfg)  # scans fine
    samples = [ds[i] for i in range(8)]  # every sample of clip a falls back to clip b, in one line each
    assert all(s["clip"] == "b" or s["start"] == 2 for s in samples)  # start 0, 1: the sample needs frame 1
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("warning: sample")]
    assert warned and all("a/00000001.png: not a readable image" in w for w in warned), err
    assert "Traceback" not in err


def test_ffmpeg_generic_errors_are_said_in_words():
    import errno

    from sdatc.data.video import _av_reason

    cases = [(av.error.PermissionError(1, "Operation not permitted"), "corrupt or truncated data"),  # FFmpeg's -1
             (av.error.EOFError(-541478725, "End of file"), "the file ends early: truncated"),
             (av.error.PatchWelcomeError(-1163346256, "Not yet implemented in FFmpeg, patches welcome"),
              "damaged data, or a feature FFmpeg does not support"),
             (av.error.OSError(errno.EIO, "Input/output error"),
              "input/output error: a damaged file, or a failing disk"),
             (av.error.InvalidDataError(-1094995529, "Invalid data found when processing input"),
              "Invalid data found when processing input")]  # FFmpeg's own words where they say enough
    for e, words in cases:
        assert _av_reason(e) == words, e

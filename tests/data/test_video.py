"""Video I/O: metadata, streaming round trips (fps, count, size, audio), formats, bad input, atomic writes."""

from fractions import Fraction

import av
import numpy as np
import pytest

from sdatc.data.video import (
    FrameWriter,
    VideoReader,
    VideoWriter,
    list_clips,
    read_video,
    write_frames,
    write_video,
)
from sdatc.errors import SdatcError


def _psnr(a, b):
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2))


def test_sample_metadata(sample_video_path):
    m = VideoReader(sample_video_path).meta
    assert (m.num_frames, m.width, m.height, m.fps) == (132, 1280, 720, 25.0)
    assert m.kind == "video" and m.codec == "h264" and m.pix_fmt == "yuv420p" and m.has_audio


def test_mp4_round_trip_keeps_fps_count_size_audio(sample_video_path, tmp_path):
    src = VideoReader(sample_video_path)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, fps=src.meta.rate, crf=18, audio_from=sample_video_path) as w:
        for f in src:  # streamed: one frame in memory at a time
            w.write(f)
    back = VideoReader(out)
    assert (back.meta.num_frames, back.meta.width, back.meta.height) == (132, 1280, 720)
    assert back.meta.fps == pytest.approx(25.0) and back.meta.has_audio
    assert back.meta.encoder_option("crf") == "18.0" and back.meta.encoder_version.startswith("x264 core")
    frames = back.read_all()
    assert frames.shape == (132, 720, 1280, 3)
    orig = read_video(sample_video_path, max_frames=3)
    assert _psnr(frames[:3], orig) > 38  # crf 18 is visually lossless
    with av.open(str(out)) as c:
        a_in = av.open(str(sample_video_path)).streams.audio[0]
        a_out = c.streams.audio[0]
        assert a_out.codec_context.name == "aac" and a_out.codec_context.sample_rate == a_in.codec_context.sample_rate
        dur_v = float(c.streams.video[0].duration * c.streams.video[0].time_base)
        dur_a = float(a_out.duration * a_out.time_base)
        assert abs(dur_a - dur_v) < 0.1, (dur_a, dur_v)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temporary files left


def test_fractional_fps_kept(carphone_path, tmp_path):
    src = VideoReader(carphone_path)
    assert src.meta.rate == Fraction(30000, 1001)
    write_video(tmp_path / "c.mp4", src.read_all(max_frames=5), fps=src.meta.rate)
    m = VideoReader(tmp_path / "c.mp4").meta
    assert m.rate == Fraction(30000, 1001) and m.num_frames == 5 and not m.has_audio


@pytest.mark.parametrize("ext,codec", [(".mkv", "libx264"), (".mov", "libx264"), (".avi", "mpeg4"),
                                       (".webm", "libvpx-vp9")])
def test_reads_other_containers(tmp_path, carphone_frames, ext, codec):
    path = tmp_path / f"clip{ext}"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=12)
        s.width, s.height, s.pix_fmt = 176, 144, "yuv420p"
        for i, f in enumerate(carphone_frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    r = VideoReader(path)
    assert (r.meta.num_frames, r.meta.width, r.meta.height) == (8, 176, 144)
    assert r.meta.fps == pytest.approx(12.0)
    frames = r.read_all()
    assert frames.shape == (8, 144, 176, 3) and _psnr(frames, carphone_frames) > 25


def test_frame_folder_round_trip_and_natural_sort(tmp_path, carphone_frames):
    folder = write_frames(tmp_path / "clip", carphone_frames)
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:08d}.png" for i in range(8)]
    assert np.array_equal(read_video(folder), carphone_frames)  # PNG is lossless
    nat = tmp_path / "nat"
    nat.mkdir()
    for i in (10, 2, 1):  # natural order 1, 2, 10 (not 1, 10, 2)
        (nat / f"{i}.png").write_bytes((folder / f"{i % 8:08d}.png").read_bytes())
    r = VideoReader(nat, fps=25)
    assert r.meta.kind == "frames" and r.meta.fps == 25 and r.meta.num_frames == 3 and r.meta.pix_fmt == "rgb24"
    got = r.read_all()
    assert np.array_equal(got, carphone_frames[[1, 2, 2]])  # 1.png, 2.png, 10.png (10 % 8 = 2)


def test_jpg_frames(tmp_path, carphone_frames):
    import cv2

    (tmp_path / "j").mkdir()
    for i, f in enumerate(carphone_frames[:3]):
        cv2.imwrite(str(tmp_path / "j" / f"{i}.jpg"), f[..., ::-1])
    assert read_video(tmp_path / "j").shape == (3, 144, 176, 3)


def test_bad_inputs_are_clear_errors(tmp_path, carphone_frames):
    with pytest.raises(SdatcError, match="not found"):
        VideoReader(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdatcError, match="no frames"):
        VideoReader(tmp_path / "empty")
    (tmp_path / "text.mp4").write_text("this is not a video")
    with pytest.raises(SdatcError, match="not a readable video"):
        VideoReader(tmp_path / "text.mp4")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SdatcError, match="not a video file"):
        VideoReader(tmp_path / "notes.txt")
    mixed = tmp_path / "mixed"
    write_frames(mixed, carphone_frames[:2])
    write_frames(tmp_path / "other", [carphone_frames[0, :100, :120]])
    (tmp_path / "other" / "00000000.png").rename(mixed / "00000002.png")
    with pytest.raises(SdatcError, match=r"mixed sizes .*00000002\.png is 120x100"):
        VideoReader(mixed)
    (tmp_path / "badimg").mkdir()
    (tmp_path / "badimg" / "0.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(SdatcError, match="not a readable image"):
        VideoReader(tmp_path / "badimg")


def test_truncated_mp4(tmp_path, carphone_frames):
    good = write_video(tmp_path / "good.mp4", carphone_frames, fps=10)
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # moov atom at the end is lost
    with pytest.raises(SdatcError, match="cut.mp4"):
        VideoReader(tmp_path / "cut.mp4").read_all()
    # moov first (faststart): the header promises 8 frames, the data holds fewer
    fast = tmp_path / "fast.mp4"
    with av.open(str(fast), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 176, 144, "yuv420p"
        s.options = {"crf": "10"}
        for i, f in enumerate(carphone_frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    data = fast.read_bytes()
    (tmp_path / "fastcut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    r = VideoReader(tmp_path / "fastcut.mp4")
    assert r.meta.num_frames == 8
    with pytest.raises(SdatcError, match="truncated or corrupt"):
        r.read_all()


def test_writers_are_atomic(tmp_path, carphone_frames):
    out = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(out, fps=10) as w:
            w.write(carphone_frames[0])
            assert not out.exists()  # only a hidden temporary name while writing
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with FrameWriter(tmp_path / "frames") as fw:
            fw.write(carphone_frames[0])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SdatcError, match="earlier frames"):
        with VideoWriter(out, fps=10) as w:
            w.write(carphone_frames[0])
            w.write(carphone_frames[0, :64, :64])
    assert list(tmp_path.iterdir()) == []
    write_frames(tmp_path / "frames", carphone_frames[:1])
    with pytest.raises(SdatcError, match="already exists"):
        FrameWriter(tmp_path / "frames")


def test_odd_sizes(tmp_path, carphone_frames):
    odd = carphone_frames[:3, :143, :175]
    with pytest.warns(UserWarning, match="padded to 176x144"):
        write_video(tmp_path / "odd.mp4", odd, fps=10)
    assert VideoReader(tmp_path / "odd.mp4").meta.width == 176
    with pytest.raises(SdatcError, match="odd-sized"):
        write_video(tmp_path / "odd2.mp4", odd, fps=10, odd_size="error")
    assert not (tmp_path / "odd2.mp4").exists()


def test_list_clips(tmp_path, carphone_frames):
    root = tmp_path / "root"
    write_frames(root / "b", carphone_frames[:2])
    write_frames(root / "a10", carphone_frames[:2])
    write_video(root / "a2.mp4", carphone_frames[:2], fps=10)
    (root / "readme.txt").write_text("ignored")
    assert list(list_clips(root)) == ["a2", "a10", "b"]
    assert list(list_clips(root / "b")) == ["b"]  # a frame folder is one clip
    assert list(list_clips(root / "a2.mp4")) == ["a2"]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SdatcError, match="no clips"):
        list_clips(tmp_path / "nothing")
    with pytest.raises(SdatcError, match="not a video file"):
        list_clips(root / "readme.txt")


def test_list_clips_prefers_frames_when_asked(tmp_path, carphone_frames):
    from sdatc.data.video import list_clips

    write_frames(tmp_path / "a", carphone_frames[:2])
    write_video(tmp_path / "a.mp4", carphone_frames[:2], fps=10)
    with pytest.raises(SdatcError, match="two clips are named 'a'"):
        list_clips(tmp_path)
    assert list_clips(tmp_path, prefer_frames=True) == {"a": tmp_path / "a"}

"""Real-world video in, faithful video out: frame times (VFR) and audio length, sample aspect ratio,
display rotation, colour tags with the right RGB <-> YUV matrix, 10-bit and HDR, through infer's I/O
(write_restored) on small clips made here with PyAV."""

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from sdatc.data.video import VideoReader, write_restored

ROOT = Path(__file__).resolve().parents[2]
W, H = 64, 48
COLOUR = (200, 40, 90)  # a saturated colour: BT.601 vs BT.709 vs BT.2020 decodes differ by 5-15 levels
HDR10 = "G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1)", "1000,400"


def nearest_x4(reader, n):
    """A trivial 'restoration': nearest-neighbour x4 (flat colours stay exact), frame i for frame i."""
    for frame in reader:
        yield np.repeat(np.repeat(frame, 4, 0), 4, 1)


def make_clip(path, times_ms=(0, 40, 80, 120, 160, 200), pix_fmt="yuv420p", color=(2, 2, 2, 0), sar=None,
              rotation=None, audio=False, hdr10=None, end_ms=None):
    """An H.264 mp4 of flat COLOUR frames at ``times_ms`` (time base 1/1000); ``color``: (primaries, trc,
    matrix, range) tags, the frames converted with that matrix and range; ``end_ms``: where the last frame
    ends; ``audio``: an AAC tone until the video's end."""
    tb = Fraction(1, 1000)
    end_ms = end_ms or times_ms[-1] + 40
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = W, H, pix_fmt
        cc = s.codec_context
        cc.time_base = tb
        cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range = color
        if sar:
            s.sample_aspect_ratio = sar
        if rotation is not None:
            s.set_display_rotation(rotation)
        if hdr10:
            s.options = {"x264-params": f"mastering-display={hdr10[0]}:cll={hdr10[1]}"}
        a = c.add_stream("aac", rate=48000) if audio else None
        durations = dict(zip(times_ms, [*np.diff(times_ms).tolist(), end_ms - times_ms[-1]]))

        def mux(packets):
            for p in packets:
                p.duration = durations.get(p.pts, 0)  # the last frame's sets where the video ends
                c.mux(p)

        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[...] = COLOUR
        for t in times_ms:
            vf = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            vf = vf.reformat(format=pix_fmt, dst_colorspace=color[2] if color[2] in (1, 9) else None,
                             dst_color_range=color[3] or None)
            vf.pts, vf.time_base = t, tb
            mux(s.encode(vf))
        mux(s.encode(None))
        if a is not None:
            n = 48 * end_ms
            tone = (0.2 * np.sin(np.arange(n) * 2 * np.pi * 440 / 48000)).astype(np.float32)
            for i in range(0, n, 1024):
                af = av.AudioFrame.from_ndarray(tone[None, i : i + 1024], format="fltp", layout="mono")
                af.sample_rate, af.pts = 48000, i
                c.mux(a.encode(af))
            c.mux(a.encode(None))
    return path


def restore(src, tmp_path, **kw):
    out = tmp_path / f"out_{src.stem}.mp4"
    n = write_restored(nearest_x4, src, out, crf=kw.pop("crf", 0), preset="ultrafast", progress=False, **kw)
    assert n == VideoReader(src).meta.num_frames
    return out


def frame_times(path):
    with av.open(str(path)) as c:
        return [float(f.pts * f.time_base) for f in c.decode(video=0)]


def durations(path):
    """(video, audio) stream durations in seconds (audio None when there is none)."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0] if c.streams.audio else None
        return float(v.duration * v.time_base), float(a.duration * a.time_base) if a else None


def test_vfr_frame_times_and_audio_length_kept(tmp_path):
    times = (0, 80, 200, 240, 320, 440)
    src = make_clip(tmp_path / "vfr.mp4", times, audio=True, end_ms=480)
    assert frame_times(src) == pytest.approx([t / 1000 for t in times], abs=1e-3)
    out = restore(src, tmp_path)
    assert frame_times(out) == pytest.approx([t / 1000 for t in times], abs=1e-3)  # not re-timed at a constant rate
    v_in, _ = durations(src)
    v_out, a_out = durations(out)
    assert v_out == pytest.approx(v_in, abs=1e-3) == pytest.approx(0.48, abs=1e-3)
    assert a_out is not None and abs(a_out - v_out) < 0.04, (a_out, v_out)  # audio up to the video's end
    r = VideoReader(out)
    assert r.meta.num_frames == 6 and r.meta.sar is None and r.meta.rotation == 0


def test_sample_aspect_ratio_kept(tmp_path):
    out = restore(make_clip(tmp_path / "anamorphic.mp4", sar=Fraction(4, 3)), tmp_path)
    m = VideoReader(out).meta
    assert m.sar == Fraction(4, 3) and (m.width, m.height) == (4 * W, 4 * H)


@pytest.mark.parametrize("degrees", [90, -90])
def test_rotation_kept_as_metadata_pixels_not_rotated(tmp_path, degrees):
    src = make_clip(tmp_path / "phone.mp4", rotation=degrees)
    assert VideoReader(src).meta.rotation == degrees
    out = restore(src, tmp_path)
    r = VideoReader(out)
    assert r.meta.rotation == degrees and r.meta.display_matrix == VideoReader(src).meta.display_matrix
    assert r.read_all().shape[1:] == (4 * H, 4 * W, 3)  # as stored, 4x: not turned by 90 degrees


def test_10bit_input_written_10bit_unless_asked(tmp_path):
    src = make_clip(tmp_path / "deep.mp4", pix_fmt="yuv420p10le", color=(1, 1, 1, 1))
    assert VideoReader(src).meta.bit_depth == 10
    assert VideoReader(restore(src, tmp_path)).meta.pix_fmt == "yuv420p10le"  # output_pix_fmt: auto
    assert VideoReader(restore(src, tmp_path, pix_fmt="yuv420p")).meta.pix_fmt == "yuv420p"
    eight = make_clip(tmp_path / "eight.mp4")
    assert VideoReader(restore(eight, tmp_path)).meta.pix_fmt == "yuv420p"
    assert VideoReader(restore(eight, tmp_path, pix_fmt="yuv420p10le")).meta.pix_fmt == "yuv420p10le"


@pytest.mark.parametrize("name,pix_fmt,color,hdr10", [
    ("untagged", "yuv420p", (2, 2, 2, 0), None),  # BT.601 limited both ways, as ffmpeg (test-set recipe)
    ("bt709", "yuv420p", (1, 1, 1, 1), None),
    ("bt709_full", "yuv420p", (1, 1, 1, 2), None),
    ("bt2020nc", "yuv420p10le", (9, 14, 9, 1), None),
    ("hlg", "yuv420p10le", (9, 18, 9, 1), None),
    ("pq", "yuv420p10le", (9, 16, 9, 1), HDR10),
])
def test_colour_tags_kept_and_colours_right(tmp_path, name, pix_fmt, color, hdr10):
    src = make_clip(tmp_path / f"{name}.mp4", pix_fmt=pix_fmt, color=color, hdr10=hdr10)
    m_in = VideoReader(src).meta
    assert (m_in.color.primaries, m_in.color.trc, m_in.color.space, m_in.color.range) == color
    out = restore(src, tmp_path)
    m_out = VideoReader(out).meta
    assert m_out.color == m_in.color and m_out.pix_fmt == m_in.pix_fmt  # yuvj420p when full range
    assert (m_out.mastering_display, m_out.content_light) == (hdr10 or (None, None))
    rgb_in = VideoReader(src).read_all().reshape(-1, 3).mean(0)
    rgb_out = VideoReader(out).read_all().reshape(-1, 3).mean(0)
    assert np.abs(rgb_in - COLOUR).max() <= 2, rgb_in  # the reader decodes with the tagged matrix and range
    assert np.abs(rgb_out - rgb_in).max() <= 2, (rgb_out, rgb_in)  # the writer encodes with the tagged ones
    if color[2] != 2:  # the check can see a wrong matrix: BT.601 limited would be off by more than 5
        with av.open(str(src)) as c:
            f = next(c.decode(video=0))
            wrong = f.reformat(format="rgb24", src_colorspace="ITU601", src_color_range="MPEG").to_ndarray()
        assert np.abs(wrong.reshape(-1, 3).mean(0) - COLOUR).max() > 5


def test_infer_hdr_note_and_output_pix_fmt(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(clips / "hlg.mp4", pix_fmt="yuv420p10le", color=(9, 18, 9, 1))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "infer.py"), "--config",
                        str(ROOT / "configs" / "infer" / "bicubic.yaml"), "--input", str(clips), "--output", str(out),
                        "output_pix_fmt=yuv420p"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "note: hlg is HDR (HLG)" in p.stdout and "trained on SDR" in p.stdout
    m = VideoReader(out / "hlg.mp4").meta
    assert m.pix_fmt == "yuv420p" and m.color.hdr == "HLG" and (m.width, m.height) == (4 * W, 4 * H)

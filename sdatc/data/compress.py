"""x264 compression in memory (PyAV): the test-set CRF recipe and the training bitrate degradation.

    out = x264_compress(lr_frames, crf=25, fps=10, lossless_first=True)   # test sets (COMISR recipe)
    out.frames    # (T, H, W, 3) uint8, decoded: same count and size as the input
    out.data      # the .mp4 bytes;  out.settings: x264's SEI string (version + every option)

    lq = random_bitrate_compress(lr_frames, rng)                          # training: [1e4, 1e5] bit/s at 1 fps
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable, Sequence
from fractions import Fraction

import av
import numpy as np

from sdatc.data.video import SCALE_FLAGS, SIZE_TAG, convert_frames, x264_params_with_asm
from sdatc.errors import SdatcError

__all__ = ["SCALE_FLAGS", "X264Result", "x264_compress", "random_bitrate_compress"]


@dataclasses.dataclass
class X264Result:
    frames: np.ndarray  # (T, H, W, 3) uint8 decoded frames
    data: bytes  # the mp4 file
    settings: str  # x264 SEI: "x264 - core N rXXXX ... - options: ... crf=25.0 ..."
    coded_size: tuple[int, int] | None = None  # (H, W) in the bitstream when padded to even for 4:2:0

    @property
    def num_bytes(self) -> int:
        return len(self.data)


def _encode(frames: Iterable[av.VideoFrame], width: int, height: int, fps: Fraction, pix_fmt: str,
            options: dict[str, str], bitrate: int | None = None, true_size: tuple[int, int] | None = None) -> bytes:
    """Encode av.VideoFrames (any pix_fmt; converted as the ffmpeg CLI does) into mp4 bytes with libx264.
    ``true_size`` (W, H) of padded frames is recorded in the ``SIZE_TAG`` metadata (VideoReader crops to it).

    Deterministic: the RGB -> YUV conversion runs on one thread, and x264 never uses sliced threads
    (PyAV's default thread type, SLICE, turns them on whenever threads > 1: a bitstream that depends on
    the thread count and differs from the ffmpeg CLI's frame threads)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"movflags": "use_metadata_tags"} if true_size else {}) as c:
        if true_size:
            c.metadata[SIZE_TAG] = "{}x{}".format(*true_size)
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, pix_fmt
        s.codec_context.time_base = 1 / fps
        s.codec_context.thread_type = "FRAME"  # x264's frame threads (as the ffmpeg CLI), never slices
        if bitrate is not None:
            s.bit_rate = int(bitrate)
        s.options = options
        for i, vf in enumerate(convert_frames(frames, pix_fmt, threads=1)):
            vf.pts, vf.time_base = i, 1 / fps
            vf.pict_type = av.video.frame.PictureType.NONE  # let x264 choose (decoded frames carry I/P types)
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return buf.getvalue()


def _decode(data: bytes) -> list[av.VideoFrame]:
    """The frames of an mp4 in memory, decoded on one thread (PyAV's default is one per CPU)."""
    with av.open(io.BytesIO(data), mode="r") as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        stream.codec_context.thread_type = "NONE"
        return list(c.decode(stream))


def _sei(data: bytes) -> str:
    k = data.find(b"x264 - core")
    return data[k : data.find(b"\x00", k)].decode("ascii", "replace") if k >= 0 else ""


def x264_compress(frames: Sequence[np.ndarray] | np.ndarray, *, crf: float | None = None,
                  bitrate: float | None = None, fps: float = 10, preset: str = "medium",
                  pix_fmt: str = "yuv420p", lossless_first: bool = False, threads: int = 1,
                  x264_params: str | None = None) -> X264Result:
    """Compress RGB uint8 frames (T, H, W, 3) with x264; return the decoded frames and the bitstream.

    Args:
        crf: constant rate factor (test sets), or ``bitrate`` in bit/s (ABR; training). Exactly one.
        fps: declared frame rate (it changes the bitstream at a fixed CRF or bitrate).
        lossless_first: the COMISR recipe: RGB -> lossless x264 (crf 0, yuv444p) -> decode -> encode.
        threads: x264 threads; pinned to 1 by default so the bitstream does not depend on the machine
            (more: x264's frame threads, deterministic; everything else in the round trip uses one thread).
        pix_fmt: ``yuv420p`` or ``yuv444p``. Odd sizes are edge-padded for 4:2:0 (H.264 cannot crop one
            pixel of 4:2:0), the true size is written in the mp4's ``SIZE_TAG`` metadata, and the decoded
            frames are cropped back (as VideoReader crops the mp4).
    """
    if (crf is None) == (bitrate is None):
        raise ValueError("give exactly one of crf or bitrate")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise SdatcError(f"x264_compress expects uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    ph, pw = (h % 2, w % 2) if pix_fmt == "yuv420p" else (0, 0)
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    H, W = h + ph, w + pw
    rate = Fraction(fps).limit_denominator(100000)
    opts = {"preset": preset, "threads": str(threads)}
    params = x264_params_with_asm(x264_params)  # x264's AVX-512 kernels read uninitialised memory
    if params:
        opts["x264-params"] = params
    src = (av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24") for f in frames)
    if lossless_first:
        lossless = _encode(src, W, H, rate, "yuv444p", {**opts, "crf": "0"})
        src = iter(_decode(lossless))
    true_size = (w, h) if (ph or pw) else None
    if crf is not None:
        data = _encode(src, W, H, rate, pix_fmt, {**opts, "crf": str(crf)}, true_size=true_size)
    else:
        data = _encode(src, W, H, rate, pix_fmt, opts, bitrate=int(bitrate), true_size=true_size)
    out = np.stack([f.to_ndarray(format="rgb24", threads=1) for f in _decode(data)])  # swscale on one thread
    if out.shape[0] != t:
        raise SdatcError(f"x264 round trip returned {out.shape[0]} frames for {t}")
    return X264Result(frames=np.ascontiguousarray(out[:, :h, :w]), data=data, settings=_sei(data),
                      coded_size=(H, W) if true_size else None)


def random_bitrate_compress(frames: np.ndarray, rng: np.random.Generator, low: float = 1e4, high: float = 1e5,
                            pix_fmt: str = "yuv420p") -> tuple[np.ndarray, float]:
    """Training degradation: x264 at a random bitrate in [low, high] bit/s, stream declared at 1 fps.

    Returns (decoded frames, bitrate used)."""
    bitrate = float(rng.uniform(low, high))
    return x264_compress(frames, bitrate=bitrate, fps=1, pix_fmt=pix_fmt).frames, bitrate

"""Video I/O on PyAV: stream RGB uint8 frames from a video file or a frame folder, write mp4 / PNG.

    with VideoReader("clip.mp4") as r:          # or a folder of png/jpg frames
        print(r.meta)                            # fps, frames, size, pix_fmt, codec, audio, x264 SEI, colour, ...
        with VideoWriter("out.mp4", fps=r.meta.rate, crf=18, audio_from="clip.mp4", source=r.meta) as w:
            for i, frame in enumerate(r):        # (H, W, 3) uint8 RGB, one at a time
                w.write(frame, pts=r.timestamps[i])   # the input's frame times (VFR kept)
            w.end_pts = r.end_pts                # where the last frame ends (the audio is cut there)

With ``source=meta`` the mp4 keeps the input's time base, sample aspect ratio, display rotation (metadata
only: pixels stay as stored), colour tags (RGB <-> YUV with the tagged matrix and range) and HDR10
metadata. Writers go to a hidden temporary name beside the target and are renamed only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import math
import os
import platform
import re
import shutil
import struct
import warnings
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image

from sdatc.errors import SdatcError, os_error
from sdatc.utils import natural_key, temp_dir_sibling, temp_sibling, tqdm

VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
# Pixel-format conversion before encoding goes through libavfilter's scale filter with
# flags=bicubic, exactly as the ffmpeg CLI converts (BT.601 limited range for untagged video, left
# chroma siting): the decoded test-set PNGs are bit-identical to those of the CLI recipe
# (`ffmpeg -framerate 10 -i %08d.png -c:v libx264 -crf 0 ...`, then `-crf q -pix_fmt yuv420p`).
SCALE_FLAGS = "bicubic"
# 4:2:0 H.264 cannot code an odd width or height (its crop unit is 2 pixels), so an odd-sized clip is encoded
# edge-padded to even and its true size recorded in this mp4 metadata tag ("WxH"); VideoReader crops to it.
SIZE_TAG = "sdatc_frame_size"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")

_PIL_MODES = {"RGB": "rgb24", "RGBA": "rgba", "L": "gray", "LA": "graya", "P": "pal8", "I;16": "gray16", "I": "gray32"}
# YUV matrices (FFmpeg's AVColorSpace numbers) the scale filter converts RGB to, and ranges (AVColorRange)
_SCALE_MATRIX = {1: "bt709", 4: "fcc", 5: "bt470", 6: "smpte170m", 7: "smpte240m", 9: "bt2020"}
_SCALE_RANGE = {1: "tv", 2: "pc"}


@dataclasses.dataclass(frozen=True)
class ColorTags:
    """A stream's colour description in FFmpeg's numbers (AVColorPrimaries, AVColorTransferCharacteristic,
    AVColorSpace, AVColorRange); 2 (range: 0) is unspecified."""

    primaries: int = 2  # 1 bt709, 9 bt2020
    trc: int = 2  # transfer: 1 bt709, 16 smpte2084 (PQ), 18 arib-std-b67 (HLG)
    space: int = 2  # YUV matrix: 1 bt709, 5/6 bt601, 9 bt2020nc
    range: int = 0  # 1 limited (tv), 2 full (pc)

    @property
    def hdr(self) -> str | None:
        """``"PQ"`` or ``"HLG"`` for an HDR transfer, else None."""
        return {16: "PQ", 18: "HLG"}.get(self.trc)

    def for_output(self) -> ColorTags:
        """The tags of an encode from RGB: a matrix the scale filter cannot produce (RGB, bt2020c, ICtCp,
        ...) becomes bt2020nc for bt2020 primaries, else bt709; the rest is kept."""
        if self.space == 2 or self.space in _SCALE_MATRIX:
            return self
        return dataclasses.replace(self, space=9 if self.primaries == 9 else 1)


@dataclasses.dataclass
class VideoMeta:
    """What is known about a clip before decoding it."""

    path: str
    kind: str  # "video" | "frames"
    num_frames: int
    width: int
    height: int
    fps: float | None  # None for a frame folder unless given
    pix_fmt: str
    codec: str | None = None
    has_audio: bool = False
    encoder_settings: str | None = None  # e.g. "x264 - core 165 r3222 ... crf=25.0 ..."
    rate: Fraction | None = dataclasses.field(default=None, repr=False)  # exact fps (the average one for VFR)
    time_base: Fraction | None = dataclasses.field(default=None, repr=False)  # unit of the reader's timestamps
    end_pts: int | None = dataclasses.field(default=None, repr=False)  # where the stream's last frame ends
    sar: Fraction | None = None  # sample (pixel) aspect ratio; None when square or unknown
    rotation: int = 0  # display rotation, degrees counter-clockwise: metadata, frames are read as stored
    display_matrix: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)  # rotation (+ flips)
    color: ColorTags = ColorTags()
    mastering_display: str | None = None  # HDR10, x264's syntax: "G(x,y)B(x,y)R(x,y)WP(x,y)L(max,min)"
    content_light: str | None = None  # HDR10 "MaxCLL,MaxFALL" in cd/m2
    coded_size: tuple[int, int] | None = dataclasses.field(default=None, repr=False)  # (H, W) as stored, if padded
    frames_from: str = "index"  # num_frames from: "index" (the container's count), "timeline" (packets, checked
    # against the declared duration), "packets" (counted; the container declares no count or duration to check)

    @property
    def bit_depth(self) -> int:
        """Bits per component of ``pix_fmt`` (8 when unknown)."""
        try:
            return max(c.bits for c in av.VideoFormat(self.pix_fmt).components)
        except (ValueError, TypeError):
            return 8

    @property
    def frame_ticks(self) -> int:
        """One frame at the nominal rate, in ``time_base`` units."""
        if not self.rate or not self.time_base:
            return 1
        return max(1, round(1 / (self.rate * self.time_base)))

    def encoder_option(self, name: str) -> str | None:
        """One option of the encoder settings string, e.g. ``encoder_option("crf") -> "25.0"``."""
        if not self.encoder_settings:
            return None
        m = re.search(rf"(?:^|\s){re.escape(name)}=(\S+)", self.encoder_settings)
        return m.group(1) if m else None

    @property
    def encoder_version(self) -> str | None:
        """``"x264 core 165"`` from the SEI, without the options."""
        return encoder_version(self.encoder_settings)


def encoder_version(settings: str | None) -> str | None:
    """``"x264 - core 165 - H.264/MPEG-4 ... options: ..."`` -> ``"x264 core 165"``."""
    if not settings or " - " not in settings:
        return None
    return " ".join(settings.split(" - ")[:2])


@functools.cache
def _x264_asm() -> str | None:
    """x264's ``asm`` setting: ``AVX2`` on an x86-64 CPU that has AVX2, else x264's own CPU detection (None).

    The AVX-512 kernels of the bundled libx264 read memory they never initialised (with mbtree, x264's default):
    the same frames gave bitstreams that depend on what malloc left there (``MALLOC_PERTURB_=1``), so a training
    sample or a test set was not always a function of its inputs. Its AVX2, AVX and SSE4.2 paths agree with one
    another, whatever malloc leaves, and with the AVX-512 output when that memory happens to be benign; pinning
    AVX2 also makes AVX-512 and AVX2-only machines write the same bytes (decisions A69)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return None
    return "AVX2" if "avx2" in flags.split() else None


def x264_params_with_asm(params: str | None) -> str | None:
    """``params`` (x264's ``key=value:...``) with :func:`_x264_asm`'s ``asm=`` added unless it sets one."""
    asm = _x264_asm()
    if asm is None or (params and re.search(r"(?:^|:)(?:no-)?asm=", params)):
        return params
    return ":".join(filter(None, [params, f"asm={asm}"]))


# --------------------------------------------------------------------------- discovery


def list_frame_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` in natural order; a folder that cannot be listed is an SdatcError."""
    folder = Path(folder)
    try:
        files = [p for p in folder.iterdir()
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")]
    except OSError as e:
        raise os_error(folder, e, "cannot read the folder") from None
    return sorted(files, key=lambda p: natural_key(p.name))


def _holds_frames(folder: Path) -> bool:
    """A folder with frames, or one that cannot be read (it is listed as a clip and that clip fails alone)."""
    try:
        return bool(list_frame_files(folder))
    except SdatcError:
        return True


def is_video_file(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in VIDEO_EXTS and not path.name.startswith(".")


def list_clips(root: str | Path, skipped: list[Path] | None = None, prefer_frames: bool = False,
               clashes: dict[str, list[Path]] | None = None) -> dict[str, Path]:
    """Clips under ``root``, by name: a video file or a frame folder is one clip; otherwise every
    video file and every frame folder directly inside ``root`` (sorted naturally). Entries that are
    neither are appended to ``skipped`` when a list is given. Two clips of one name are an error,
    unless ``prefer_frames``: then a frame folder wins over a video of its name (infer.py's
    ``save_frames`` output: the PNGs are exact, the mp4 is re-encoded), or ``clashes`` is a dict: then
    the clips of one name are left out and recorded there (name -> paths), so only they fail."""
    root = Path(root)
    if not root.exists():
        raise SdatcError(f"input not found: {root}")
    if root.is_file():
        if not is_video_file(root):
            raise SdatcError(f"{root}: not a video file (expected one of {', '.join(VIDEO_EXTS)})")
        return {root.stem: root}
    if list_frame_files(root):
        return {root.name: root}
    clips: dict[str, Path] = {}
    for p in sorted(root.iterdir(), key=lambda p: natural_key(p.name)):
        if p.name.startswith("."):
            continue
        name = p.stem if p.is_file() else p.name
        if not (is_video_file(p) or (p.is_dir() and _holds_frames(p))):
            if skipped is not None:
                skipped.append(p)
            continue
        if name in clips and prefer_frames and clips[name].is_dir() != p.is_dir():
            clips[name] = clips[name] if clips[name].is_dir() else p
            continue
        if clashes is not None and (name in clips or name in clashes):
            clashes.setdefault(name, [clips.pop(name)] if name in clips else []).append(p)
            continue
        if name in clips:
            raise SdatcError(f"{root}: two clips are named {name!r} ({clips[name].name}, {p.name})")
        clips[name] = p
    if not clips and clashes:
        raise SdatcError(f"{root}: every clip shares its name with another ({', '.join(clashes)}): rename them")
    if not clips:
        raise SdatcError(f"{root}: no clips found (expected video files or folders of png/jpg frames)")
    return clips


# --------------------------------------------------------------------------- reading


def _open_container(path: Path):
    try:  # metadata that is not UTF-8 (damaged or foreign tags) is read with replacement characters
        return av.open(str(path), mode="r", metadata_errors="replace")
    except (av.error.FFmpegError, OSError) as e:
        raise SdatcError(f"{path}: not a readable video ({_av_reason(e)})") from None


def _av_reason(e: Exception) -> str:
    if isinstance(e, av.error.FFmpegError) and e.errno == 1:  # FFmpeg's generic -1 (EPERM): no data where expected
        return "corrupt or truncated data"
    if isinstance(e, av.error.EOFError):
        return "the file ends early: truncated"
    if isinstance(e, av.error.PatchWelcomeError):  # "Not yet implemented in FFmpeg, patches welcome"
        return "damaged data, or a feature FFmpeg does not support"
    if isinstance(e, av.error.FFmpegError) and e.errno == errno.EIO:
        return "input/output error: a damaged file, or a failing disk"
    return getattr(e, "strerror", None) or str(e).split(": '", 1)[0]


def _duration_tag(value: str | None) -> float | None:
    """Matroska's per-track ``DURATION`` tag (``"00:00:01.000000000"``) in seconds, or None."""
    m = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d*)?)", (value or "").strip())
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None


def _declared_end(c, s) -> float | None:
    """Where the container says the video stream ends, in seconds on the stream's clock: Matroska's track
    ``DURATION`` tag, else the stream's duration, else the container's (only when the video is its one
    stream: the container's duration spans all streams)."""
    tag = _duration_tag(s.metadata.get("DURATION"))
    if tag is not None:
        return tag
    if s.duration:
        return float(((s.start_time or 0) + s.duration) * s.time_base)
    if len(c.streams) == 1 and c.duration:
        return ((c.start_time or 0) + c.duration) / av.time_base
    return None


def _frames(k: int) -> str:
    return f"{k} frame{'s' * (k != 1)}"


def _frame_size_tag(c, coded_w: int, coded_h: int) -> tuple[int, int] | None:
    """The true (H, W) from the ``SIZE_TAG`` metadata when it crops the coded size by less than a macroblock."""
    m = re.fullmatch(r"(\d+)x(\d+)", c.metadata.get(SIZE_TAG, ""))
    if not m:
        return None
    w, h = int(m[1]), int(m[2])
    return (h, w) if 0 <= coded_w - w < 16 and 0 <= coded_h - h < 16 and w and h else None


def _first_frame(container, stream) -> av.VideoFrame | None:
    """The first decoded frame (FFmpeg attaches the display matrix and HDR10 metadata to frames), or None."""
    container.seek(0)
    try:
        return next(container.decode(stream), None)
    except av.error.FFmpegError:
        return None


def _mastering_display(data: bytes) -> str | None:
    """AVMasteringDisplayMetadata (r, g, b, white point xy; min, max luminance: rationals; has_primaries,
    has_luminance) in x264's syntax: xy in units of 0.00002, luminance in 0.0001 cd/m2."""
    v = struct.unpack("=22i", data[:88])
    (rx, ry, gx, gy, bx, by, wx, wy, lmin, lmax) = (Fraction(n, d or 1) for n, d in zip(v[0:20:2], v[1:20:2]))
    if not (v[20] and v[21]):
        return None

    def xy(x: Fraction, y: Fraction) -> str:
        return f"({round(x * 50000)},{round(y * 50000)})"

    return f"G{xy(gx, gy)}B{xy(bx, by)}R{xy(rx, ry)}WP{xy(wx, wy)}L({round(lmax * 10000)},{round(lmin * 10000)})"


def _frame_display_info(frame: av.VideoFrame | None, cc) -> dict:
    """Rotation, display matrix, colour tags and HDR10 metadata of the first frame (colour: else the stream's)."""
    if frame is None:
        return {"color": ColorTags(cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range)}
    info = {"color": ColorTags(frame.color_primaries, frame.color_trc, frame.colorspace, frame.color_range)}
    sd = frame.side_data
    if (m := sd.get("DISPLAYMATRIX")) is not None:
        info["display_matrix"] = struct.unpack("=9i", bytes(m)[:36])
        info["rotation"] = int(frame.rotation)
    if (md := sd.get("MASTERING_DISPLAY_METADATA")) is not None:
        info["mastering_display"] = _mastering_display(bytes(md))
    if (cll := sd.get("CONTENT_LIGHT_LEVEL")) is not None:
        info["content_light"] = "{},{}".format(*struct.unpack("=2I", bytes(cll)[:8]))
    return info


def _read_sei(container, stream) -> str | None:
    """The encoder's settings string from the first packets' SEI (x264/x265 write one)."""
    for i, packet in enumerate(container.demux(stream)):
        data = bytes(packet)
        for marker in (b"x264 - core", b"x265 (build"):
            k = data.find(marker)
            if k >= 0:
                end = data.find(b"\x00", k)
                return data[k : end if end > 0 else len(data)].decode("ascii", "replace")
        if i >= 4:
            break
    return None


class VideoReader:
    """Stream RGB uint8 frames (H, W, 3) from a video file or a folder of png/jpg frames.

    YUV -> RGB uses each frame's tagged matrix and range (PyAV >= 17 reformats with the frame's own
    tags; untagged: BT.601 limited, as ffmpeg). While iterating, ``timestamps`` collects each frame's
    pts in ``meta.time_base`` units (a frame folder: 0, 1, 2, ... at ``fps``).

    Opening checks what can be checked without decoding (a one-line SdatcError otherwise): frames missing
    from a Matroska/WebM timeline, PNG headers and ends; a clip with the ``SIZE_TAG`` is cropped to it."""

    def __init__(self, path: str | Path, fps: float | None = None):
        self.path = Path(path)
        self.timestamps: list[int] = []
        if not self.path.exists():
            raise SdatcError(f"input not found: {self.path}")
        if self.path.is_dir():
            self._files = list_frame_files(self.path)
            if not self._files:
                raise SdatcError(f"{self.path}: folder holds no frames (png/jpg/bmp)")
            self.meta = self._frames_meta(fps)
        else:
            self._files = None
            self.meta = self._video_meta()

    # -- metadata
    def _frames_meta(self, fps: float | None) -> VideoMeta:
        sizes, modes = set(), set()
        first = None
        for f in self._files:
            size, mode = _image_header(f)
            if first is None:
                first = (f, size)
            elif size != first[1]:
                raise SdatcError(
                    f"{self.path}: frames of mixed sizes ({first[0].name} is {first[1][0]}x{first[1][1]}, "
                    f"{f.name} is {size[0]}x{size[1]})"
                )
            sizes.add(size)
            modes.add(mode)
        w, h = first[1]
        mode = sorted(modes)[0]
        return VideoMeta(
            path=str(self.path), kind="frames", num_frames=len(self._files), width=w, height=h,
            fps=fps, pix_fmt=_PIL_MODES.get(mode, mode), codec=self._files[0].suffix.lower().lstrip("."),
            rate=Fraction(fps).limit_denominator(100000) if fps else None,
            time_base=1 / Fraction(fps).limit_denominator(100000) if fps else None,
        )

    def _video_meta(self) -> VideoMeta:
        if not is_video_file(self.path):
            raise SdatcError(f"{self.path}: not a video file or frame folder (expected {', '.join(VIDEO_EXTS)})")
        c = _open_container(self.path)
        try:
            if not c.streams.video:
                raise SdatcError(f"{self.path}: has no video stream")
            s = c.streams.video[0]
            cc = s.codec_context
            if cc is None:
                raise SdatcError(f"{self.path}: video stream of an unknown or unsupported codec (damaged header?)")
            if not cc.width or not cc.height:
                raise SdatcError(f"{self.path}: video stream has no frame size (corrupt file?)")
            rate = s.average_rate or s.guessed_rate
            n, frames_from = (s.frames, "index") if s.frames else self._count_frames(c, s, rate)
            c.seek(0)
            sei = _read_sei(c, s) if cc.name in ("h264", "hevc") else None
            sar = s.sample_aspect_ratio or cc.sample_aspect_ratio
            size = _frame_size_tag(c, cc.width, cc.height)
            return VideoMeta(
                path=str(self.path), kind="video", num_frames=n, width=size[1] if size else cc.width,
                height=size[0] if size else cc.height,
                fps=float(rate) if rate else None, pix_fmt=cc.format.name if cc.format else str(cc.pix_fmt),
                codec=cc.name, has_audio=bool(c.streams.audio), encoder_settings=sei,
                rate=Fraction(rate) if rate else None, time_base=Fraction(s.time_base),
                end_pts=(s.start_time or 0) + s.duration if s.duration else None,
                sar=Fraction(sar) if sar and sar != 1 else None, **_frame_display_info(_first_frame(c, s), cc),
                coded_size=(cc.height, cc.width) if size and size != (cc.height, cc.width) else None,
                frames_from=frames_from,
            )
        except av.error.FFmpegError as e:
            raise SdatcError(f"{self.path}: not a readable video ({_av_reason(e)})") from None
        finally:
            c.close()

    def _count_frames(self, c, s, rate) -> tuple[int, str]:
        """The frame count of a stream whose container keeps none (Matroska, WebM): its packets, checked
        against the timeline. A gap between one packet's end and the next packet's start, or between the
        last packet's end and the declared end of the stream, is frames lost to damage or truncation: an
        error naming how many are missing (each gap counts round(gap x rate) frames, so timestamp rounding
        never adds up to a frame; VFR streams whose packets carry their durations pass)."""
        count, spans = 0, []
        for p in c.demux(s):
            if p.size:
                count += 1
                if p.pts is not None:
                    spans.append((p.pts, p.duration))
        if not count:
            raise SdatcError(f"{self.path}: holds no video packets (truncated or corrupt file)")
        declared = _declared_end(c, s)
        if not rate or not spans:
            return count, "packets"
        tick = 1 / float(rate * s.time_base)  # one frame in time_base units
        missing, end, first_gap = 0, None, None
        for pts, dur in sorted(spans):
            if end is not None and round((pts - end) / tick) >= 1:
                missing += round((pts - end) / tick)
                first_gap = first_gap if first_gap is not None else end
            end = max(end if end is not None else pts, pts + (dur or tick))
        end_s = float(end * s.time_base)
        tail = round((declared - end_s) * float(rate)) if declared is not None else 0
        if missing or tail >= 1:
            where = []
            if missing:
                where.append(f"its timestamps skip about {_frames(missing)} "
                             f"(from {float(first_gap * s.time_base):.2f} s)")
            if tail >= 1:
                where.append(f"it ends at {end_s:.2f} s, about {_frames(tail)} "
                             f"before its declared end at {declared:.2f} s")
            raise SdatcError(f"{self.path}: truncated or damaged video: {count} frames present; {'; '.join(where)}")
        return count, "timeline" if declared is not None else "packets"

    # -- frames
    def __len__(self) -> int:
        return self.meta.num_frames

    def __iter__(self) -> Iterator[np.ndarray]:
        self.timestamps = []
        if self._files is not None:
            for i, f in enumerate(self._files):
                self.timestamps.append(i)
                yield read_image(f)
            return
        c = _open_container(self.path)
        count, h, w = 0, self.meta.height, self.meta.width
        try:
            for frame in c.decode(video=0):
                count += 1
                self.timestamps.append(self._next_pts(frame.pts))
                rgb = frame.to_ndarray(format="rgb24")  # with the frame's colour matrix and range
                yield rgb if rgb.shape[:2] == (h, w) else np.ascontiguousarray(rgb[:h, :w])  # SIZE_TAG crop
        except av.error.FFmpegError as e:
            raise SdatcError(f"{self.path}: truncated or corrupt video, decoding failed after {count} frames "
                             f"({_av_reason(e)})") from None
        finally:
            c.close()
        if count < self.meta.num_frames:
            raise SdatcError(f"{self.path}: truncated or corrupt video, "
                             f"decoded {count} of {self.meta.num_frames} frames")

    def _next_pts(self, pts: int | None) -> int:
        """A frame's pts; one nominal frame after the previous when missing or not increasing (damaged files)."""
        if self.timestamps and (pts is None or pts <= self.timestamps[-1]):
            return self.timestamps[-1] + self.meta.frame_ticks
        return pts or 0

    @property
    def end_pts(self) -> int | None:
        """Where the last frame read so far ends: the stream's end after a full read, else one nominal frame
        after its pts (``meta.time_base`` units; None before reading)."""
        if not self.timestamps:
            return None
        last, end = self.timestamps[-1], self.meta.end_pts
        if end is not None and end > last and len(self.timestamps) >= self.meta.num_frames:
            return end
        return last + self.meta.frame_ticks

    def read_all(self, max_frames: int | None = None) -> np.ndarray:
        """All frames (or the first ``max_frames``) as one (T, H, W, 3) uint8 array."""
        frames = []
        for f in self:
            frames.append(f)
            if max_frames is not None and len(frames) >= max_frames:
                break
        return np.stack(frames)

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        pass


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


def _image_header(path: Path) -> tuple[tuple[int, int], str]:
    """(W, H) and PIL mode from an image's header (PIL checks the PNG signature and IHDR's CRC), and for a
    PNG that its last 12 bytes are the IEND chunk (a cut file lacks it): two small reads, no decode."""
    try:
        with open(path, "rb") as fh, Image.open(fh) as im:
            size, mode, fmt = im.size, im.mode, im.format
            if fmt == "PNG":
                fh.seek(-len(_PNG_END), 2)
                if fh.read() != _PNG_END:
                    raise SdatcError(f"{path}: truncated or damaged PNG (it does not end with an IEND chunk)")
    except SdatcError:
        raise
    except Exception as e:  # PIL: UnidentifiedImageError, SyntaxError (bad CRC), ...; the OS: permissions
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "damaged header, or not an image"
        raise SdatcError(f"{path}: not a readable image ({reason.lower()})") from None
    return size, mode


def read_image(path: str | Path) -> np.ndarray:
    """One image file as RGB uint8 (H, W, 3)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SdatcError(f"{path}: not a readable image (damaged data, or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_video(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Convenience: a whole clip as (T, H, W, 3) uint8."""
    return VideoReader(path).read_all(max_frames)


# --------------------------------------------------------------------------- writing


class FrameConverter:
    """Convert av.VideoFrames to ``pix_fmt`` through a scale filter graph (the ffmpeg CLI's conversion).
    ``color``: the YUV matrix and range to convert to; unspecified ones keep the filter's defaults.
    ``threads``: the filter graph's threads (0: FFmpeg's default, one per CPU)."""

    def __init__(self, pix_fmt: str, color: ColorTags | None = None, threads: int = 0):
        self.pix_fmt, self._graph, self.threads = pix_fmt, None, threads
        color = color or ColorTags()
        self.args = f"flags={SCALE_FLAGS}"
        if color.space in _SCALE_MATRIX:
            self.args += f":out_color_matrix={_SCALE_MATRIX[color.space]}"
        if color.range in _SCALE_RANGE:
            self.args += f":out_range={_SCALE_RANGE[color.range]}"

    def __call__(self, vf: av.VideoFrame) -> av.VideoFrame:
        if vf.format.name == self.pix_fmt:
            return vf
        if self._graph is None:
            g = av.filter.Graph()
            g.threads = self.threads
            src = g.add_buffer(width=vf.width, height=vf.height, format=vf.format.name, time_base=Fraction(1, 10))
            chain = [src, g.add("scale", self.args), g.add("format", self.pix_fmt), g.add("buffersink")]
            for a, b in zip(chain, chain[1:]):
                a.link_to(b)
            g.configure()
            self._graph = g
        vf.pts = None
        self._graph.push(vf)
        return self._graph.pull()


def convert_frames(frames: Iterable[av.VideoFrame], pix_fmt: str, threads: int = 0) -> Iterator[av.VideoFrame]:
    convert = FrameConverter(pix_fmt, threads=threads)
    for vf in frames:
        yield convert(vf)


def _as_rate(fps: float | Fraction) -> Fraction:
    if fps is None or not math.isfinite(fps) or fps <= 0:
        raise SdatcError(f"invalid frame rate {fps!r} (a positive number of frames per second)")
    return fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(100000)


class VideoWriter:
    """Write RGB uint8 frames to an H.264 mp4 (libx264), optionally with another file's audio.

    Args:
        path: output ``.mp4``; written as a hidden temporary file, renamed on ``close()``.
        fps: frame rate (float or Fraction; keep the source's exact ``meta.rate``).
        crf: x264 constant rate factor (0 = lossless); ``bitrate`` (bit/s) instead selects ABR.
        preset: x264 preset. pix_fmt: ``yuv420p`` (default, plays everywhere), ``yuv420p10le`` or ``yuv444p``.
        audio_from: a video file whose audio stream is copied (transcoded to AAC when mp4 can't hold it).
        odd_size: ``"pad"`` (replicate the last row/column to reach even size for 4:2:0, with a
            warning) or ``"error"``.
        options: extra libx264 options (``{"threads": "1", "x264-params": "keyint=30"}``).
        source: the input's VideoMeta: its time base (``write(frame, pts)`` takes the input's
            timestamps), sample aspect ratio, display matrix, colour tags and HDR10 metadata are kept;
            RGB -> YUV uses its matrix and range (untagged: BT.601 limited, as ffmpeg).

    ``end_pts`` (set before closing; ``time_base`` units like the pts) is where the last frame ends:
    the video and the copied audio stop there. Default: one frame at ``fps`` after the last pts.
    ``overwrite=False``: an existing ``path`` is an error, also one that appears while writing. Any error
    (a full disk included, which often shows only when ``close`` flushes x264) removes the temporary file
    and is raised as one SdatcError naming ``path``.
    """

    def __init__(self, path: str | Path, fps: float | Fraction, crf: float | None = 18, bitrate: int | None = None,
                 preset: str = "medium", pix_fmt: str = "yuv420p", audio_from: str | Path | None = None,
                 odd_size: str = "pad", options: dict[str, str] | None = None, source: VideoMeta | None = None,
                 overwrite: bool = True):
        self.path = Path(path)
        self.overwrite = overwrite
        if not overwrite and self.path.exists():
            raise SdatcError(f"{self.path}: already exists (set overwrite to replace it)")
        if self.path.suffix.lower() != ".mp4":
            raise SdatcError(f"{self.path}: VideoWriter writes .mp4 files")
        self.rate = _as_rate(fps)
        self.crf, self.bitrate, self.preset, self.pix_fmt = crf, bitrate, preset, pix_fmt
        self.odd_size, self.options = odd_size, dict(options or {})
        self.audio_from = Path(audio_from) if audio_from else None
        self.source = source
        self.time_base = source.time_base if source is not None and source.time_base else 1 / self.rate
        self.color = source.color.for_output() if source is not None else ColorTags()
        self.end_pts: int | None = None
        self.count = 0
        self._tick = max(1, round(1 / (self.rate * self.time_base)))  # one frame at fps
        self._t0 = self._last = self._held = None  # first pts; last frame's time; a packet awaiting its duration
        self._durations: dict[int, int] = {}  # frame time -> duration, until its packet is muxed
        self._stream = None
        self._size = None
        self._audio = self._c = self._tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = temp_sibling(self.path, ".mp4")
            self._c = av.open(str(self._tmp), mode="w", format="mp4")
        except OSError as e:
            self.abort()
            raise os_error(self.path, e) from None

    def _open_stream(self, h: int, w: int) -> None:
        even = (h + h % 2, w + w % 2) if self.pix_fmt in ("yuv420p", "yuv420p10le", "nv12") else (h, w)
        if even != (h, w):
            if self.odd_size == "error":
                raise SdatcError(f"{self.path}: {w}x{h} is odd-sized; {self.pix_fmt} needs even sizes")
            warnings.warn(f"{self.path.name}: odd size {w}x{h} padded to {even[1]}x{even[0]} for {self.pix_fmt}",
                          stacklevel=3)
        s = self._c.add_stream("libx264", rate=self.rate)
        s.width, s.height, s.pix_fmt = even[1], even[0], self.pix_fmt
        s.codec_context.time_base = self.time_base
        s.codec_context.thread_type = "FRAME"  # as the ffmpeg CLI does (PyAV defaults to slices)
        opts = {"preset": self.preset}
        if self.bitrate is not None:
            s.bit_rate = int(self.bitrate)
        elif self.crf is not None:
            opts["crf"] = str(self.crf)
        opts.update(self.options)
        if self.source is not None:
            self._keep_source_properties(s, opts)
        params = x264_params_with_asm(opts.get("x264-params"))
        if params:
            opts["x264-params"] = params
        s.options = opts
        self._stream, self._size, self._even = s, (h, w), even
        self._convert = FrameConverter(self.pix_fmt, self.color)
        if self.audio_from is not None:  # after the video stream, so video is stream 0
            self._open_audio()

    def _keep_source_properties(self, s, opts: dict[str, str]) -> None:
        """SAR, display matrix (rotation as metadata), colour tags and HDR10 metadata of ``source``."""
        src, cc, c = self.source, s.codec_context, self.color
        if src.sar:
            s.sample_aspect_ratio = src.sar  # the output is 4x in both directions: the same SAR
        if src.display_matrix:
            s.set_display_matrix(list(src.display_matrix))
        cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range = c.primaries, c.trc, c.space, c.range
        hdr10 = [f"mastering-display={src.mastering_display}"] if src.mastering_display else []
        hdr10 += [f"cll={src.content_light}"] if src.content_light else []
        if hdr10:
            opts["x264-params"] = ":".join(filter(None, [opts.get("x264-params"), *hdr10]))

    def _open_audio(self) -> None:
        src = _open_container(self.audio_from)
        if not src.streams.audio:
            src.close()
            return
        a_in = src.streams.audio[0]
        v_start = src.streams.video[0].start_time if src.streams.video else None
        v_tb = src.streams.video[0].time_base if src.streams.video else None
        self._a_offset = float(v_start * v_tb) if v_start is not None else 0.0
        if a_in.codec_context.name in ("aac", "mp3", "alac", "opus", "flac", "ac3", "eac3"):
            self._a_out = self._c.add_stream_from_template(a_in)
            self._transcode = False
        else:
            self._a_out = self._c.add_stream("aac", rate=a_in.codec_context.sample_rate)
            self._transcode = True
        self._audio = (src, a_in, src.demux(a_in))
        self._a_pending = None

    def _mux_audio(self, until: float | None) -> None:
        """Copy source audio packets up to time ``until`` (seconds; None = all)."""
        if self._audio is None:
            return
        src, a_in, packets = self._audio
        while True:
            p = self._a_pending or next(packets, None)
            self._a_pending = None
            if p is None:
                return
            if p.size == 0 or p.pts is None:
                continue
            t = float(p.pts * p.time_base) - self._a_offset
            if until is not None and t > until:
                self._a_pending = p
                return
            if self._transcode:
                for frame in p.decode():
                    frame.pts = None
                    self._c.mux(self._a_out.encode(frame))
            else:
                shift = int(round(self._a_offset / p.time_base))
                p.pts -= shift
                if p.dts is not None:
                    p.dts -= shift
                p.stream = self._a_out
                self._c.mux(p)

    def write(self, frame: np.ndarray, pts: int | None = None) -> None:
        """Append one RGB uint8 frame (H, W, 3) shown at ``pts`` (``time_base`` units, increasing; the
        first frame's is time 0). Default: one frame at ``fps`` after the previous frame."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise SdatcError(f"{self.path}: frames must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
        h, w = frame.shape[:2]
        if self._stream is None:
            self._open_stream(h, w)
        elif (h, w) != self._size:
            raise SdatcError(f"{self.path}: frame {self.count} is {w}x{h}, "
                             f"earlier frames are {self._size[1]}x{self._size[0]}")
        if self._even != (h, w):
            frame = np.pad(frame, ((0, self._even[0] - h), (0, self._even[1] - w), (0, 0)), mode="edge")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        self.write_av_frame(self._convert(vf), pts)

    def write_av_frame(self, vf: av.VideoFrame, pts: int | None = None) -> None:
        """Append a frame already in ``pix_fmt`` at the stream size, at ``pts`` (as ``write``)."""
        try:
            self._write_av_frame(vf, pts)
        except OSError as e:  # a full disk, a file system gone read-only: the caller's abort removes the file
            raise os_error(self.path, e) from None

    def _write_av_frame(self, vf: av.VideoFrame, pts: int | None) -> None:
        if self._stream is None:
            self._open_stream(vf.height, vf.width)
        if self._t0 is None:
            self._t0 = pts or 0
        t = pts - self._t0 if pts is not None else 0 if self._last is None else self._last + self._tick
        if self._last is not None:
            if t <= self._last:
                raise SdatcError(f"{self.path}: frame {self.count} at {pts} is not after the previous frame")
            self._durations[self._last] = t - self._last
            self._mux_held()
        vf.pts, vf.time_base = t, self.time_base
        self._last = t
        self._mux_video(self._stream.encode(vf))
        self.count += 1
        self._mux_audio(float((t + self._tick) * self.time_base))

    def _mux_video(self, packets) -> None:
        """Mux packets with their frame's duration (the last frame's sets where the video ends); a packet
        of the newest frame waits until that is known (the next frame, or ``close``)."""
        for p in packets:
            if self._held is not None:  # not expected (x264 emits one packet per frame): mux it as it is
                self._c.mux(self._held)
                self._held = None
            if p.pts in self._durations:
                p.duration = self._durations.pop(p.pts)
                self._c.mux(p)
            else:
                self._held = p

    def _mux_held(self) -> None:
        if self._held is not None and self._held.pts in self._durations:
            p, self._held = self._held, None
            self._mux_video([p])

    def close(self) -> Path:
        """Flush, close and rename to the final name. Returns the final path. On any error (x264 flushes
        its lookahead here: a full disk often shows first now) the temporary file is removed."""
        if self._stream is None:
            self.abort()
            raise SdatcError(f"{self.path}: no frames were written")
        try:
            self._finish()
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise os_error(self.path, e) from None
            raise
        return self.path

    def _finish(self) -> None:
        end = self.end_pts - self._t0 if self.end_pts is not None else None
        end = end if end is not None and end > self._last else self._last + self._tick
        self._durations[self._last] = end - self._last
        self._mux_held()
        self._mux_video(self._stream.encode(None))
        self._mux_audio(float(end * self.time_base))  # audio up to the end of the video, not beyond
        if self._audio is not None:
            if self._transcode:
                self._c.mux(self._a_out.encode(None))
            self._audio[0].close()
            self._audio = None
        c, self._c = self._c, None
        c.close()
        if not self.overwrite and self.path.exists():  # (a dangling symlink is replaced: it is nothing)
            raise SdatcError(f"{self.path}: appeared while it was being written (set overwrite to replace it)")
        os.replace(self._tmp, self.path)
        self._tmp = None

    def abort(self) -> None:
        """Drop everything written so far (the target is never created). Safe to call more than once."""
        for closing in (self._c, self._audio[0] if self._audio is not None else None):
            try:
                if closing is not None:
                    closing.close()
            except Exception:  # already failing (a full disk): the file is removed below
                pass
        self._c = self._audio = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FrameWriter:
    """Write frames as ``%08d.png`` into a folder that appears only when complete.

    ``overwrite=False``: an existing ``folder`` is an error, also one that appears while writing; with
    ``overwrite`` the old folder is swapped out and removed only after the new one is in place. Any error
    (a full disk included) removes the temporary folder and is raised as one SdatcError naming the folder.
    """

    def __init__(self, folder: str | Path, start: int = 0, ext: str = ".png", overwrite: bool = False):
        self.folder = Path(folder)
        if self.folder.exists() and not overwrite:
            raise SdatcError(f"{self.folder}: already exists (set overwrite to replace it)")
        self.overwrite, self.ext, self.index, self.count = overwrite, ext, start, 0
        self.tmp = None
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = temp_dir_sibling(self.folder)
        except OSError as e:
            raise os_error(self.folder, e) from None

    def write(self, frame: np.ndarray) -> Path:
        path = self.tmp / f"{self.index:08d}{self.ext}"
        ok, data = cv2.imencode(self.ext, cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR))
        if not ok:
            raise SdatcError(f"{path}: could not encode image")
        try:  # Python writes the file (cv2.imwrite returns only False): a full disk is an OSError saying so
            with open(path, "wb") as f:
                f.write(data.tobytes())
        except OSError as e:
            raise os_error(self.folder, e) from None
        self.index += 1
        self.count += 1
        return self.folder / path.name

    def close(self) -> Path:
        """Rename the finished folder into place (with ``overwrite``: swap out the old one, then remove it)."""
        old = None
        try:
            if self.folder.exists() and not self.overwrite:
                raise SdatcError(f"{self.folder}: appeared while it was being written (set overwrite to replace it)")
            if os.path.lexists(self.folder):
                if self.folder.is_dir() and not self.folder.is_symlink():
                    old = temp_dir_sibling(self.folder)  # empty: the old folder is renamed over it
                    os.replace(self.folder, old)
                else:  # a link or a file: removing it touches nothing it points to
                    self.folder.unlink()
            os.replace(self.tmp, self.folder)
            self.tmp = None
        except BaseException as e:
            with contextlib.suppress(OSError):
                if old is not None and not os.path.lexists(self.folder):
                    os.replace(old, self.folder)  # put the old folder back
                elif old is not None:
                    old.rmdir()  # still the empty placeholder (rmdir: never anything in it)
            self.abort()
            if isinstance(e, OSError):
                raise os_error(self.folder, e) from None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.folder

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float | Fraction, **kwargs) -> Path:
    """Write all ``frames`` to an mp4 (see VideoWriter for options)."""
    with VideoWriter(path, fps, **kwargs) as w:
        for f in frames:
            w.write(f)
    return Path(path)


def write_frames(folder: str | Path, frames: Iterable[np.ndarray], overwrite: bool = False) -> Path:
    """Write all ``frames`` as ``folder/%08d.png`` (0-based)."""
    with FrameWriter(folder, overwrite=overwrite) as w:
        for f in frames:
            w.write(f)
    return Path(folder)


def contains_path(folder: Path, path: Path) -> bool:
    """``path`` is ``folder`` or lies inside it (both resolved); also through a bind mount or a hard-linked
    file, by comparing the identity (device, inode) of ``path`` and its existing parents with ``folder``'s."""
    if path == folder or folder in path.parents:
        return True
    try:
        target = folder.stat()
    except OSError:
        return False
    for p in (path, *path.parents):
        try:
            st = p.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


def output_pix_fmt(meta: VideoMeta, choice: str = "auto") -> str:
    """The restored mp4's pixel format: ``choice``, or for ``auto`` yuv420p10le when the input has more
    than 8 bits per component, else yuv420p (the restoration itself works on 8-bit RGB either way)."""
    if choice == "auto":
        return "yuv420p10le" if meta.bit_depth > 8 else "yuv420p"
    if choice not in ("yuv420p", "yuv420p10le"):
        raise SdatcError(f"output_pix_fmt {choice!r} is not one of auto, yuv420p, yuv420p10le")
    return choice


def write_restored(stream, src: Path, mp4: Path | None, frames_dir: Path | None = None, crf: int = 15,
                   preset: str = "medium", copy_audio: bool = True, fps: float = 25.0, name: str | None = None,
                   progress: bool = True, pix_fmt: str = "auto", overwrite: bool = True) -> int:
    """Restore the clip ``src`` (a video or a frame folder at ``fps``) through ``stream(reader, n)`` into
    ``mp4`` (and PNGs in ``frames_dir``; either may be None), each under a temporary name; returns the frames
    written. An existing output is replaced with ``overwrite`` (else an error); an output that is the input,
    or holds it, is always an error. Output frame i is input frame i: it keeps its timestamp; SAR, rotation,
    colour tags and HDR10 metadata are kept."""
    for o in filter(None, (mp4, frames_dir)):  # run() checked already (check_paths); restore_file did not
        s, r = src.resolve(), o.resolve()
        if contains_path(s, r) or contains_path(r, s):
            raise SdatcError(f"output {o} is or holds the input {src} (inputs are never modified)")
    reader = VideoReader(src, fps=fps)
    meta, n, name = reader.meta, len(reader), name or src.stem
    if meta.frames_from == "packets":  # nothing to check the count against (no index, no declared duration)
        print(f"note: {name}: the container declares no frame count or duration; restoring the {n} frames found")
    if meta.color.hdr:
        print(f"note: {name} is HDR ({meta.color.hdr}): its tags are kept, but the model was trained on SDR video")
    audio = src if copy_audio and meta.has_audio else None
    writer = (VideoWriter(mp4, fps=meta.rate or fps, crf=crf, preset=preset, audio_from=audio, overwrite=overwrite,
                          pix_fmt=output_pix_fmt(meta, pix_fmt), source=meta) if mp4 else contextlib.nullcontext())
    with writer:
        frames = FrameWriter(frames_dir, overwrite=overwrite) if frames_dir else contextlib.nullcontext()
        with frames:
            count = 0
            for i, frame in enumerate(tqdm(stream(reader, n), total=n, desc=name, unit="fr", leave=False,
                                           disable=not progress)):
                if mp4:
                    writer.write(frame, pts=reader.timestamps[i] if i < len(reader.timestamps) else None)
                if frames_dir:
                    frames.write(frame)
                count += 1
            if count != n:
                raise SdatcError(f"{name}: wrote {count} of {n} frames")
            if mp4:
                writer.end_pts = reader.end_pts
    return n

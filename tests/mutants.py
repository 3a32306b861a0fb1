"""Seeded mutants of real clips for robustness tests: byte flips, truncation, zeroed ranges, header damage.

    sources = make_sources(frames, tmp / "good")   # {name: path}: mp4, faststart mp4, mkv, webm, PNG folder
    for name, src in sources.items():
        write_mutants(src, tmp / "clips", seed=1)        # clips/<name>_<kind><i>.<ext> (or a frame folder)

Every mutant is a pure function of (source bytes, seed): a failing test names its mutant and reproduces.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np

from sdatc.data.video import write_frames, write_video

KINDS = ("flip", "truncate", "zeros", "header", "tail")


def _encode(path: Path, frames: np.ndarray, fmt: str, codec: str, fps: int = 10, options=None) -> Path:
    """Frames (T, H, W, 3) uint8 into ``path`` with PyAV's muxer ``fmt`` and encoder ``codec``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=fmt, options=options or {}) as box:
        s = box.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            box.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        box.mux(s.encode())
    return path


def make_sources(frames: np.ndarray, folder: Path) -> dict[str, Path]:
    """The good clips mutants are made from, all of ``frames`` at 10 fps: our own mp4 writer (index at the
    end), an mp4 with the index first (``faststart``: a cut keeps the index), Matroska (H.264), WebM (VP8)
    and a PNG folder."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "mp4": write_video(folder / "mp4.mp4", frames, fps=10, crf=25),
        "fast": _encode(folder / "fast.mp4", frames, "mp4", "libx264", options={"movflags": "faststart"}),
        "mkv": _encode(folder / "mkv.mkv", frames, "matroska", "libx264"),
        "webm": _encode(folder / "webm.webm", frames, "webm", "libvpx"),
        "png": write_frames(folder / "png", frames),
    }


def mutate_bytes(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """One mutant of a file's bytes: ``flip`` (1-8 random bytes XOR a random non-zero value), ``truncate``
    (cut at 5-95 %), ``zeros`` (a random range of 16-512 bytes zeroed), ``header`` (flips in the first 64
    bytes) or ``tail`` (flips in the last 10 %)."""
    b = bytearray(data)
    n = len(b)
    if kind == "truncate":
        return bytes(b[: int(n * rng.uniform(0.05, 0.95))])
    if kind == "zeros":
        size = int(rng.integers(16, 513))
        start = int(rng.integers(0, max(1, n - size)))
        b[start : start + size] = bytes(min(size, n - start))
        return bytes(b)
    lo, hi = {"flip": (0, n), "header": (0, min(64, n)), "tail": (int(n * 0.9), n)}[kind]
    for _ in range(int(rng.integers(1, 9))):
        b[int(rng.integers(lo, hi))] ^= int(rng.integers(1, 256))
    return bytes(b)


def write_mutants(src: Path, folder: Path, seed: int, kinds: tuple[str, ...] = KINDS) -> list[Path]:
    """One mutant of ``src`` per kind into ``folder``, named ``<stem>_<kind><seed>``. A video file is mutated
    as a whole; a PNG folder has one of its frames (chosen by the seed) mutated, the others copied."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, k])
        if src.is_dir():
            dst = folder / f"{src.name}_{kind}{seed}"
            shutil.copytree(src, dst)
            files = sorted(dst.iterdir())
            victim = files[int(rng.integers(0, len(files)))]
            victim.write_bytes(mutate_bytes(victim.read_bytes(), kind, rng))
        else:
            dst = folder / f"{src.stem}_{kind}{seed}{src.suffix}"
            dst.write_bytes(mutate_bytes(src.read_bytes(), kind, rng))
        out.append(dst)
    return out

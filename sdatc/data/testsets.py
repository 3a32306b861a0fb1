"""Build the compressed x4 test sets (docs/evaluation.md): BIx4 LR, x264 CRF mp4s, decoded PNGs, manifest.

    OUT/GT/<clip>/%08d.png            (only when GT came as video files: frames extracted first)
    OUT/BIx4/<clip>/%08d.png          MATLAB bicubic 1/4 of GT
    OUT/mp4/crf<q>/<clip>.mp4         COMISR recipe: fps 10 -> lossless x264 -> x264 -preset medium -crf q
    OUT/BIx4_crf<q>/<clip>/%08d.png   decoded frames, same count and size as BIx4 (the table input)
    OUT/manifest.json                 settings, versions, per-clip bytes and kbit/s, sha256 per PNG

Re-running with the same settings reuses the clips already in the manifest (their recorded versions kept).
An LR size that 4:2:0 cannot code (odd) is encoded edge-padded to even with the true size in the mp4's
``sdatc_frame_size`` tag (``coded_size`` in the manifest); VideoReader crops to it, so infer.py restores
exactly 4x the LR size.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from importlib import resources
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np

import sdatc
from sdatc.config import check_fps, to_dict
from sdatc.data.compress import SCALE_FLAGS, x264_compress
from sdatc.data.imresize import bicubic_down
from sdatc.data.video import X264_PRESETS, FrameWriter, VideoReader, encoder_version, list_clips
from sdatc.errors import SdatcError
from sdatc.utils import atomic_write_bytes, atomic_write_text, sha256_file, tqdm

MANIFEST_FORMAT = "sdatc-testset/1"
CLIP_LISTS = ("reds4", "vid4", "udm10", "reds_train")


@dataclasses.dataclass
class TestSetConfig:
    """Settings of ``scripts/make_testsets.py`` (every field is recorded in the manifest)."""

    __test__ = False  # not a pytest test class

    gt_root: str | None = None  # folder of clip folders, or a video file, or a folder of videos
    out: str | None = None
    crf: list[int] = dataclasses.field(default_factory=lambda: [15, 25, 35])
    pix_fmt: Literal["yuv420p", "yuv444p"] = "yuv420p"
    fps: float = 10.0  # declared frame rate of the encode (changes the bitstream)
    preset: str = "medium"
    scale: int = 4
    lossless_first: bool = True  # COMISR: frames -> lossless x264 (yuv444p) -> x264 at crf q
    x264_threads: int = 1  # pinned so the bitstream is the same on every machine
    clip_list: str | None = None  # reds4 | vid4 | udm10 | reds_train: take (and require) these clips
    clips: list[str] | None = None  # or an explicit subset of clip names
    max_frames: int | None = None  # first N frames of each clip (quick runs; recorded)
    overwrite: bool = False  # rebuild even if OUT holds a manifest with other settings

    def __post_init__(self):
        if self.preset not in X264_PRESETS:
            raise ValueError(f"preset {self.preset!r} is not an x264 preset ({', '.join(X264_PRESETS)})")
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        check_fps(self.fps)
        if self.clip_list is not None and self.clip_list not in CLIP_LISTS:
            raise ValueError(f"clip_list {self.clip_list!r} is not one of {list(CLIP_LISTS)}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError("max_frames must be >= 1")

    def recipe(self) -> dict:
        """The settings that determine the outputs (a manifest with other values is not reused)."""
        keys = ("crf", "pix_fmt", "fps", "preset", "scale", "lossless_first", "x264_threads", "max_frames")
        return {k: to_dict(self)[k] for k in keys}


def load_clip_list(name: str) -> dict[str, int | None]:
    """A known clip list shipped with the package: {clip: expected frame count}."""
    if name not in CLIP_LISTS:
        raise SdatcError(f"unknown clip list {name!r} (known: {', '.join(CLIP_LISTS)})")
    text = resources.files("sdatc.data").joinpath("clip_lists", f"{name}.txt").read_text()
    out: dict[str, int | None] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].split()
        if line:
            out[line[0]] = int(line[1]) if len(line) > 1 else None
    return out


def versions() -> dict:
    return {
        "sdatc": sdatc.__version__, "pyav": av.__version__, "opencv": cv2.__version__, "numpy": np.__version__,
        "libav": {k: ".".join(map(str, v)) for k, v in av.library_versions.items()},
        "python": platform.python_version(),
    }


def _select_clips(cfg: TestSetConfig) -> dict[str, Path]:
    clips = list_clips(cfg.gt_root)
    wanted = list(load_clip_list(cfg.clip_list)) if cfg.clip_list else cfg.clips
    if wanted:
        missing = [c for c in wanted if c not in clips]
        if missing:
            raise SdatcError(f"{cfg.gt_root}: clips not found: {', '.join(missing)} "
                             f"(have: {', '.join(list(clips)[:8])}...)")
        clips = {c: clips[c] for c in wanted}
    return clips


def _read_manifest(out: Path, cfg: TestSetConfig) -> dict:
    path = out / "manifest.json"
    fresh = {"format": MANIFEST_FORMAT, "settings": cfg.recipe(), "clips": {}}
    if not path.exists():
        return fresh
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SdatcError(f"{path}: unreadable manifest; remove it or choose another --out") from None
    if old.get("format") != MANIFEST_FORMAT or old.get("settings") != cfg.recipe():
        if not cfg.overwrite:
            raise SdatcError(f"{out} holds test sets built with other settings ({path}); "
                             "use another --out or overwrite=true")
        return fresh
    return old


def _clip_complete(out: Path, name: str, entry: dict, crfs: list[int]) -> bool:
    paths = ([out / "BIx4" / name] + [out / f"BIx4_crf{q}" / name for q in crfs]
             + [out / "mp4" / f"crf{q}" / f"{name}.mp4" for q in crfs])
    return all(p.exists() for p in paths) and all(str(q) in entry.get("crf", {}) for q in crfs)


def _hash_folder(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def build_clip(cfg: TestSetConfig, name: str, src: Path, out: Path, expected_frames: int | None = None) -> dict:
    """Make every output of one clip; returns its manifest entry."""
    reader = VideoReader(src)
    m = reader.meta
    if m.height % cfg.scale or m.width % cfg.scale:
        raise SdatcError(f"clip {name!r}: GT size {m.width}x{m.height} is not divisible by {cfg.scale} "
                         f"(x{cfg.scale} LR needs it)")
    n = min(m.num_frames, cfg.max_frames) if cfg.max_frames else m.num_frames
    if expected_frames is not None and cfg.max_frames is None and n != expected_frames:
        raise SdatcError(f"clip {name!r}: {n} frames, the {cfg.clip_list} list expects {expected_frames}")

    gt_dir = src if m.kind == "frames" else out / "GT" / name
    gt_writer = FrameWriter(gt_dir, overwrite=True) if m.kind == "video" else None
    lr = []
    try:
        for i, frame in enumerate(tqdm(reader, total=n, desc=f"{name}: x1/{cfg.scale}", leave=False, unit="fr")):
            if i >= n:
                break
            if gt_writer:
                gt_writer.write(frame)
            lr.append(bicubic_down(frame, cfg.scale))
    except BaseException:
        if gt_writer:
            gt_writer.abort()
        raise
    if gt_writer:
        gt_writer.close()
    lr = np.stack(lr)
    gt_files = sorted(p for p in gt_dir.iterdir() if p.is_file())[:n] if m.kind == "video" else reader._files[:n]

    with FrameWriter(out / "BIx4" / name, overwrite=True) as w:
        for f in lr:
            w.write(f)
    entry = {
        "source": str(src), "gt_dir": str(gt_dir), "kind": m.kind, "frames": n,
        "gt_size": [m.height, m.width], "lr_size": list(lr.shape[1:3]),
        "gt_sha256": {p.name: sha256_file(p) for p in gt_files},
        "lr_sha256": _hash_folder(out / "BIx4" / name), "crf": {},
    }
    for q in cfg.crf:
        r = x264_compress(lr, crf=q, fps=cfg.fps, preset=cfg.preset, pix_fmt=cfg.pix_fmt,
                          lossless_first=cfg.lossless_first, threads=cfg.x264_threads)
        if r.frames.shape != lr.shape:
            raise SdatcError(f"clip {name!r} crf {q}: decoded {r.frames.shape}, expected {lr.shape}")
        mp4 = out / "mp4" / f"crf{q}" / f"{name}.mp4"
        atomic_write_bytes(mp4, r.data)
        folder = out / f"BIx4_crf{q}" / name
        with FrameWriter(folder, overwrite=True) as w:
            for f in r.frames:
                w.write(f)
        entry["crf"][str(q)] = {
            "mp4": str(mp4.relative_to(out)), "bytes": r.num_bytes,
            "kbps": round(r.num_bytes * 8 / 1000 / (n / cfg.fps), 3),
            "mp4_sha256": sha256_file(mp4), "x264": r.settings, "png_sha256": _hash_folder(folder),
        }
        if r.coded_size:  # odd LR size: padded to even in the bitstream, the true size in the mp4's tag
            entry["crf"][str(q)]["coded_size"] = list(r.coded_size)
    return entry


def build_testsets(cfg: TestSetConfig) -> tuple[dict, dict]:
    """Build (or complete) the test sets described by ``cfg``; returns (manifest, {built, reused})."""
    if not cfg.gt_root or not cfg.out:
        raise SdatcError("both gt_root (--gt-root) and out (--out) are required")
    out = Path(cfg.out)
    gt_root = Path(cfg.gt_root).resolve()
    if out.resolve() == gt_root or gt_root in out.resolve().parents:
        raise SdatcError(f"--out {out} must not be inside the GT root {gt_root} (inputs are never modified)")
    clips = _select_clips(cfg)
    expected = load_clip_list(cfg.clip_list) if cfg.clip_list else {}
    out.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out, cfg)
    manifest["resize"] = "MATLAB imresize bicubic (a=-0.5, antialiased), uint8 rounded (sdatc.data.imresize)"
    manifest["colour"] = (f"RGB->YUV by libavfilter scale (flags={SCALE_FLAGS}; BT.601 limited, as the ffmpeg CLI), "
                          "YUV->RGB by PyAV to_ndarray (same bytes as the CLI's PNG output)")
    recorded = manifest.get("versions")
    done = reused = 0
    for name, src in tqdm(clips.items(), desc="clips", unit="clip"):
        entry = manifest["clips"].get(name)
        if entry and not cfg.overwrite and _clip_complete(out, name, entry, cfg.crf):
            reused += 1
            continue
        manifest["clips"][name] = build_clip(cfg, name, src, out, expected.get(name))
        manifest["updated"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        manifest["versions"] = {**versions(), "x264": _x264_versions(manifest)}
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
        done += 1
    if not done:  # all reused: the versions that built them stay (an old manifest without x264: from the clips)
        manifest["versions"] = {**(recorded or versions()), "x264": _x264_versions(manifest)}
    return manifest, {"built": done, "reused": reused}


def _x264_versions(manifest: dict) -> str | None:
    """The x264 version(s) of the manifest's clips, from each encode's settings string (``; ``-joined when
    clips were built by different versions)."""
    found = {encoder_version(v.get("x264")) for e in manifest["clips"].values() for v in e.get("crf", {}).values()}
    return "; ".join(sorted(found - {None})) or None

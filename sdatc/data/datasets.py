"""Training data: N consecutive GT frames from a folder of clips, cropped, augmented, degraded on the fly.

    ds = VideoClipDataset(TrainDataConfig(root="datasets/REDS/train_sharp", clip_list="reds_train"))
    sample = ds[i]       # {"gt": (N, 3, 512, 512), "lq": (N, 3, 128, 128) float in [0, 1], "index", "clip", ...}
    loader = make_loader(ds, batch_size=4, start=0, rank=0, world_size=8, num_workers=4)

Every sample is a pure function of ``(seed, index)``: which clip (a fresh permutation of the clips per
epoch, BasicSR-style), the start frame, crop, flips, temporal reversal and the x264 bitrate. So a data
loader never needs its own state: rank r of W at global sample position p reads indices p + r,
p + r + W, ... (see :class:`ShardSampler`), and a resumed run restarts at the saved position.

Clips are video files or folders of frames (png/jpg) directly inside ``root`` (REDS layout:
``train_sharp/<clip>/%08d.png``), optionally restricted to a clip list shipped with the package
(``reds_train``: the 266 REDS training clips) or a text file of names.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sdatc.data.degradations import Degradation, DegradationConfig
from sdatc.data.video import VideoReader, list_clips, list_frame_files, read_image
from sdatc.errors import SdatcError


@dataclasses.dataclass
class TrainDataConfig:
    root: str | None = None  # folder of clips (frame folders or videos)
    clip_list: str | None = None  # a package clip list (e.g. reds_train) or a text file of clip names
    exclude: list[str] = dataclasses.field(default_factory=list)  # clips held out (e.g. the validation clip)
    num_frames: int = 5  # N consecutive frames per sample
    gt_size: int = 512  # square GT crop (the LR crop is gt_size / scale)
    flip: bool = True  # random horizontal and vertical flips
    temporal_reverse: bool = True  # random reversal of the frame order
    degradation: DegradationConfig = dataclasses.field(default_factory=DegradationConfig)
    num_workers: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.gt_size < 1 or self.gt_size % self.degradation.scale:
            raise ValueError(f"gt_size {self.gt_size} must be a positive multiple of the scale "
                             f"{self.degradation.scale}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclasses.dataclass
class ClipInfo:
    name: str
    path: Path
    num_frames: int
    height: int
    width: int
    files: list[Path] | None  # frame files, or None for a video


def scan_clips(cfg: TrainDataConfig) -> list[ClipInfo]:
    """The training clips with enough frames and size for a sample; clear errors otherwise."""
    if not cfg.root:
        raise SdatcError("data.root is not set: give the folder of training clips (data.root=DIR)")
    root = Path(cfg.root)
    if not root.is_dir():
        raise SdatcError(f"data.root not found or not a folder: {root}")
    clips = list_clips(root)
    if cfg.clip_list:
        wanted = _read_clip_list(cfg.clip_list)
        missing = [c for c in wanted if c not in clips]
        if missing:
            raise SdatcError(f"{root}: {len(missing)} clips of {cfg.clip_list} are missing "
                             f"(e.g. {', '.join(missing[:5])})")
        clips = {c: clips[c] for c in wanted}
    clips = {n: p for n, p in clips.items() if n not in set(cfg.exclude)}
    out, short, small = [], [], []
    for name, path in clips.items():
        try:  # frame folders: every frame's header and PNG end checked (no decode); videos: the timeline
            meta = VideoReader(path).meta
        except SdatcError as e:
            hint = f"training clip {name!r}: repair it or leave it out with data.exclude=[{name}]"
            raise SdatcError(f"{e} ({hint})") from None
        files = list_frame_files(path) if path.is_dir() else None
        info = ClipInfo(name, path, meta.num_frames, meta.height, meta.width, files)
        if info.num_frames < cfg.num_frames:
            short.append(f"{name} ({info.num_frames})")
        elif min(info.height, info.width) < cfg.gt_size:
            small.append(f"{name} ({info.width}x{info.height})")
        else:
            out.append(info)
    if not out:
        why = []
        if short:
            why.append(f"fewer than {cfg.num_frames} frames: {', '.join(short[:5])}")
        if small:
            why.append(f"smaller than the {cfg.gt_size}x{cfg.gt_size} crop (data.gt_size): {', '.join(small[:5])}")
        raise SdatcError(f"{root}: no clip can give a training sample ({'; '.join(why) or 'no clips'})")
    return out


def _read_clip_list(name: str) -> list[str]:
    from sdatc.data.testsets import CLIP_LISTS, load_clip_list

    if name in CLIP_LISTS:
        return list(load_clip_list(name))
    path = Path(name)
    if not path.is_file():
        raise SdatcError(f"clip_list {name!r} is neither a known list ({', '.join(CLIP_LISTS)}) nor a file")
    return [line.split("#", 1)[0].split()[0] for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]


def read_frames(clip: ClipInfo, start: int, count: int) -> np.ndarray:
    """Frames [start, start + count) of a clip, (count, H, W, 3) uint8."""
    if clip.files is not None:
        return np.stack([read_image(f) for f in clip.files[start:start + count]])
    frames = []
    for i, frame in enumerate(VideoReader(clip.path)):  # decode up to the frames needed
        if i >= start:
            frames.append(frame)
        if len(frames) == count:
            break
    if len(frames) < count:
        raise SdatcError(f"{clip.path}: decoded {start + len(frames)} frames, {start + count} needed")
    return np.stack(frames)


class VideoClipDataset(Dataset):
    """Index -> one training sample (see the module docstring). ``len`` is one epoch of clips."""

    def __init__(self, cfg: TrainDataConfig, clips: list[ClipInfo] | None = None):
        self.cfg = cfg
        self.clips = clips if clips is not None else scan_clips(cfg)
        self.degrade = Degradation(cfg.degradation)

    def __len__(self) -> int:
        return len(self.clips)

    def clip_of(self, index: int, shift: int = 0) -> ClipInfo:
        """The clip of sample ``index`` (``shift``: the one after it in the epoch's permutation)."""
        epoch, k = divmod(index, len(self.clips))
        perm = np.random.default_rng([self.cfg.seed, 7, epoch]).permutation(len(self.clips))
        return self.clips[perm[(k + shift) % len(self.clips)]]

    def __getitem__(self, index: int) -> dict:
        """Sample ``index``; a frame that does not decode (damage the scan's header checks cannot see) is
        logged in one line and the sample taken from the next clip of the permutation instead (still a
        function of seed and index), so a data loader worker never dies hours into a run."""
        for shift in range(len(self.clips)):
            clip = self.clip_of(index, shift)
            try:
                return self._sample(index, clip)
            except SdatcError as e:
                print(f"warning: sample {index}: {e}; taking it from another clip", file=sys.stderr, flush=True)
        raise SdatcError(f"sample {index}: no training clip could be read")

    def _sample(self, index: int, clip: ClipInfo) -> dict:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 11, index])
        n, size, s = cfg.num_frames, cfg.gt_size, cfg.degradation.scale
        start = int(rng.integers(0, clip.num_frames - n + 1))
        top = int(rng.integers(0, (clip.height - size) // s + 1)) * s  # on the LR grid, so LR = GT / s exactly
        left = int(rng.integers(0, (clip.width - size) // s + 1)) * s
        gt = read_frames(clip, start, n)[:, top:top + size, left:left + size]  # (N, size, size, 3)
        if cfg.flip and rng.random() < 0.5:
            gt = gt[:, :, ::-1]
        if cfg.flip and rng.random() < 0.5:
            gt = gt[:, ::-1]
        if cfg.temporal_reverse and rng.random() < 0.5:
            gt = gt[::-1]
        gt = np.ascontiguousarray(gt)
        lq, info = self.degrade(gt, rng)  # (N, size/s, size/s, 3)
        return {
            "gt": torch.from_numpy(gt).permute(0, 3, 1, 2).float().div(255),  # (N, 3, size, size)
            # (N, 3, size/s, size/s)
            "lq": torch.from_numpy(np.ascontiguousarray(lq)).permute(0, 3, 1, 2).float().div(255),
            "index": index, "clip": clip.name, "start": start, "bitrate": info["bitrate"],
        }


class ShardSampler(Sampler[int]):
    """Infinite stream of sample indices for one rank: ``start + rank, start + rank + W, ...``.

    ``start`` is the global position (samples consumed by all ranks so far), so a resumed run
    continues exactly where it stopped.
    """

    def __init__(self, start: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self):
        i = self.start + self.rank
        while True:
            yield i
            i += self.world_size


def _collate(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in ("gt", "lq", "z") if k in items[0]}  # (B, N, C, H, W)
    for k in ("index", "start", "bitrate"):
        out[k] = torch.tensor([it[k] for it in items])
    out["clip"] = [it["clip"] for it in items]
    return out


def make_loader(ds: VideoClipDataset, batch_size: int, start: int = 0, rank: int = 0, world_size: int = 1,
                num_workers: int | None = None, pin_memory: bool = False) -> DataLoader:
    """Batches of ``batch_size`` samples for this rank, from global sample position ``start``; ``pin_memory``
    (CUDA runs): page-locked batches, so host-to-device copies can be asynchronous."""
    workers = ds.cfg.num_workers if num_workers is None else num_workers
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(start, rank, world_size), num_workers=workers,
                      pin_memory=pin_memory,
                      collate_fn=_collate, persistent_workers=workers > 0, prefetch_factor=2 if workers else None,
                      generator=torch.Generator().manual_seed(ds.cfg.seed))  # never draws from the global RNG

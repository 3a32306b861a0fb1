"""Training data: deterministic samples from (seed, index), crops on the LR grid, rank sharding, bad roots."""

import numpy as np
import pytest

from sdatc.data.datasets import (
    ShardSampler,
    TrainDataConfig,
    VideoClipDataset,
    make_loader,
    scan_clips,
)
from sdatc.data.degradations import Degradation, DegradationConfig
from sdatc.data.video import write_frames, write_video
from sdatc.errors import SdatcError


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory, carphone_frames):
    """Two real clips: a frame folder (8 frames, 176x144) and an mp4 (6 frames)."""
    root = tmp_path_factory.mktemp("clips")
    write_frames(root / "folder_clip", carphone_frames)
    write_video(root / "video_clip.mp4", carphone_frames[:6, :, ::-1], fps=10, crf=10)
    return root


def test_samples_are_a_function_of_seed_and_index(clip_root):
    ds = VideoClipDataset(TrainDataConfig(root=str(clip_root), gt_size=64, num_workers=0))
    assert len(ds) == 2 and {c.name for c in ds.clips} == {"folder_clip", "video_clip"}
    a, b = ds[3], ds[3]
    assert a["gt"].shape == (5, 3, 64, 64) and a["lq"].shape == (5, 3, 16, 16)
    assert a["gt"].dtype == a["lq"].dtype and 0 <= a["gt"].min() and a["gt"].max() <= 1
    assert (a["gt"] == b["gt"]).all() and (a["lq"] == b["lq"]).all() and a["bitrate"] == b["bitrate"]
    assert 1e4 <= a["bitrate"] <= 1e5
    c = ds[4]
    assert not (c["gt"].shape == a["gt"].shape and (c["gt"] == a["gt"]).all())
    # each epoch visits every clip once
    assert {ds.clip_of(i).name for i in range(2)} == {"folder_clip", "video_clip"}
    assert {ds.clip_of(i).name for i in range(2, 4)} == {"folder_clip", "video_clip"}


def test_crop_is_on_the_lr_grid_and_lq_is_degraded_gt(clip_root):
    ds = VideoClipDataset(TrainDataConfig(root=str(clip_root), gt_size=128, flip=False, temporal_reverse=False,
                                          num_workers=0, degradation=DegradationConfig(bitrate=(1e5, 1e5), fps=25)))
    s = ds[0]
    # LQ is close to the bicubic x1/4 of its own GT crop (x264 at a generous bitrate)
    from sdatc.data.imresize import imresize

    lr = imresize(s["gt"], scale=0.25)
    assert (lr - s["lq"]).abs().mean() < 0.03


def test_shard_sampler_splits_ranks_and_resumes():
    it = [iter(ShardSampler(start=10, rank=r, world_size=3)) for r in range(3)]
    taken = [[next(i) for _ in range(4)] for i in it]
    assert sorted(sum(taken, [])) == list(range(10, 22))
    assert taken[1][:2] == [11, 14]


def test_loader_batches(clip_root):
    ds = VideoClipDataset(TrainDataConfig(root=str(clip_root), gt_size=64, num_workers=0))
    batch = next(iter(make_loader(ds, batch_size=2, start=4, rank=1, world_size=2)))
    assert batch["gt"].shape == (2, 5, 3, 64, 64) and batch["index"].tolist() == [5, 7]
    assert (batch["gt"][0] == ds[5]["gt"]).all()


def test_second_order_degradation(carphone_frames):
    deg = Degradation(DegradationConfig(kind="second_order"))
    lq, info = deg(carphone_frames[:3, :128, :160], np.random.default_rng(0))
    assert lq.shape == (3, 32, 40, 3) and lq.dtype == np.uint8
    assert set(info) == {"round0", "round1", "bitrate"}


def test_bad_roots(tmp_path, clip_root):
    with pytest.raises(SdatcError, match="data.root is not set"):
        scan_clips(TrainDataConfig())
    with pytest.raises(SdatcError, match="not found"):
        scan_clips(TrainDataConfig(root=str(tmp_path / "nope")))
    with pytest.raises(SdatcError, match="fewer than 9 frames"):
        scan_clips(TrainDataConfig(root=str(clip_root), num_frames=9, gt_size=64))
    with pytest.raises(SdatcError, match="smaller than the 256x256 crop"):
        scan_clips(TrainDataConfig(root=str(clip_root), gt_size=256))
    with pytest.raises(SdatcError, match="missing"):
        scan_clips(TrainDataConfig(root=str(clip_root), clip_list="reds4", gt_size=64))
    with pytest.raises(ValueError, match="multiple of the scale"):
        TrainDataConfig(gt_size=66)


def test_regroup_reds(tmp_path, carphone_frames):
    from sdatc.data.reds import regroup_reds

    root = tmp_path / "REDS"
    for sub, n in (("train_sharp", 240), ("val_sharp", 30)):
        for i in range(n):
            (root / sub / f"{i:03d}").mkdir(parents=True)
            for f in range(2):
                (root / sub / f"{i:03d}" / f"{f:08d}.png").write_bytes(b"")
    plan = regroup_reds(root, tmp_path / "all", frames=2)
    assert len(plan) == 270 and (tmp_path / "all" / "269").resolve() == (root / "val_sharp" / "029").resolve()
    assert sorted(p.name for p in (tmp_path / "all").iterdir())[:2] == ["000", "001"]
    with pytest.raises(SdatcError, match="exists already"):
        regroup_reds(root, tmp_path / "all", frames=2)
    (root / "val_sharp" / "007" / "00000001.png").unlink()
    with pytest.raises(SdatcError, match="holds 1 frames"):
        regroup_reds(root, tmp_path / "other", frames=2)
    assert not (tmp_path / "other").exists()


def test_crf_spread_option(carphone_frames):
    deg = Degradation(DegradationConfig(crf=(20, 30), crf_prob=1.0))
    lq, info = deg(carphone_frames[:3, :64, :64], np.random.default_rng(1))
    assert lq.shape == (3, 16, 16, 3) and 20 <= info["crf"] <= 30 and info["bitrate"] == 0.0
    with pytest.raises(ValueError, match="crf must be a range"):
        DegradationConfig(crf=(30, 60))

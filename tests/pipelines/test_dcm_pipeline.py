"""DCMPipeline: worker threads, batch sizes and the batch in flight give the same frames; torch's thread
count is restored however the stream ends; the input checks stay."""

import numpy as np
import pytest
import torch

from sdatc.errors import SdatcError
from sdatc.models.dcm import DCM, DCMConfig
from sdatc.pipelines.config import PipelineConfig
from sdatc.pipelines.dcm_pipeline import DCMPipeline


@pytest.fixture(scope="module")
def dcm() -> DCM:
    torch.manual_seed(0)
    return DCM(DCMConfig(embed_dim=24, depths=[2], num_heads=[2], num_feat=16)).eval()


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (18, 26, 3), dtype=np.uint8) for _ in range(7)]


def frames(dcm, clip, **kw) -> np.ndarray:
    pipe = DCMPipeline(dcm, PipelineConfig(), progress=False, **kw)
    return np.stack(list(pipe.stream(iter(clip), len(clip))))


def test_workers_and_batches_give_the_same_frames(dcm, clip):
    with torch.inference_mode():
        want = (dcm(torch.from_numpy(np.stack(clip)).permute(0, 3, 1, 2).float() / 255).clamp(0, 1) * 255).round()
    want = want.byte().permute(0, 2, 3, 1).numpy()
    for kw in [dict(workers=1), dict(workers=2), dict(workers=3, batch=3), dict(workers=2, batch=1), dict(batch=7)]:
        got = frames(dcm, clip, **kw)
        assert got.shape == (7, 72, 104, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (kw, diff.max(), (diff > 0).mean())


def test_thread_count_restored(dcm, clip):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pipe = DCMPipeline(dcm, PipelineConfig(), progress=False)
        assert (pipe.workers, pipe.worker_threads) == (2, 1)  # 2 cores: 2 workers of 1 thread
        stream = pipe.stream(iter(clip), len(clip))
        next(stream)
        assert torch.get_num_threads() == 1  # while the stream runs: the workers' thread count
        stream.close()  # abandoned midway (an encoder error, Ctrl-C)
        assert torch.get_num_threads() == 2
        assert len(list(pipe.stream(iter(clip), len(clip)))) == len(clip)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(8)
        pipe = DCMPipeline(dcm, PipelineConfig(), progress=False)
        assert (pipe.workers, pipe.worker_threads) == (4, 2)  # at most batch (4) workers, threads shared
    finally:
        torch.set_num_threads(before)


def test_input_checks(dcm, clip):
    pipe = DCMPipeline(dcm, PipelineConfig(), progress=False, workers=2)
    with pytest.raises(SdatcError, match="ended after 7 frames, 9 expected"):
        list(pipe.stream(iter(clip), 9))
    with pytest.raises(SdatcError, match="frame 2 is"):
        list(pipe.stream(iter(clip[:2] + [clip[2][:10]]), 3))
    with pytest.raises(SdatcError, match="too small"):
        list(pipe.stream(iter([clip[0][:5]]), 1))
    with pytest.raises(SdatcError, match="no frames"):
        list(pipe.stream(iter([]), 0))


def test_tiles_only_when_memory_asks(dcm, clip):
    """``auto`` restores whole frames when the batch fits the budget (even above ``dcm_tile``) and tiles
    when it does not; the tiled frames stay close to the whole ones (overlaps blended)."""
    from sdatc.pipelines.config import TilingConfig

    def run(memory_gb: float, mode: str = "auto"):
        cfg = PipelineConfig(tiling=TilingConfig(mode=mode, memory_gb=memory_gb, dcm_tile=16, dcm_overlap=4))
        pipe = DCMPipeline(dcm, cfg, progress=False, workers=1, batch=7)
        out = np.stack(list(pipe.stream(iter(clip), len(clip))))
        return out, pipe.plans["dcm"]

    whole, plan = run(1.0)
    assert not plan.tiled and plan.batch == 7 and plan.need < plan.budget
    tiled, plan = run(plan.need / 7 / 2**30 / 2)  # half a frame fits: tiles
    assert plan.tiled and plan.need > plan.budget
    forced, plan_on = run(1.0, "on")
    assert plan_on.tiled
    assert np.abs(tiled.astype(int) - forced).max() <= 1  # the same tiles (batched otherwise: rounding)
    diff = np.abs(tiled.astype(int) - whole)
    assert diff.mean() < 2.0 and diff.max() < 64, (diff.mean(), diff.max())

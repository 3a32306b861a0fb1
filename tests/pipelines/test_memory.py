"""Tiling decided by memory: the planner, tiles x frames on the batch axis, and the pipeline's call count.

* ``plan_stage``: whole frames when the estimate fits the budget, tiles batched up to the budget when not;
  ``on`` always tiles, ``off`` never; a temporal stage's batch is whole windows.
* ``plan_vae``: the VAE costed as it runs (frames per frozen-block call, tiles): UltraVSR's 16-frame 720p
  decoder with ``chunk_frames: 1`` is not tiled with an H200's budget; frames are split before tiling; tiles
  shrink until the estimate fits; the estimate of a tiled plan is below the untiled one.
* ``tiled_batched`` equals ``tiled_apply`` (one tile at a time) up to float rounding, for any batch.
* With memory to spare, the tiny SDATC at 90x160 input runs each frame once per step and window:
  frame evaluations per output frame == steps x window factor, one call per window and step.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdatc.config import load_config
from sdatc.models.sdatc import SDATC, ModelConfig
from sdatc.pipelines.config import PipelineConfig, TilingConfig, WindowConfig
from sdatc.pipelines.hardware import (
    StagePlanner,
    available_ram,
    memory_budget,
    plan_stage,
    plan_vae,
    stage_bytes_per_pixel,
    vae_cost,
)
from sdatc.pipelines.sampler import SamplerConfig
from sdatc.pipelines.sdatc_pipeline import SDATCPipeline
from sdatc.pipelines.tiling import tiled_apply, tiled_batched
from sdatc.pipelines.windows import plan_windows


def test_plan_whole_frames_when_they_fit():
    p = plan_stage(5, (96, 160), 1000.0, budget=5 * 96 * 160 * 1000, tile=64)
    assert (p.tiled, p.batch, p.need) == (False, 5, 5 * 96 * 160 * 1000)


def test_plan_tiles_batched_up_to_the_budget():
    per_tile = 64 * 64 * 1000
    p = plan_stage(5, (96, 160), 1000.0, budget=7 * per_tile + 1, tile=64)
    assert p.tiled and p.batch == 7
    assert plan_stage(5, (96, 160), 1000.0, budget=1, tile=64).batch == 1  # never below one item
    q = plan_stage(5, (96, 160), 1000.0, budget=12 * per_tile, tile=64, group=5)  # a decoder: whole windows
    assert q.tiled and q.batch == 10
    assert plan_stage(5, (96, 160), 1000.0, budget=1, tile=64, group=5).batch == 5


def test_plan_modes_and_small_frames():
    big = 10**15
    assert plan_stage(5, (96, 160), 1000.0, budget=big, tile=64, mode="on").tiled  # forced tiles
    assert not plan_stage(5, (96, 160), 1000.0, budget=1, tile=64, mode="off").tiled
    small = plan_stage(5, (40, 60), 1000.0, budget=2 * 40 * 60 * 1000, tile=64)  # no tile is smaller than it
    assert (small.tiled, small.batch) == (False, 2)
    with pytest.raises(ValueError, match="tiling mode"):
        plan_stage(5, (96, 160), 1000.0, budget=big, tile=64, mode="maybe")


def test_budget_from_config_or_ram():
    assert memory_budget(torch.device("cpu"), 1.5) == int(1.5 * 2**30)
    ram = available_ram()
    assert 0 < memory_budget(torch.device("cpu")) <= ram
    with pytest.raises(ValueError, match="memory_gb"):
        TilingConfig(memory_gb=0)


def _conv(x):  # a spatial function with a 3x3 neighbourhood and a x2 output
    w = torch.linspace(-1, 1, 3 * x.shape[1] * 9).view(3, x.shape[1], 3, 3)
    return F.interpolate(torch.tanh(F.conv2d(x, w, padding=1)), scale_factor=2, mode="nearest")


@pytest.mark.parametrize("batch", [1, 4, 1000])
def test_tiled_batched_equals_one_tile_at_a_time(batch):
    x = torch.rand(3, 2, 24, 40, generator=torch.Generator().manual_seed(0))
    ref = tiled_apply(lambda t, box: _conv(t), x, 16, 8)
    out = tiled_batched(_conv, (x,), 16, 8, batch)
    # conv kernels (gemm blocking) differ by batch size and CPU (AVX2 / AVX-512): a few fp32 ulps of 18-term sums
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    whole = tiled_batched(_conv, (x,), None, 0, batch)  # whole frames, `batch` frames per call
    torch.testing.assert_close(whole, _conv(x), rtol=1e-5, atol=1e-5)


def test_tiled_batched_keeps_groups_together():
    seen = []

    def fn(x, y):
        seen.append(x.shape[0])
        return x + y

    x = torch.rand(4, 1, 16, 16)
    out = tiled_batched(fn, (x, 2 * x), 8, 4, batch=5, group=2)  # 3x3 tiles x 4 frames, 4 per call
    torch.testing.assert_close(out, 3 * x)
    assert seen == [4] * 9
    with pytest.raises(ValueError, match="whole groups"):
        tiled_batched(fn, (x, x), 8, 4, batch=6, group=3)


def test_stage_costs_scale_with_the_model():
    tiny = SDATC.from_config(load_config(ModelConfig, "configs/model/sdatc_tiny.yaml"))
    for stage in ("dcm", "predict"):
        assert stage_bytes_per_pixel(tiny, stage) > 0
    for stage in ("encode", "decode"):
        small, big = vae_cost(tiny, stage), vae_cost(_sd21("SDATC"), stage)
        assert 0 < small.live < big.live and small.tiled_live > 0 and small.tiled_temp > 0


def _sd21(name: str):
    """A stand-in of the full SDATC / UltraVSR with SD 2.1's VAE widths (building SD 2.1 takes a minute)."""
    return type(name, (), {"vae": SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512]))})()


H200_BUDGET = 115.0  # GiB: an H200's ~139 GiB free after the weights, less the 15 % margin (memory_budget)


def test_ultravsr_720p_window_is_not_tiled_on_an_h200():
    """16 frames of 720p output (a 90 x 160 latent), chunk_frames 1 as configs/infer/ultravsr.yaml: the frozen
    blocks see one frame per call, RTS the window; that fits an H200 whole (it was tiled on every GPU)."""
    planner = StagePlanner(_sd21("UltraVSR"), torch.device("cpu"), TilingConfig(memory_gb=H200_BUDGET))
    z = torch.empty(16, 4, 90, 160, device="meta")
    p = planner("decode", z, 64, chunk=1)
    assert not p.tiled and p.batch == 1 and p.need <= p.budget, p
    whole_window = planner("decode", z, 64, chunk=None)  # chunk_frames 0: more per call, still split to fit
    assert whole_window.need <= whole_window.budget and not whole_window.tiled
    up = torch.empty(16, 3, 720, 1280, device="meta")
    e = planner("encode", up, 512, chunk=1)
    assert not e.tiled and e.need <= e.budget


def test_vae_plans_split_frames_then_shrink_tiles_to_fit():
    cost = vae_cost(_sd21("UltraVSR"), "decode")
    size, gib = (90, 160), 2**30
    one = cost.need(16, size, 1)
    assert one < cost.need(16, size, 16)  # chunk_frames counts
    p = plan_vae(16, size, cost, budget=int(one + 1), tile=64, chunk=None)  # the window whole does not fit
    assert not p.tiled and p.batch < 16 and p.need <= p.budget
    small = plan_vae(16, size, cost, budget=int(0.8 * one), tile=64, chunk=1)  # not even one frame per call
    assert small.tiled and small.batch == 1 and small.need < one
    sdatc = vae_cost(_sd21("SDATC"), "decode")  # STAM: the decoder's window cannot be split
    q = plan_vae(5, size, sdatc, budget=20 * gib, tile=64, split=False)
    assert q.tiled and q.batch == 5 and q.need <= q.budget and q.tile <= 64, q
    assert q.need < sdatc.need(5, size, 5)  # tiling lowers the estimate (it raised the memory before)
    tight = plan_vae(5, size, sdatc, budget=q.need - 1, tile=64, split=False)
    assert tight.tile < q.tile or tight.tile == 8
    assert plan_vae(5, size, sdatc, budget=10**15, tile=64, mode="on", split=False).tiled  # forced
    assert not plan_vae(5, size, sdatc, budget=1, tile=64, mode="off").tiled


def test_memory_to_spare_gives_steps_times_window_factor(carphone_frames, monkeypatch):
    """The issue's acceptance check: tiny config, 90x160 input, 2 steps, every frame once per step and window,
    whole windows per call. The count does not depend on what the stages compute, so the denoiser and the
    VAE and the DCM are cheap stand-ins (the real ones: scripts/bench_infer.py, benchmarks/cpu-2core/)."""
    model = SDATC.from_config(load_config(ModelConfig, "configs/model/sdatc_tiny.yaml")).eval()
    monkeypatch.setattr(model, "predict", lambda z_t, t, z_c: torch.tanh(z_t + z_c))
    monkeypatch.setattr(model, "decode", lambda z, feats=None, num_frames=1, w=1.0:
                        F.interpolate(z[:, :3], scale_factor=8, mode="nearest").tanh())
    monkeypatch.setattr(model, "upscale", lambda lq: F.interpolate(lq, scale_factor=4, mode="nearest"))
    monkeypatch.setattr(model, "encode", lambda img: (F.avg_pool2d(img, 8).repeat(1, 2, 1, 1)[:, :4],
                                                      {lv: F.avg_pool2d(img, 2**lv) for lv in model.cfg.cfw_levels}))
    frames = np.ascontiguousarray(carphone_frames[:6, :90, :160])  # (6, 90, 160, 3), a real clip
    cfg = PipelineConfig(sampler=SamplerConfig(steps=2), window=WindowConfig(5, 3))
    cfg.flow.enabled = False
    pipe = SDATCPipeline(model, cfg, progress=False)
    out = list(pipe.stream(iter(frames), num_frames=6))
    assert len(out) == 6 and out[0].shape == (360, 640, 3)
    windows = plan_windows(6, 5, 3)
    window_factor = sum(e - s for s, e in windows) / 6
    assert sum(pipe.unet_evals.values()) / 6 == pytest.approx(2 * window_factor)
    assert pipe.unet_evals.keys() == {(46, 80)}  # the whole latent (90 padded to 92 LR rows): no tiles
    assert pipe.unet_calls == 2 * len(windows)  # one call per window and step: frames on the batch axis
    assert not any(p.tiled for p in pipe.plans.values())
    tiny_budget = dataclasses.replace(cfg, tiling=TilingConfig(memory_gb=1e-3), window=WindowConfig(2, 2))
    pipe = SDATCPipeline(model, tiny_budget, progress=False)  # 1 MiB: the latent stage must tile
    list(pipe.stream(iter(frames[:2]), num_frames=2))
    assert pipe.plans["predict"].tiled and sum(pipe.unet_evals.values()) > 2 * 2

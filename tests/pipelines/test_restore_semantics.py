"""What SDATCPipeline's sampling loop means, not just its I/O (tiny SDATC, random weights, real frames).

* Windows with ``stride == length`` are independent; without flow guidance the reverse chain is per
  frame (coupling only comes from STAM, in the decoder), so window boundaries do not matter.
* Latent tiling only changes a per-pixel denoiser's result by float rounding (Gaussian blending of
  identical values), and a spatial denoiser's result noticeably (the check can fail).
* Frame-tile evaluations (``unet_evals``) are windows x frames x steps x latent tiles, and calls are
  those in batches of the memory plan, as counted by a spy on ``model.predict``.
* Flow guidance (random RAFT-large, saved to a file and loaded with ``load_raft``) lowers the window's
  final warping loss ``FlowGuidance.loss`` on a real clip with motion.

The sampled latents are read by a spy on ``model.decode`` (the pipeline decodes each window's z_0).
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdatc.pipelines.sdatc_pipeline as restore_mod
from sdatc.models.flow import FlowConfig, load_raft
from sdatc.pipelines.config import PipelineConfig, TilingConfig, WindowConfig
from sdatc.pipelines.flow_guidance import FlowGuidance
from sdatc.pipelines.sampler import SamplerConfig
from sdatc.pipelines.sdatc_pipeline import SDATCPipeline
from sdatc.pipelines.tiling import tile_starts
from sdatc.pipelines.windows import plan_windows

STEPS = 3
# The tiny random VAE's latents reach |z| ~ 60: float32 rounding (batch size, tile blending) is ~1e-5 there.
LATENT_TOL = {"atol": 1e-4, "rtol": 1e-5}
NO_FLOW = FlowConfig(enabled=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny convolutions gain nothing from a second one, and on a shared
    2-core machine two spinning OpenMP threads make them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(model_config, monkeypatch, stam: bool = True, dcm: bool = True):
    """The tiny SDATC with every new module perturbed (so guidance, CAPM, CFW act) and STAM mixing
    frames strongly (a = b = 0.5 instead of the identity init)."""
    from sdatc.models.sdatc import SDATC

    cfg = copy.deepcopy(model_config)
    cfg.enabled = dataclasses.replace(cfg.enabled, stam=stam, dcm=dcm)
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    torch.manual_seed(0)
    model = SDATC.from_config(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for s in model.stam or []:
            s.a.fill_(0.5)
            s.b.fill_(0.5)
    return model


@pytest.fixture
def model(tiny_model_config, monkeypatch):
    return make_model(tiny_model_config, monkeypatch)


@pytest.fixture
def model_no_stam(tiny_model_config, monkeypatch):
    return make_model(tiny_model_config, monkeypatch, stam=False)


def spy_decode(model, monkeypatch) -> list[torch.Tensor]:
    """Record the latents each decode call receives (one call per window when the decoder is untiled)."""
    calls, orig = [], model.decode

    def decode(z, *args, **kwargs):
        calls.append(z.detach().clone())
        return orig(z, *args, **kwargs)

    monkeypatch.setattr(model, "decode", decode)
    return calls


def pipeline_cfg(length: int, stride: int, steps: int = STEPS, tiling: TilingConfig | None = None,
                 flow: FlowConfig = NO_FLOW) -> PipelineConfig:
    return PipelineConfig(sampler=SamplerConfig(steps=steps, seed=7), flow=flow,
                          window=WindowConfig(length=length, stride=stride),
                          tiling=tiling or TilingConfig(mode="off"))


def run(model, frames: np.ndarray, cfg: PipelineConfig, raft=None) -> list[np.ndarray]:
    pipe = SDATCPipeline(model, cfg, raft=raft, progress=False)
    return list(pipe.stream(iter(frames), num_frames=len(frames)))


@pytest.fixture(scope="module")
def clip(carphone_frames) -> np.ndarray:
    """6 real LR frames, 24x32 (a multiple of the model's pad multiple 4): latents 12x16."""
    return np.ascontiguousarray(carphone_frames[:6, 40:64, 60:92])


def assert_frames_close(a: list[np.ndarray], b: list[np.ndarray], max_diff: int = 1):
    """uint8 frames equal up to float rounding of the last bit (a value .5 away from an integer)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        d = np.abs(x.astype(int) - y.astype(int))
        assert d.max() <= max_diff and (d > 0).mean() < 1e-3, (d.max(), (d > 0).mean())


# --------------------------------------------------------------------------- windows


def test_reverse_chain_is_per_frame_without_flow(model_no_stam, model, clip, monkeypatch):
    """Without flow guidance, nothing in the reverse chain couples frames (per-frame noise seeded by
    the absolute frame index, UNet/guidance/CAPM per batch item): one window of 4 frames and two
    windows of 2 (stride == length) sample the same latents. With STAM off the decoded frames are the
    same too; with STAM on they are not (STAM couples the frames of a window in the decoder)."""
    frames = clip[:4]
    latents = spy_decode(model_no_stam, monkeypatch)
    one = run(model_no_stam, frames, pipeline_cfg(4, 4))
    two = run(model_no_stam, frames, pipeline_cfg(2, 2))
    assert [z.shape[0] for z in latents] == [4, 2, 2]
    torch.testing.assert_close(torch.cat(latents[1:]), latents[0], **LATENT_TOL)
    assert_frames_close(one, two)

    latents = spy_decode(model, monkeypatch)
    one = run(model, frames, pipeline_cfg(4, 4))
    two = run(model, frames, pipeline_cfg(2, 2))
    torch.testing.assert_close(torch.cat(latents[1:]), latents[0], **LATENT_TOL)
    diff = max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(one, two))
    assert diff > 2  # STAM: a frame's decode depends on the other frames of its window


def test_windows_with_stride_equal_length_are_independent(model, clip, monkeypatch):
    """With stride == length the full model (STAM on) restores each window as if it were a clip of its
    own: frames 0-2 of a 6-frame clip equal restoring frames 0-2 alone, and frames 3-5 equal restoring
    frames 3-5 alone with their noise seeded as frames 3-5 (``frame_noise`` depends on the absolute
    frame index, so the lone run has its indices shifted by 3)."""
    full = run(model, clip, pipeline_cfg(3, 3))
    head = run(model, clip[:3], pipeline_cfg(3, 3))
    assert_frames_close(full[:3], head, max_diff=0)

    orig = restore_mod.frame_noise
    monkeypatch.setattr(restore_mod, "frame_noise",
                        lambda seed, frame, step, shape, device="cpu": orig(seed, frame + 3, step, shape, device))
    tail = run(model, clip[3:], pipeline_cfg(3, 3))
    assert_frames_close(full[3:], tail, max_diff=0)


# --------------------------------------------------------------------------- tiling


def pointwise_denoiser(z_t: torch.Tensor, t: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
    """A per-pixel, timestep-dependent epsilon: tanh of a fixed 1x1 conv of [z_t, z_c]."""
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(4, 8, 1, 1, generator=g) * 0.5, torch.randn(4, generator=g) * 0.1
    x = F.conv2d(torch.cat([z_t, z_c], 1), weight.to(z_t), bias.to(z_t))
    return torch.tanh(x) * (1 + t.float().view(-1, 1, 1, 1).to(z_t) / 1000)


def spatial_denoiser(z_t: torch.Tensor, t: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
    """The same with a 3x3 neighbourhood (zero padding): tiles change what a pixel sees."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 8, 3, 3, generator=g) * 0.3
    return torch.tanh(F.conv2d(torch.cat([z_t, z_c], 1), weight.to(z_t), padding=1))


LATENT_TILES = TilingConfig(mode="on", latent_tile=8, latent_overlap=4)  # 12x16 latents: 2 x 3 tiles


@pytest.mark.parametrize("denoiser, equal", [(pointwise_denoiser, True), (spatial_denoiser, False)])
def test_latent_tiling_of_a_per_pixel_denoiser_is_exact(model_no_stam, clip, monkeypatch, denoiser, equal):
    """Gaussian blending of identical per-pixel predictions returns them (up to float rounding), so a
    per-pixel denoiser samples the same latents and frames tiled and untiled; a 3x3 denoiser does not
    (the comparison can fail)."""
    calls = []

    def predict(z_t, t, z_c):
        calls.append(tuple(z_t.shape))
        return denoiser(z_t, t, z_c)

    monkeypatch.setattr(model_no_stam, "predict", predict)
    latents = spy_decode(model_no_stam, monkeypatch)
    frames = clip[:2]
    untiled = run(model_no_stam, frames, pipeline_cfg(2, 2))
    assert calls == [(2, 4, 12, 16)] * STEPS
    calls.clear()
    tiled = run(model_no_stam, frames, pipeline_cfg(2, 2, tiling=LATENT_TILES))
    assert calls == [(12, 4, 8, 8)] * STEPS  # really tiled: 6 tiles x 2 frames on the batch axis, one call a step
    z_untiled, z_tiled = latents
    if equal:
        torch.testing.assert_close(z_tiled, z_untiled, **LATENT_TOL)
        assert_frames_close(tiled, untiled)
    else:
        assert (z_tiled - z_untiled).abs().max() > 1e-2


# --------------------------------------------------------------------------- UNet call count


@pytest.mark.parametrize("num_frames, length, stride, tiling, real_unet", [
    (7, 3, 2, LATENT_TILES, False),  # 3 windows (the last shifted back), 6 latent tiles, all in one batch
    (7, 3, 2, dataclasses.replace(LATENT_TILES, memory_gb=2e-6), False),  # the same, a few tiles per call
    (7, 3, 3, TilingConfig(mode="auto", latent_tile=12, latent_overlap=4), False),  # 3 windows; spare memory: untiled
    (5, 5, 5, TilingConfig(mode="off", latent_tile=8, latent_overlap=4), True),  # one window, no tiling
])
def test_unet_calls_is_windows_times_steps_times_tiles(model_no_stam, carphone_frames, monkeypatch,
                                                       num_frames, length, stride, tiling, real_unet):
    """A spy on ``model.predict`` records every call with its batch (tiles x the window's frames) and
    tile size; it wraps the real UNet path once, a per-pixel stand-in (fast) otherwise (the count does
    not depend on the denoiser). Frame-tile evaluations are windows x frames x steps x tiles; calls are
    those split into batches of the memory plan's size."""
    frames = np.ascontiguousarray(carphone_frames[:num_frames, 40:64, 60:92])  # latents 12x16
    spy, denoiser = [], model_no_stam.predict if real_unet else pointwise_denoiser

    def predict(z_t, t, z_c):
        spy.append((tuple(z_t.shape), tuple(z_c.shape)))
        return denoiser(z_t, t, z_c)

    monkeypatch.setattr(model_no_stam, "predict", predict)
    cfg = pipeline_cfg(length, stride, tiling=tiling)
    pipe = SDATCPipeline(model_no_stam, cfg, progress=False)
    out = list(pipe.stream(iter(frames), num_frames=num_frames))
    assert len(out) == num_frames

    windows = plan_windows(num_frames, length, stride)
    sizes = [e - s for s, e in windows]
    if tiling.mode != "on":
        tiles, tile = 1, (12, 16)
    else:
        ys = tile_starts(12, tiling.latent_tile, tiling.latent_overlap, align=pipe.unet_factor)
        xs = tile_starts(16, tiling.latent_tile, tiling.latent_overlap, align=pipe.unet_factor)
        tiles, tile = len(ys) * len(xs), (min(tiling.latent_tile, 12), min(tiling.latent_tile, 16))
    assert tiles == (6 if tiling.mode == "on" else 1)
    assert pipe.unet_evals == {tile: sum(sizes) * STEPS * tiles}
    batch = pipe.plans["predict"].batch
    if tiling.memory_gb is not None:
        assert 1 <= batch < 3 * tiles  # the budget really split the window's tiles
    expected = [min(batch, n * tiles - c) for n in sizes for _ in range(STEPS) for c in range(0, n * tiles, batch)]
    assert pipe.unet_calls == len(spy) == len(expected)
    assert spy == [((b, 4, *tile), (b, 4, *tile)) for b in expected]


# --------------------------------------------------------------------------- flow guidance


@pytest.fixture(scope="module")
def raft_file(tmp_path_factory) -> str:
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raft") / "raft_random.pth"
    torch.save(raft_large(weights=None, progress=False).state_dict(), path)
    return str(path)


def test_flow_guidance_lowers_the_warping_loss(tiny_model_config, carphone_frames, raft_file, monkeypatch):
    """On 3 real frames with motion (frames 0, 2, 4 of carphone, LR 128x128: RAFT's minimum, no padding)
    the window's final latents have a lower ``FlowGuidance.loss`` with guidance on than off (same seeds),
    and the lower the larger the step. The flows are those of a random RAFT-large loaded from a local
    file, so the loss is defined by them, not by the true motion; what is pinned is that the pipeline's
    guidance step pulls the chain towards consistency under the flows it computed.

    Cost: the denoiser is the per-pixel stand-in (a 64x64-latent UNet pass is ~7 s here) and the decoder
    a recording stub; the chain, the seeded noise, RAFT, the occlusion masks and the guidance step are real.
    The tiny random VAE's latents have std ~25 (SD's ~1) and the loss is a mean over C*H*W, so the
    default scale 10 moves them very little (a ~0.1 % lower loss); scale 3000 shows the effect plainly.
    """
    model = make_model(tiny_model_config, monkeypatch, stam=False, dcm=False)  # bicubic I_c: faster
    monkeypatch.setattr(model, "predict", pointwise_denoiser)
    latents = []

    def decode(z, feats=None, num_frames=1, w=None):  # the decoder is not under test here
        latents.append(z.detach().clone())
        return torch.zeros(z.shape[0], 3, 8 * z.shape[2], 8 * z.shape[3])

    monkeypatch.setattr(model, "decode", decode)
    frames = np.ascontiguousarray(carphone_frames[0:6:2, 8:136, 24:152])  # frames 0, 2, 4: 128x128
    flows = [FlowConfig(raft_weights=raft_file, required=True, raft_iters=2, scale=scale) for scale in (10.0, 3000.0)]
    raft = load_raft(flows[0])
    for flow in [NO_FLOW, *flows]:
        run(model, frames, pipeline_cfg(3, 3, flow=flow), raft=raft if flow.enabled else None)
    assert [tuple(z.shape) for z in latents] == [(3, 4, 64, 64)] * 3

    lq = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    guide = FlowGuidance(raft, lq, (64, 64), flows[0])  # the masks do not depend on the scale
    assert guide.occ_fwd.mean() < 0.9 and guide.occ_bwd.mean() < 0.9  # the loss sees a good part of the frame
    off, default, strong = (guide.loss(z).item() for z in latents)
    assert strong < 0.8 * off, (strong, off)
    assert strong < default < off, (strong, default, off)


# --------------------------------------------------------------------------- colour fix order


@pytest.mark.parametrize("colour", ["adain", "wavelet"])
def test_colour_fix_sees_the_unclamped_decode_then_clamps(model_no_stam, clip, monkeypatch, colour):
    """StableSR / MGLD-VSR fix the decoder's output, then clamp: the colour fix must receive values outside
    [0, 1] when the decoder produces them, and the frames written are the clamp of its result."""
    orig_decode, seen = model_no_stam.decode, []

    def loud_decode(z, *args, **kwargs):
        return 1.5 * orig_decode(z, *args, **kwargs)  # push values out of [-1, 1] (decoder scale)

    def spy(x, ref, mode):
        seen.append(x.clone())
        return restore_mod_colour(x, ref, mode)

    from sdatc.pipelines.colour import colour_correct as restore_mod_colour

    monkeypatch.setattr(model_no_stam, "decode", loud_decode)
    monkeypatch.setattr(restore_mod, "colour_correct", spy)
    cfg = dataclasses.replace(pipeline_cfg(3, 3, steps=1), colour=colour)
    frames = run(model_no_stam, clip[:3], cfg)
    x = seen[0]
    assert x.min() < -0.01 or x.max() > 1.01, (x.min(), x.max())  # the fix saw the decoder's own range
    expected = (restore_mod_colour(x, torch.from_numpy(clip[:3]).permute(0, 3, 1, 2).float() / 255, colour)
                .clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.stack(frames), expected)

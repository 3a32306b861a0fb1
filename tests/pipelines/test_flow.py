"""Flow-guided latent warping: warp/resize/occlusion math with known flows, the guidance step, and
RAFT plumbing with random weights (no RAFT weights are downloaded; RAFT-large with 2 iterations)."""

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torchvision.models.optical_flow import raft_large

from sdatc.errors import SdatcError
from sdatc.models.flow import (
    RAFT_WEIGHTS_NAME,
    FlowConfig,
    backward_warp,
    compute_flows,
    load_raft,
    occlusion_mask,
    resize_flow,
)
from sdatc.pipelines.flow_guidance import FlowGuidance


def const_flow(n: int, h: int, w: int, dx: float, dy: float) -> torch.Tensor:
    """(n, 2, h, w) constant flow."""
    return torch.tensor([float(dx), float(dy)]).view(1, 2, 1, 1).expand(n, 2, h, w).clone()


@pytest.fixture(scope="module")
def random_raft() -> torch.nn.Module:
    torch.manual_seed(0)
    return raft_large(weights=None, progress=False).eval().requires_grad_(False)


@pytest.mark.parametrize("h, w, atol", [(17, 33, 1e-6), (20, 24, 2e-5)])
def test_integer_flow_shifts_exactly(h, w, atol):
    # (h-1, w-1 powers of 2: grid normalisation is exact in float32; otherwise ~1e-6 px rounding)
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    out = backward_warp(x, const_flow(2, h, w, 3, -2))  # out[y, x] = x[y - 2, x + 3]
    torch.testing.assert_close(out[:, :, 2:, :-3], x[:, :, :-2, 3:], atol=atol, rtol=0)


def test_half_pixel_flow_averages_neighbours():
    x = torch.randn(1, 2, 9, 17, generator=torch.Generator().manual_seed(1))
    out = backward_warp(x, const_flow(1, 9, 17, 0.5, 0))
    torch.testing.assert_close(out[..., :-1], (x[..., :-1] + x[..., 1:]) / 2, atol=1e-6, rtol=0)


def test_resize_flow_scales_vectors():
    out = resize_flow(const_flow(1, 16, 16, 1, 1), (32, 64))
    assert out.shape == (1, 2, 32, 64)
    torch.testing.assert_close(out[:, 0], torch.full((1, 32, 64), 4.0))
    torch.testing.assert_close(out[:, 1], torch.full((1, 32, 64), 2.0))


@pytest.mark.parametrize("form", ["linear", "linear_offframe", "squared"])
def test_occlusion_consistent_flows_only_out_of_frame(form):
    fwd, bwd = const_flow(1, 12, 16, 3, 0), const_flow(1, 12, 16, -3, 0)
    occ = occlusion_mask(fwd, bwd, 0.01, 0.5, form)
    assert occ.shape == (1, 1, 12, 16)
    assert occ[..., :-3].sum() == 0
    assert (occ[..., -3:] == 1).all()  # linear: W0(b) = 0 there, |f| = 3 > 0.56


def test_occlusion_off_frame_small_motion_only_with_offframe_form():
    """MGLD-VSR has no off-frame test: f = 0.4 px leaving the last column samples 0.6 b + 0.4 * 0 (zero
    padding) = -0.24, |f + W0(b)| = 0.16 <= 0.01 * 0.8 + 0.5: not occluded; linear_offframe occludes it."""
    fwd, bwd = const_flow(1, 4, 6, 0.4, 0), const_flow(1, 4, 6, -0.4, 0)
    assert occlusion_mask(fwd, bwd, 0.01, 0.5, "linear").sum() == 0
    off = occlusion_mask(fwd, bwd, 0.01, 0.5, "linear_offframe")
    assert (off[..., -1] == 1).all() and off[..., :-1].sum() == 0


def _mgld_check(fwd: np.ndarray, bwd: np.ndarray, alpha: float = 0.01, beta: float = 0.5) -> np.ndarray:
    """MGLD-VSR's forward_backward_consistency_check (scripts/util_flow.py:114-136 at 9aa7731) written from its
    formula with an explicit bilinear sampler (zero outside the frame, pixel centres at integers), float64."""
    _, h, w = fwd.shape
    occ = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            sx, sy = x + fwd[0, y, x], y + fwd[1, y, x]
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            wb = np.zeros(2)
            for yy, xx, k in ((y0, x0, (1 - (sx - x0)) * (1 - (sy - y0))), (y0, x0 + 1, (sx - x0) * (1 - (sy - y0))),
                              (y0 + 1, x0, (1 - (sx - x0)) * (sy - y0)), (y0 + 1, x0 + 1, (sx - x0) * (sy - y0))):
                if 0 <= yy < h and 0 <= xx < w:
                    wb += k * bwd[:, yy, xx]
            diff = np.linalg.norm(fwd[:, y, x] + wb)
            occ[y, x] = diff > alpha * (np.linalg.norm(fwd[:, y, x]) + np.linalg.norm(bwd[:, y, x])) + beta
    return occ


def test_linear_occlusion_equals_mgld_vsr_on_random_flows():
    g = torch.Generator().manual_seed(3)
    base = torch.tensor([0.45, -0.3], dtype=torch.float64).view(1, 2, 1, 1)  # sub-pixel motion off two edges
    fwd = base + torch.randn(1, 2, 9, 11, generator=g, dtype=torch.float64) * 0.15
    bwd = -base + torch.randn(1, 2, 9, 11, generator=g, dtype=torch.float64) * 0.3
    ours = occlusion_mask(fwd, bwd, 0.01, 0.5, "linear")[0, 0].numpy().astype(bool)
    theirs = _mgld_check(fwd[0].numpy(), bwd[0].numpy())
    assert 0 < theirs.sum() < theirs.size  # a mix of both outcomes
    np.testing.assert_array_equal(ours, theirs)
    former = occlusion_mask(fwd, bwd, 0.01, 0.5, "linear_offframe")[0, 0].numpy().astype(bool)
    assert (former != theirs).any()  # the former form differs on these flows


@pytest.mark.parametrize("form", ["linear", "linear_offframe", "squared"])
def test_occlusion_inconsistent_flows_all_occluded(form):
    occ = occlusion_mask(const_flow(1, 12, 16, 3, 0), torch.zeros(1, 2, 12, 16), 0.01, 0.5, form)
    assert (occ == 1).all()


def occluded(f: tuple[float, float], b: tuple[float, float], form: str, h: int = 12, w: int = 128) -> bool:
    """Whether pixel (0, 0) is occluded for constant flows f and b (in the frame: W(b, f) = b)."""
    return bool(occlusion_mask(const_flow(1, h, w, *f), const_flow(1, h, w, *b), 0.01, 0.5, form)[0, 0, 0, 0])


def test_occlusion_forms_disagree():
    # |f| = 5, |b| = |(-2.64, -3.52)| = 4.4, |f + b| = |(0.36, 0.48)| = 0.6 (Euclidean norms of 2-vectors)
    # linear:  0.6  > 0.01 * (5 + 4.4) + 0.5      = 0.594  -> occluded
    # squared: 0.36 > 0.01 * (25 + 19.36) + 0.5   = 0.9436 -> not occluded
    assert occluded((3, 4), (-2.64, -3.52), "linear") and not occluded((3, 4), (-2.64, -3.52), "squared")
    assert occluded((3, 4), (-2.64, -3.52), "linear_offframe")
    # large motion, 3 px inconsistency: linear 3 > 0.01 * (100 + 97) + 0.5 = 2.47 -> occluded;
    # squared 9 > 0.01 * (10000 + 9409) + 0.5 = 194.59 -> not occluded
    assert occluded((100, 0), (-97, 0), "linear") and not occluded((100, 0), (-97, 0), "squared")


def test_occlusion_thresholds_as_written():
    # b = 0, f = (d, 0): linear occludes when d > 0.01 d + 0.5, i.e. d > 0.5 / 0.99 = 0.50505
    assert not occluded((0.505, 0), (0, 0), "linear")  # 0.505 <= 0.50505
    assert occluded((0.506, 0), (0, 0), "linear")  # 0.506 > 0.50506
    # squared occludes when d^2 > 0.01 d^2 + 0.5, i.e. d > sqrt(0.5 / 0.99) = 0.71067
    assert not occluded((0.710, 0), (0, 0), "squared")  # 0.504100 <= 0.505041
    assert occluded((0.711, 0), (0, 0), "squared")  # 0.505521 > 0.505055
    # the norm is Euclidean: f = (0.3, 0.4) has |f| = 0.5 <= 0.505 (an L1 norm, 0.7, would occlude)
    assert not occluded((0.3, 0.4), (0, 0), "linear") and occluded((0.3, 0.41), (0, 0), "linear")
    with pytest.raises(ValueError, match="occlusion form"):
        occlusion_mask(const_flow(1, 4, 4, 0, 0), const_flow(1, 4, 4, 0, 0), 0.01, 0.5, "cubic")


def test_flow_config_picks_the_occlusion_form():
    fwd, bwd = const_flow(1, 12, 16, 0.6, 0), torch.zeros(1, 2, 12, 16)
    assert FlowConfig().occlusion == "linear"
    linear = FlowGuidance.from_flows(fwd, bwd, (12, 16), FlowConfig())
    squared = FlowGuidance.from_flows(fwd, bwd, (12, 16), FlowConfig(occlusion="squared"))
    assert (linear.occ_fwd == 1).all()  # 0.6 > 0.506
    assert squared.occ_fwd[..., :-1].sum() == 0 and (squared.occ_fwd[..., -1] == 1).all()  # 0.36 <= 0.5036
    with pytest.raises(ValueError, match="occlusion must be one of"):
        FlowConfig(occlusion="cubic")


def shifted_pair(h: int = 16, w: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (2, 4, h, w) with z_1 = z_0 shifted by 2 px in x (plus noise); fwd/bwd (1, 2, h, w)."""
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, h, w, generator=g)
    fwd, bwd = const_flow(1, h, w, 2, 0), const_flow(1, h, w, -2, 0)
    z1 = backward_warp(z0, bwd) + 0.3 * torch.randn(1, 4, h, w, generator=g)  # z1(p) = z0(p - 2)
    return torch.cat([z0, z1]), fwd, bwd


def test_step_lowers_loss_and_zero_step_is_identity():
    z, fwd, bwd = shifted_pair()
    guide = FlowGuidance.from_flows(fwd, bwd, (16, 20), FlowConfig(scale=1.0))
    assert guide.active
    before = guide.loss(z)
    with torch.no_grad():
        z_new = guide.step(z, sigma2=0.5)
    assert not z_new.requires_grad and z_new.dtype == z.dtype and z_new.shape == z.shape
    assert guide.loss(z_new) < before
    # the loss is much smaller for the true flow than for a wrong one
    wrong = FlowGuidance.from_flows(-fwd, -bwd, (16, 20), FlowConfig())
    assert before < wrong.loss(z)
    zero = FlowGuidance.from_flows(fwd, bwd, (16, 20), FlowConfig(scale=0.0))
    assert torch.equal(zero.step(z, 0.5), z)


def test_step_sigma_mode_inference_mode_and_half():
    z, fwd, bwd = shifted_pair()
    guide = FlowGuidance.from_flows(fwd, bwd, (16, 20), FlowConfig(step_size="sigma", scale=1.0))
    assert guide.eta(0.25) == 0.25
    with torch.inference_mode():
        z_new = guide.step(z.clone(), 0.5)
    assert guide.loss(z_new.clone()) < guide.loss(z)
    z_bf16 = guide.step(z.bfloat16(), 0.5)
    assert z_bf16.dtype == torch.bfloat16


def test_flows_at_other_resolution_and_inactive_cases():
    z, fwd, bwd = shifted_pair()
    # LR flows at 2x the latent grid are resized (2 px -> 1 px)
    guide = FlowGuidance.from_flows(const_flow(1, 32, 40, 4, 0), const_flow(1, 32, 40, -4, 0), (16, 20), FlowConfig())
    torch.testing.assert_close(guide.fwd, fwd)
    with pytest.raises(ValueError, match="z must be"):
        guide.loss(z[:, :, :8])
    off = FlowGuidance(None, torch.rand(3, 3, 32, 40), (16, 20), FlowConfig())
    assert not off.active and off.step(z, 0.5) is z
    single = FlowGuidance.from_flows(torch.zeros(0, 2, 16, 20), torch.zeros(0, 2, 16, 20), (16, 20), FlowConfig())
    z1 = z[:1]
    assert not single.active and single.step(z1, 0.5) is z1


def test_compute_flows_shapes(random_raft):
    frames = torch.rand(3, 3, 36, 44, generator=torch.Generator().manual_seed(2))
    fwd, bwd = compute_flows(random_raft, frames, iters=2)
    assert fwd.shape == (2, 2, 36, 44) and bwd.shape == (2, 2, 36, 44)
    assert fwd.dtype == torch.float32 and torch.isfinite(fwd).all()
    e_fwd, e_bwd = compute_flows(random_raft, frames[:1], iters=2)
    assert e_fwd.shape == (0, 2, 36, 44) and e_bwd.shape == (0, 2, 36, 44)
    guide = FlowGuidance(random_raft, frames, (18, 22), FlowConfig(raft_iters=2))
    assert guide.occ_fwd.shape == (2, 1, 18, 22)
    z = torch.randn(3, 4, 18, 22)
    assert guide.step(z, 0.5).shape == z.shape


def test_load_raft_missing_file(tmp_path):
    missing = str(tmp_path / RAFT_WEIGHTS_NAME)
    with pytest.warns(UserWarning) as rec:
        assert load_raft(FlowConfig(raft_weights=missing)) is None
    assert len(rec) == 1 and "flow guidance off" in str(rec[0].message)
    with pytest.raises(SdatcError, match="flow.raft_weights") as err:
        load_raft(FlowConfig(raft_weights=None, required=True))
    assert RAFT_WEIGHTS_NAME in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_raft(FlowConfig(enabled=False, raft_weights=missing)) is None


def test_load_raft_from_files(tmp_path, random_raft):
    state = {k: v.contiguous() for k, v in random_raft.state_dict().items()}
    pth, st = tmp_path / "raft.pth", tmp_path / "raft.safetensors"
    torch.save(state, pth)
    save_file(state, str(st))
    for path in (pth, st):
        raft = load_raft(FlowConfig(raft_weights=str(path)))
        assert not raft.training and not any(p.requires_grad for p in raft.parameters())
        key = "feature_encoder.convnormrelu.0.weight"
        assert torch.equal(raft.state_dict()[key], state[key])
    bad = dict(state)
    del bad["update_block.flow_head.conv2.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(SdatcError, match="update_block.flow_head.conv2.bias"):
        load_raft(FlowConfig(raft_weights=str(tmp_path / "bad.pth")))


class PairRAFT(torch.nn.Module):
    """A stand-in RAFT: a flow that depends on both images of each pair (their difference), counting pairs."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.pairs = 0

    def forward(self, img1, img2, num_flow_updates=12):
        self.pairs += img1.shape[0]
        d = (img1 - img2)[:, :2] * self.w  # (N, 2, H, W)
        return [d * 3.0]


def test_window_flows_are_computed_once_per_frame_pair(monkeypatch):
    """Overlapping windows share frame pairs: RAFT sees each pair once per clip (both directions), and the
    guidance built from cached flows equals the one from the window's own flows."""
    import numpy as np

    from sdatc.config import load_config
    from sdatc.models.sdatc import SDATC, ModelConfig
    from sdatc.pipelines import sdatc_pipeline as restore_mod
    from sdatc.pipelines.config import PipelineConfig, WindowConfig
    from sdatc.pipelines.sampler import SamplerConfig
    from sdatc.pipelines.sdatc_pipeline import SDATCPipeline

    model = SDATC.from_config(load_config(ModelConfig, "configs/model/sdatc_tiny.yaml")).eval()
    monkeypatch.setattr(model, "predict", lambda z_t, t, z_c: torch.tanh(z_t - z_c))
    monkeypatch.setattr(model, "decode", lambda z, feats=None, num_frames=1, w=1.0:
                        torch.nn.functional.interpolate(z[:, :3], scale_factor=8).tanh())
    guides = []
    real = restore_mod.FlowGuidance.from_flows

    def spy(fwd, bwd, size, cfg):
        guides.append((fwd.clone(), bwd.clone()))
        return real(fwd, bwd, size, cfg)

    monkeypatch.setattr(restore_mod.FlowGuidance, "from_flows", staticmethod(spy))
    raft = PairRAFT()
    cfg = PipelineConfig(sampler=SamplerConfig(steps=2), window=WindowConfig(5, 3))
    pipe = SDATCPipeline(model, cfg, raft=raft, progress=False)
    frames = np.random.default_rng(0).integers(0, 256, (8, 16, 24, 3), dtype=np.uint8)
    assert len(list(pipe.stream(iter(frames), num_frames=8))) == 8
    assert raft.pairs == 2 * 7  # 7 frame pairs in 8 frames, each both ways, once (not 2 x 4 per window)
    lq = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    for (fwd, bwd), (s, e) in zip(guides, [(0, 5), (3, 8)]):
        ref_f, ref_b = compute_flows(PairRAFT(), lq[s:e], 12)
        torch.testing.assert_close(fwd, ref_f)
        torch.testing.assert_close(bwd, ref_b)

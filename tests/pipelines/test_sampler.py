"""Respaced DDPM / DDIM: the paper's timesteps, exact recovery with an oracle denoiser, diffusers' steps
for epsilon and v_prediction."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from sdatc.errors import SdatcError
from sdatc.pipelines.sampler import Sampler, SamplerConfig, respaced_timesteps


def _acp():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def _space_timesteps(num_timesteps: int, count: int) -> set[int]:
    """guided-diffusion's space_timesteps(num_timesteps, [count]) for one section, written from its formula
    (StableSR ldm/models/respace.py:43-58): a fractional stride added up, each partial sum rounded."""
    frac_stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += frac_stride
    return set(taken)


def test_respaced_timesteps_match_guided_diffusion():
    ts = respaced_timesteps(999, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    assert ts == sorted(_space_timesteps(1000, 50), reverse=True)
    assert respaced_timesteps(999, 2) == [999, 0] and respaced_timesteps(999, 1) == [999]  # one step: ours (A54)
    assert respaced_timesteps(10, 50) == list(range(10, -1, -1))  # never more steps than timesteps
    # half-way ties: the accumulated stride rounds as guided-diffusion does (21 steps: 499, not round(10 * 49.95))
    assert 499 in respaced_timesteps(999, 21) and 500 not in respaced_timesteps(999, 21)
    differ = [n for n in range(2, 1000)
              if respaced_timesteps(999, n) != sorted(_space_timesteps(1000, n), reverse=True)]
    assert differ == []


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_oracle_denoiser_recovers_x0(kind, prediction_type):
    s = Sampler(SamplerConfig(kind=kind, steps=20), _acp(), prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    z = s.start(x0, torch.randn(2, 4, 8, 8, generator=g))
    for i in range(len(s)):
        a = s.acp[i]
        eps = (z - math.sqrt(a) * x0) / math.sqrt(1 - a)  # what a perfect model predicts
        out = eps if prediction_type == "epsilon" else math.sqrt(a) * eps - math.sqrt(1 - a) * x0  # v
        z = s.step(i, z, out, torch.randn(2, 4, 8, 8, generator=g))
    assert torch.allclose(z, x0, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_matches_diffusers(prediction_type):
    """Our respaced DDPM step equals diffusers' DDPMScheduler with the same custom timesteps."""
    acp = _acp()
    s = Sampler(SamplerConfig(steps=10), acp, prediction_type)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        prediction_type=prediction_type)
    ref.set_timesteps(timesteps=s.timesteps)
    g = torch.Generator().manual_seed(1)
    z, out = (torch.randn(1, 4, 6, 6, generator=g) for _ in range(2))
    for i in (0, 4, 9):
        t = s.timesteps[i]
        theirs = ref.step(out, t, z, generator=torch.Generator().manual_seed(5)).prev_sample
        same_noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))  # what diffusers drew
        assert torch.allclose(s.step(i, z, out, same_noise), theirs, atol=1e-5), i


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(prediction_type, eta):
    """DDIMScheduler takes no custom timesteps; with 3 of its steps (stride 1000 // 3 = 333, alpha-bar 1
    after t=0) it walks 999 -> 666 -> 333 -> 0 -> end, our 4 respaced steps from 999."""
    s = Sampler(SamplerConfig(kind="ddim", steps=4, ddim_eta=eta), _acp(), prediction_type)
    assert s.timesteps == [999, 666, 333, 0]
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        set_alpha_to_one=True, prediction_type=prediction_type)
    ref.set_timesteps(3)
    g = torch.Generator().manual_seed(2)
    z, out, noise = (torch.randn(1, 4, 6, 6, generator=g) for _ in range(3))
    for i, t in enumerate(s.timesteps):
        theirs = ref.step(out, t, z, eta=eta, variance_noise=noise).prev_sample
        assert torch.allclose(s.step(i, z, out, noise), theirs, atol=1e-5), i


def test_unknown_prediction_type():
    with pytest.raises(SdatcError, match="prediction_type 'sample' from the model's scheduler is not supported"):
        Sampler(SamplerConfig(steps=10), _acp(), "sample")


def test_posterior_variance_positive_and_clipped():
    """The last step's variance is 0; LDM (MGLD-VSR's ddpm.py:273) clips it at 1e-20 (the default), so the
    guidance step there is 10 |log 1e-20| = 460.5; "previous" takes the step before's value."""
    s = Sampler(SamplerConfig(steps=50), _acp(), "epsilon")
    v = [s.posterior_variance(i) for i in range(len(s))]
    assert all(x > 0 for x in v) and v[-1] == 1e-20 and v[-2] > 1e-6
    assert 10 * abs(math.log(v[-1])) == pytest.approx(460.517, abs=1e-3)
    prev = Sampler(SamplerConfig(steps=50, last_variance="previous"), _acp(), "epsilon")
    vp = [prev.posterior_variance(i) for i in range(len(prev))]
    assert vp[:-1] == v[:-1] and vp[-1] == vp[-2]
    with pytest.raises(ValueError):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="last_variance"):
        SamplerConfig(last_variance="zero")

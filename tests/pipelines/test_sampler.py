"""Respaced DDPM / DDIM: the paper's timesteps, exact recovery with an oracle denoiser."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sdatc.pipelines.sampler import Sampler, SamplerConfig, respaced_timesteps


def _acp():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def test_respaced_timesteps_match_guided_diffusion():
    ts = respaced_timesteps(999, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    assert ts == sorted((round(k * 999 / 49) for k in range(50)), reverse=True)
    assert respaced_timesteps(999, 2) == [999, 0] and respaced_timesteps(999, 1) == [999]
    assert respaced_timesteps(10, 50) == list(range(10, -1, -1))  # never more steps than timesteps


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_oracle_denoiser_recovers_x0(kind):
    s = Sampler(SamplerConfig(kind=kind, steps=20), _acp())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    z = s.start(x0, torch.randn(2, 4, 8, 8, generator=g))
    for i in range(len(s)):
        a = s.acp[i]
        eps = (z - math.sqrt(a) * x0) / math.sqrt(1 - a)  # what a perfect model predicts
        z = s.step(i, z, eps, torch.randn(2, 4, 8, 8, generator=g))
    assert torch.allclose(z, x0, atol=1e-4)


def test_ddpm_matches_diffusers_posterior_mean():
    """Our respaced DDPM step equals diffusers' DDPMScheduler with the same custom timesteps."""
    acp = _acp()
    s = Sampler(SamplerConfig(steps=10), acp)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    ref.set_timesteps(timesteps=s.timesteps)
    g = torch.Generator().manual_seed(1)
    z, eps = (torch.randn(1, 4, 6, 6, generator=g) for _ in range(2))
    for i in (0, 4, 9):
        t = s.timesteps[i]
        theirs = ref.step(eps, t, z, generator=torch.Generator().manual_seed(5)).prev_sample
        same_noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))  # what diffusers drew
        assert torch.allclose(s.step(i, z, eps, same_noise), theirs, atol=1e-5), i


def test_posterior_variance_positive_and_clipped():
    s = Sampler(SamplerConfig(steps=50), _acp())
    v = [s.posterior_variance(i) for i in range(len(s))]
    assert all(x > 0 for x in v) and v[-1] == v[-2]
    with pytest.raises(ValueError):
        SamplerConfig(steps=0)

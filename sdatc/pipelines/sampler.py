"""Respaced DDPM (the paper's sampler) and DDIM, starting from the noised condition latent.

    sampler = Sampler(SamplerConfig(steps=50), model.scheduler.alphas_cumprod, model.prediction_type)
    z = sampler.start(z_c, noise)                                  # q_sample(z_c, 999)
    for i, t in enumerate(sampler.timesteps):
        out = model.predict(z, t, z_c)                       # epsilon or v
        z = sampler.step(i, z, out, noise=step_noise)              # posterior sample at the previous timestep

Respacing is guided-diffusion's ``space_timesteps(1000, [50])`` (StableSR and MGLD-VSR copy it): a
fractional stride (999 / 49) added 49 times, each partial sum rounded (Python's round, ties to even), so
0 and 999 are both included; the betas of the respaced chain are recomputed from alphas_cumprod. One
step is ``[start_t]`` here (the peers' [0] is degenerate when the chain starts from q_sample(z_c, 999)).
DDPM uses the posterior variance (``fixed_small``); DDIM uses eta (0 = deterministic).
The model output is split into (x0, eps) by ``prediction_type`` (epsilon or v_prediction). Noise is
passed in by the caller, so each frame can draw its own seeded noise. The steps equal diffusers'
DDPMScheduler with ``set_timesteps(timesteps=...)`` (tests); DDIMScheduler cannot take respaced
timesteps, hence our own math.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from sdatc.models.backbone import check_prediction_type, split_prediction


@dataclasses.dataclass
class SamplerConfig:
    kind: Literal["ddpm", "ddim"] = "ddpm"
    steps: int = 50
    start_t: int = 999  # the chain starts from q_sample(z_c, start_t)
    ddim_eta: float = 0.0
    seed: int = 0
    # sigma_t^2 of the last step (t = 0, where the posterior variance is 0), for the flow-guidance step size:
    # "ldm" clips it at 1e-20 as LDM's / MGLD-VSR's posterior_log_variance_clipped (eta_0 = 10 |log 1e-20|);
    # "previous" takes the step before's value, as guided-diffusion's clipped log-variance
    last_variance: Literal["ldm", "previous"] = "ldm"
    # the condition latent z_c: "mode" the VAE posterior's mean (as training encodes it); "sample" a draw
    # mean + exp(logvar / 2) eps, logvar clamped to [-30, 20], as StableSR's / MGLD-VSR's encode_first_stage
    # + get_first_stage_encoding; eps seeded per frame (frame_noise step Z_C_STEP)
    z_c: Literal["mode", "sample"] = "mode"

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        if self.start_t < 0:
            raise ValueError(f"start_t must be >= 0, got {self.start_t}")
        if self.last_variance not in ("ldm", "previous"):
            raise ValueError(f"last_variance must be 'ldm' or 'previous', got {self.last_variance!r}")
        if self.z_c not in ("mode", "sample"):
            raise ValueError(f"z_c must be 'mode' or 'sample', got {self.z_c!r}")


Z_C_STEP = -2  # frame_noise's step id of the posterior sample's eps (-1: the start, 0..: the steps)


def posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw of the VAE posterior: mean + exp(logvar / 2) * noise, logvar clamped to [-30, 20] as in LDM's
    ``DiagonalGaussianDistribution`` (shapes alike; any latent scale applies to the result)."""
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise


def respaced_timesteps(start_t: int, steps: int) -> list[int]:
    """Descending timesteps from ``start_t`` down to 0: guided-diffusion's ``space_timesteps(start_t + 1,
    [steps])``, the fractional stride accumulated and each partial sum rounded."""
    steps = min(steps, start_t + 1)
    if steps == 1:
        return [start_t]
    stride, cur, taken = start_t / (steps - 1), 0.0, set()
    for _ in range(steps):
        taken.add(round(cur))
        cur += stride
    return sorted(taken, reverse=True)


class Sampler:
    """One reverse-diffusion chain over the respaced timesteps."""

    def __init__(self, cfg: SamplerConfig, alphas_cumprod: torch.Tensor, prediction_type: str):
        self.cfg = cfg
        self.prediction_type = check_prediction_type(prediction_type, "the model's scheduler")
        self.timesteps = respaced_timesteps(cfg.start_t, cfg.steps)
        acp = alphas_cumprod.double()
        self.acp = [float(acp[t]) for t in self.timesteps]  # alpha-bar at each used timestep
        # alpha-bar of the step each one goes to (1.0 after the last step)
        self.acp_prev = self.acp[1:] + [1.0]

    def __len__(self) -> int:
        return len(self.timesteps)

    def start(self, z_c: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """q_sample(z_c, t_0): sqrt(a) z_c + sqrt(1 - a) noise."""
        a = self.acp[0]
        return math.sqrt(a) * z_c + math.sqrt(1 - a) * noise

    def posterior_variance(self, i: int) -> float:
        """sigma_t^2 of DDPM step i (fixed_small); at the last step (0) clipped as ``cfg.last_variance`` says."""
        a, a_prev = self.acp[i], self.acp_prev[i]
        beta = 1 - a / a_prev
        var = beta * (1 - a_prev) / (1 - a)
        if var > 0:
            return var
        if self.cfg.last_variance == "ldm":
            return 1e-20  # np.log(np.maximum(posterior_variance, 1e-20)) in LDM's ddpm.py
        return self.posterior_variance(i - 1) if i > 0 else beta  # guided-diffusion: the step before's value

    def split(self, i: int, z: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the model output (epsilon or v) for z at timesteps[i]; float32."""
        return split_prediction(output, z, self.acp[i], self.prediction_type)

    def step(self, i: int, z: torch.Tensor, output: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z at timesteps[i] -> z at the next (lower) timestep, from the model output (epsilon or v);
        noise (like z) for the stochastic part."""
        a, a_prev = self.acp[i], self.acp_prev[i]
        x0, eps = self.split(i, z, output)
        last = i == len(self) - 1
        if self.cfg.kind == "ddim":
            var = self.cfg.ddim_eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            out = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - var, 0.0)) * eps
        else:
            beta = 1 - a / a_prev
            mean = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(a / a_prev) * (1 - a_prev) / (1 - a)) * z
            out, var = mean, beta * (1 - a_prev) / (1 - a)
        if not last and var > 0:
            if noise is None:
                raise ValueError("a stochastic step needs noise")
            out = out + math.sqrt(var) * noise
        return out
def frame_noise(seed: int, frame: int, step: int, shape: tuple[int, ...],
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise for one frame at one sampling step (step -1: the start), the same in every window, drawn by a
    generator on ``device`` (no host copy). Same seed, same device type: same noise; a CPU and a GPU draw
    different numbers."""
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + frame) * 1_009 + step + 1)
    return torch.randn(shape, generator=g, device=device)


"""``sampler.z_c: mode | sample`` (issue 24 item 10): the condition latent as the VAE posterior's mode (ours,
as trained) or a draw of it, as StableSR / MGLD-VSR's ``get_first_stage_encoding(encode_first_stage(x))``:
``scale * (mean + exp(0.5 clamp(logvar, -30, 20)) eps)``. The references here are diffusers'
``AutoencoderKL.encode(x).latent_dist`` (its own DiagonalGaussianDistribution), not our driver."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdatc.pipelines.config import PipelineConfig, TilingConfig, WindowConfig
from sdatc.pipelines.sampler import SamplerConfig, frame_noise
from sdatc.pipelines.sdatc_pipeline import SDATCPipeline
from sdatc.pipelines.tiled_vae import encode_tiled

SEED = 7


@pytest.fixture(scope="module")
def model():
    from sdatc.config import load_config
    from sdatc.models.sdatc import SDATC, ModelConfig

    return SDATC.from_config(load_config(ModelConfig, "configs/model/sdatc_tiny.yaml")).eval()


@pytest.fixture(scope="module")
def img(carphone_frames):
    """3 real frames, (3, 3, 64, 64) in [0, 1] (what the DCM would give for 16 x 16 LR frames)."""
    x = torch.from_numpy(carphone_frames[:3, 40:104, 60:124].copy()).permute(0, 3, 1, 2).float() / 255
    return x


def _pipe(model, z_c: str, seed: int = SEED, tiling: str = "off", encoder_tile: int = 512) -> SDATCPipeline:
    cfg = PipelineConfig(sampler=SamplerConfig(steps=2, seed=seed, z_c=z_c), window=WindowConfig(3, 2),
                         tiling=TilingConfig(mode=tiling, encoder_tile=encoder_tile, encoder_overlap=0))
    cfg.flow.enabled = False
    return SDATCPipeline(model, cfg, progress=False)


def _diffusers_posterior(model, img):
    with torch.no_grad():
        return model.vae.encode(img * 2 - 1).latent_dist  # mean, logvar (clamped to [-30, 20]), std


def test_sample_is_mean_plus_std_times_the_frames_seeded_noise(model, img):
    frames = [4, 5, 6]  # clip frame indices: the noise is each frame's, whatever window holds it
    with torch.no_grad():
        z, _ = _pipe(model, "sample")._encode(img, frames)
    post = _diffusers_posterior(model, img)
    eps = torch.stack([frame_noise(SEED, i, -2, tuple(z.shape[1:])) for i in frames])  # step id -2: z_c's draw
    std = torch.exp(0.5 * torch.clamp(post.logvar, -30.0, 20.0))
    ref = model.vae.config.scaling_factor * (post.mean + std * eps)
    torch.testing.assert_close(z, ref, atol=2e-5, rtol=1e-5)
    # the draw is not the mode (the tiny random VAE has std ~ 0.9: a large difference here, see docs/fidelity.md)
    assert (z - model.vae.config.scaling_factor * post.mode()).abs().max() > 1e-2
    # a frame's draw is the same when another window encodes it (windows agree), and the same seed repeats it
    with torch.no_grad():
        again, _ = _pipe(model, "sample")._encode(img[1:], frames[1:])
        other, _ = _pipe(model, "sample", seed=SEED + 1)._encode(img, frames)
    # the same draw: equal up to the encoder's convolutions, which with 2+ intra-op threads round per batch size
    # on the CPU (2 frames vs 3 here: ~1e-7), so within the tolerance of the reference check above
    torch.testing.assert_close(again, z[1:], atol=2e-5, rtol=1e-5)
    assert not torch.allclose(other, z)


def test_mode_is_unchanged(model, img):
    """``mode`` (the default) is what the pipeline encoded before the option existed, bit for bit."""
    assert SamplerConfig().z_c == "mode"
    with torch.no_grad():
        z, feats = _pipe(model, "mode")._encode(img, [0, 1, 2])
        z_ref, f_ref = model.encode(img)  # model.encode: the posterior mode, as before
    assert torch.equal(z, z_ref.float()) and all(torch.equal(feats[lv], f_ref[lv]) for lv in f_ref)
    post = _diffusers_posterior(model, img)
    torch.testing.assert_close(z, post.mode() * model.vae.config.scaling_factor, atol=1e-6, rtol=1e-6)


def test_tiled_sample_equals_untiled(model, img):
    """The tiled encoder gives the log-variance too: tiled == untiled within the tiled VAE's tolerance
    (tests/pipelines/test_tiled_vae.py)."""
    with torch.no_grad():
        mean, logvar, feats = model.encode_posterior(img)
        t_mean, t_logvar, t_feats = encode_tiled(model, img, [1, 2], tile=24, posterior=True)  # 3 x 3 tiles
        untiled, _ = _pipe(model, "sample")._encode(img, [0, 1, 2])
        tiled, _ = _pipe(model, "sample", tiling="on", encoder_tile=24)._encode(img, [0, 1, 2])
    torch.testing.assert_close(t_mean, mean, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(t_logvar, logvar, atol=2e-5, rtol=1e-4)
    for lv in (1, 2):
        torch.testing.assert_close(t_feats[lv], feats[lv], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tiled, untiled, atol=2e-5, rtol=1e-4)


def test_restore_with_sample_is_seeded(model, carphone_frames):
    """Same seed, same frames; the sample changes the output (it is used, as the start and the condition)."""
    import numpy as np

    frames = np.ascontiguousarray(carphone_frames[:4, 40:56, 60:76])  # (4, 16, 16, 3)
    runs = {k: np.stack(list(_pipe(model, z_c).stream(iter(frames), 4)))
            for k, z_c in (("a", "sample"), ("b", "sample"), ("mode", "mode"))}
    assert np.array_equal(runs["a"], runs["b"])
    assert np.abs(runs["a"].astype(int) - runs["mode"].astype(int)).max() > 0


def test_bad_z_c():
    with pytest.raises(ValueError, match="z_c must be 'mode' or 'sample'"):
        SamplerConfig(z_c="mean")
    assert dataclasses.replace(SamplerConfig(), z_c="sample").z_c == "sample"

"""Tiled VAE (sdatc/pipelines/tiled_vae.py): whole-frame tensors between layers, tile-wise kernels.

On a real clip with the tiny SDATC (CAPM, STAM and CFW made to act): the tiled decode / encode equals
the untiled one up to float rounding at any tile size (per-tile statistics, ``tiled_apply`` over
``model.decode``, are far off), under bf16 autocast too; one tile is the untiled call itself; a failing
layer raises in the caller and leaves the model as it was. Peak memory: test_tiled_vae_memory.py.
"""

import pytest
import torch
import torch.nn.functional as F

from sdatc.config import load_config
from sdatc.models.capm import CAPM
from sdatc.models.cfw import CFW
from sdatc.models.sdatc import SDATC, ModelConfig
from sdatc.models.stam import STAM
from sdatc.pipelines.tiled_vae import TiledCAPM, _Tiled, decode_tiled, encode_tiled
from sdatc.pipelines.tiling import tiled_apply

T, W_CFW = 3, 0.75


@pytest.fixture(scope="module")
def model():
    """The tiny SDATC, its zero-initialised CAPM / CFW outputs and STAM blends made non-trivial."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SDATC_SD21_PATH", raising=False)
        m = SDATC.from_config(load_config(ModelConfig, "configs/model/sdatc_tiny.yaml")).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.vae.modules():
            if isinstance(mod, (CAPM, CFW)):
                mod.zero_out.weight.copy_(torch.randn(mod.zero_out.weight.shape, generator=g) * 0.1)
            if isinstance(mod, STAM):
                mod.a.fill_(0.25)
                mod.b.fill_(0.25)
    return m


@pytest.fixture(scope="module")
def clip(sample_video_path):
    """3 real frames of bigbuckbunny, area-resized to (3, 3, 128, 128) in [0, 1]."""
    from sdatc.data.video import read_video

    frames = torch.from_numpy(read_video(sample_video_path, max_frames=T)).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(frames, size=(128, 128), mode="area")


@pytest.fixture(scope="module")
def untiled(model, clip):
    """z (3, 4, 16, 16), CFW features, the untiled decode (3, 3, 128, 128)."""
    with torch.no_grad():
        z, feats = model.encode(clip)
        return z, feats, model.decode(z, feats, num_frames=T, w=W_CFW)


def _err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (a - ref).abs()
    return d.max().item(), d.mean().item()


def _cut(feats, box, factor=8):
    return {lv: x[..., box[0] * s:box[1] * s, box[2] * s:box[3] * s]
            for lv, x in feats.items() for s in [factor // 2**lv]}


@pytest.mark.parametrize("tile", [12, 5])
def test_decode_equals_untiled_up_to_rounding(model, untiled, tile):
    """Every layer sees the same inputs as untiled (tiles partition the frame; halos cover each kernel), so
    only float rounding differs: tile convolutions and float64 GroupNorm sums vs whole-frame ones. 1e-4 on
    outputs in [-1, 1] (measured 1.3e-5); per-tile statistics are off by ~0.1 on average."""
    z, feats, ref = untiled  # output in [-1, 1], std ~0.27
    with torch.no_grad():
        new = decode_tiled(model, z, feats, T, W_CFW, tile=tile)  # 2 x 2 (12) or 4 x 4 (5) tiles of the 16 x 16 latent
        old = tiled_apply(lambda zt, box: model.decode(zt, _cut(feats, box), num_frames=T, w=W_CFW), z, 12, 8)
    (new_max, new_mean), (old_max, old_mean) = _err(new, ref), _err(old, ref)
    print(f"decode tile {tile}: max {new_max:.2e} mean {new_mean:.2e}; "
          f"per-tile statistics max {old_max:.3f} mean {old_mean:.4f}")
    assert new_max < 1e-4 and old_mean > 100 * new_mean


def test_encode_equals_untiled_up_to_rounding(model, clip, untiled):
    z, feats, _ = untiled  # z std ~0.05
    with torch.no_grad():
        z_new, f_new = encode_tiled(model, clip, [1, 2], tile=40)  # 4 x 4 tiles of 40 pixels (20, 10, 5 below)
    torch.testing.assert_close(z_new, z, atol=2e-5, rtol=1e-4)  # measured 2e-7
    for lv in (1, 2):
        torch.testing.assert_close(f_new[lv], feats[lv], atol=2e-5, rtol=1e-4)  # measured 1.3e-6


def test_tiled_decode_under_bf16_autocast_is_as_close_as_bf16_itself(model, untiled):
    """bf16 rounds differently in tile-sized kernels (and our GroupNorm statistics are float64): the tiled bf16
    decode is as far from the untiled bf16 one as bf16 is from fp32 (measured mean 0.013 vs 0.012)."""
    z, feats, ref = untiled
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model.decode(z, feats, num_frames=T, w=W_CFW).float()
        tiled = decode_tiled(model, z, feats, T, W_CFW, tile=8).float()
    bf16_err = (plain - ref).abs().mean().item()
    assert (tiled - plain).abs().mean().item() < max(2 * bf16_err, 0.02)
    assert (tiled - ref).abs().mean().item() < 2 * bf16_err + 0.01


def test_one_tile_is_the_untiled_call(model, clip, untiled):
    z, feats, _ = untiled
    z, feats, img = z[..., :8, :8], _cut(feats, (0, 8, 0, 8)), clip[..., :64, :64]  # a corner: cheaper
    with torch.no_grad():
        ref = model.decode(z, feats, num_frames=T, w=W_CFW)
        assert torch.equal(decode_tiled(model, z, feats, T, W_CFW, tile=8), ref)
        z_ref, f_ref = model.encode(img)
        z1, f1 = encode_tiled(model, img, [2], tile=64)
    assert torch.equal(z1, z_ref) and list(f1) == [2] and torch.equal(f1[2], f_ref[2])


def test_a_failing_layer_raises_in_the_caller_and_restores_the_model(model, untiled, monkeypatch):
    z, feats, _ = untiled
    capm = next(m for m in model.vae.decoder.modules() if isinstance(m, CAPM))
    seen = []

    def failing(self, x, ctx=None):
        seen.append(type(self).__name__)
        raise RuntimeError("boom in a tile")

    monkeypatch.setattr(TiledCAPM, "tiled", failing)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom in a tile"):
        decode_tiled(model, z, feats, T, W_CFW, tile=12)
    assert seen == ["TiledCAPM"]
    assert not any(isinstance(m, _Tiled) for m in model.modules())  # every layer put back
    assert any(m is capm for m in model.vae.decoder.modules())

"""Tiled VAE with whole-frame statistics (sdatc/pipelines/tiled_vae.py).

On a real clip with the tiny SDATC (CAPM, STAM and CFW made to act): the tiled decode / encode is close
to the untiled one and much closer than per-tile statistics (``tiled_apply`` over ``model.decode``);
one tile is the untiled call itself; the whole-frame reductions are exact where nothing else differs
(pointwise layers); a failing tile raises in the caller without hanging and leaves the model as it was.
"""

import threading

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from sdatc.config import load_config
from sdatc.models.capm import CAPM, frame_reductions
from sdatc.models.cfw import CFW
from sdatc.models.sdatc import SDATC, ModelConfig
from sdatc.models.stam import STAM
from sdatc.pipelines import tiled_vae
from sdatc.pipelines.tiled_vae import SharedAttention, SharedGroupNorm, decode_tiled, encode_tiled
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
    return {lv: x[..., box[0] * s:box[1] * s, box[2] * s:box[3] * s] for lv, x in feats.items() for s in [factor // 2**lv]}


def test_decode_close_to_untiled_and_closer_than_per_tile_statistics(model, untiled):
    z, feats, ref = untiled  # output in [-1, 1], std ~0.27
    with torch.no_grad():
        new = decode_tiled(model, z, feats, T, W_CFW, tile=12, overlap=8)  # 2 x 2 tiles of the 16 x 16 latent
        old = tiled_apply(lambda zt, box: model.decode(zt, _cut(feats, box), num_frames=T, w=W_CFW), z, 12, 8)
    (new_max, new_mean), (old_max, old_mean) = _err(new, ref), _err(old, ref)
    print(f"decode: whole-frame stats max {new_max:.4f} mean {new_mean:.5f}; per-tile max {old_max:.4f} mean {old_mean:.5f}")
    # what is left are convolutions at tile borders (zero padding), large here: 12-pixel tiles, deep receptive field
    assert new_mean < 0.04 and new_max < 1.0
    assert new_mean < 0.3 * old_mean and new_max < 0.4 * old_max


def test_encode_close_to_untiled_and_closer_than_per_tile_statistics(model, clip, untiled):
    z, feats, _ = untiled  # z std ~0.05
    levels = [1, 2]
    with torch.no_grad():
        z_new, f_new = encode_tiled(model, clip, levels, tile=80, overlap=32)  # 2 x 2 tiles of 80 pixels

        def enc(x, box):
            zt, ft = model.encode(x)
            return (zt, *(ft[lv] for lv in levels))

        z_old, *f_old = tiled_apply(enc, clip, 80, 32, align=8)
    (new_max, new_mean), (old_max, old_mean) = _err(z_new, z), _err(z_old, z)
    print(f"encode z: whole-frame stats max {new_max:.4f} mean {new_mean:.5f}; per-tile max {old_max:.4f} mean {old_mean:.5f}")
    assert new_mean < 0.01 and new_mean < 0.5 * old_mean and new_max < 0.6 * old_max
    for lv, fo in zip(levels, f_old):
        fn_mean, fo_mean = _err(f_new[lv], feats[lv])[1], _err(fo, feats[lv])[1]
        print(f"encode level {lv}: whole-frame stats mean {fn_mean:.5f}; per-tile mean {fo_mean:.5f}")
        assert fn_mean < 0.05 * fo_mean


def test_one_tile_is_the_untiled_call(model, clip, untiled):
    z, feats, _ = untiled
    z, feats, img = z[..., :8, :8], _cut(feats, (0, 8, 0, 8)), clip[..., :64, :64]  # a corner: cheaper
    with torch.no_grad():
        ref = model.decode(z, feats, num_frames=T, w=W_CFW)
        assert torch.equal(decode_tiled(model, z, feats, T, W_CFW, tile=8, overlap=4), ref)
        z_ref, f_ref = model.encode(img)
        z1, f1 = encode_tiled(model, img, [2], tile=64, overlap=32)
    assert torch.equal(z1, z_ref) and list(f1) == [2] and torch.equal(f1[2], f_ref[2])


def test_whole_frame_reductions_are_exact_without_convolutions():
    """GroupNorm, the VAE's self-attention and CAPM's reductions over 2 x 4 tiles, at the input's
    resolution and at twice it, equal the untiled values (nothing else differs: no 3x3 convs)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 20)  # (N, C, H, W)
    x2 = torch.randn(2, 8, 24, 40)  # an activation at scale 2
    net = nn.Sequential(nn.GroupNorm(4, 8), Attention(8, heads=1, dim_head=8, norm_num_groups=4, residual_connection=True,
                                                      bias=True, _from_deprecated_attn_block=True)).eval()
    q, k = torch.randn(2, 2, 4, 24 * 40), torch.randn(2, 2, 4, 24 * 40)  # (N, g, c, h*w) at scale 2
    p = torch.randn(2, 3, 5, 5)  # a prompt (N, C_p, S, S)
    with torch.no_grad():
        ref = (net(x), x2.mean((-2, -1), keepdim=True),
               F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1),
               F.interpolate(p, size=(24, 40), mode="bilinear", align_corners=False))

        def fn(box):
            y0, y1, x0, x1 = box
            r = frame_reductions()
            crop2 = (..., slice(2 * y0, 2 * y1), slice(2 * x0, 2 * x1))
            qt, kt = (t.unflatten(-1, (24, 40))[crop2].flatten(-2) for t in (q, k))
            return (net(x[..., y0:y1, x0:x1]), r.spatial_mean(x2[crop2]),
                    r.normalized_gram(qt, kt, (2 * (y1 - y0), 2 * (x1 - x0))), r.resize(p, (2 * (y1 - y0), 2 * (x1 - x0))))

        plan = tiled_vae._plan(12, 20, 8, 4, align=1)
        assert len(plan) == 8  # 2 x 4 tiles
        with tiled_vae._shared_norms(net):
            assert isinstance(net[0], SharedGroupNorm) and isinstance(net[1], SharedAttention)
            outs = tiled_vae._run_tiles(plan, (12, 20), x.device, fn)
    assert isinstance(net[0], nn.GroupNorm) and isinstance(net[1], Attention)  # put back
    for (y0, y1, x0, x1), (y, mean, gram, prompt) in outs.items():
        torch.testing.assert_close(y, ref[0][..., y0:y1, x0:x1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mean, ref[1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gram, ref[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prompt, ref[3][..., 2 * y0:2 * y1, 2 * x0:2 * x1], atol=1e-5, rtol=1e-5)


def test_a_failing_tile_raises_in_the_caller_and_restores_the_model(model, untiled, monkeypatch):
    z, feats, _ = untiled
    stam = model.vae.decoder.up_blocks[0].resnets[0].post.stam
    calls = []

    def failing(x, num_frames=None, ctx=None):  # the second tile fails, the first waits at a sync point
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise RuntimeError("boom in tile 1")
        return STAM.forward(stam, x, num_frames, ctx)

    monkeypatch.setattr(stam, "forward", failing)
    result = {}

    def run():
        try:
            with torch.no_grad():
                decode_tiled(model, z, feats, T, W_CFW, tile=12, overlap=8)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(timeout=120)
    assert not caller.is_alive(), "decode_tiled hung after a tile failed"
    assert isinstance(result.get("error"), RuntimeError) and "boom in tile 1" in str(result["error"])
    assert calls == ["vae-tile-0", "vae-tile-1"]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("vae-tile-")]
    assert not any(isinstance(m, (SharedGroupNorm, SharedAttention)) for m in model.modules())

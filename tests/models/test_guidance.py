"""Guidance encoder + zero convs against real (tiny) diffusers UNets."""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdatc.models.guidance import GuidanceConfig, GuidanceEncoder, unet_skip_channels

SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    use_linear_projection=True,
)


def tiny_unet(layers: int = 2, widths: tuple[int, ...] = (32, 64)) -> UNet2DConditionModel:
    torch.manual_seed(0)
    n = len(widths)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers,
        block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet.eval().requires_grad_(False)


def tiny_cfg(layers: int = 2, n_levels: int = 2) -> GuidanceConfig:
    mult = [1, 2, 2][:n_levels]
    return GuidanceConfig(
        base_channels=16,
        channel_mult=mult,
        layers_per_block=layers,
        attention_levels=[True] * (n_levels - 1) + [False],
        num_heads=2,
        norm_num_groups=8,
    )


def unet_inputs(h: int, w: int, n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(n, 4, h, w, generator=g)
    z_c = torch.randn(n, 4, h, w, generator=g)
    text = torch.randn(n, 3, 32, generator=g)
    t = torch.tensor([10, 900])[:n]
    return z_t, z_c, text, t


def unet_skip_shapes(unet, z_t, t, text):
    """Shapes of the UNet's down_block_res_samples and mid-block output, via forward hooks."""
    skips, mid = [], []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: skips.append(o.shape))]
    for block in unet.down_blocks:
        hooks.append(
            block.register_forward_hook(lambda m, i, o: skips.extend(r.shape for r in o[1]))
        )
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(o.shape)))
    with torch.no_grad():
        unet(z_t, t, text)
    for hk in hooks:
        hk.remove()
    return skips, mid[0]


@pytest.mark.parametrize(
    "layers, widths, size",
    [(2, (32, 64), (12, 20)), (1, (32, 64), (16, 16)), (2, (32, 32, 64), (10, 14))],
)
def test_residual_shapes_match_unet(layers, widths, size):
    unet = tiny_unet(layers, widths)
    enc = GuidanceEncoder(tiny_cfg(layers, len(widths)), unet.config)
    z_t, z_c, text, t = unet_inputs(*size)
    want_skips, want_mid = unet_skip_shapes(unet, z_t, t, text)

    with torch.no_grad():
        down, mid = enc(z_t, z_c, t)
    assert [d.shape for d in down] == want_skips
    assert mid.shape == want_mid
    assert [s[1] for s in want_skips] == unet_skip_channels(unet.config)[0]
    with torch.no_grad():
        out = unet(
            z_t, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    assert out.shape == z_t.shape


def test_scalar_timestep_broadcasts():
    unet = tiny_unet()
    enc = GuidanceEncoder(tiny_cfg(), unet.config)
    for zc in enc.zero_convs.parameters():  # make outputs depend on the encoder
        torch.nn.init.normal_(zc, std=0.1)
    z_t, z_c, _, _ = unet_inputs(8, 8)
    with torch.no_grad():
        a, _ = enc(z_t, z_c, 500)
        b, _ = enc(z_t, z_c, torch.tensor([500, 500]))
        c, _ = enc(z_t, z_c, torch.tensor(500))
    for x, y, z in zip(a, b, c):
        assert torch.allclose(x, y) and torch.allclose(x, z)


def test_zero_at_init_leaves_unet_output_unchanged():
    unet = tiny_unet()
    enc = GuidanceEncoder(tiny_cfg(), unet.config)
    z_t, z_c, text, t = unet_inputs(12, 20)
    with torch.no_grad():
        down, mid = enc(z_t, z_c, t)
        assert all(torch.count_nonzero(d) == 0 for d in down) and torch.count_nonzero(mid) == 0
        plain = unet(z_t, t, text).sample
        guided = unet(
            z_t, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    assert torch.equal(plain, guided)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_steps_update_zero_convs_then_encoder(checkpointing):
    unet = tiny_unet()
    enc = GuidanceEncoder(tiny_cfg(), unet.config).train()
    enc.gradient_checkpointing = checkpointing
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    z_t, z_c, text, t = unet_inputs(8, 12)
    target = torch.randn_like(z_t)
    start = {k: v.clone() for k, v in enc.state_dict().items()}

    def step():
        opt.zero_grad()
        down, mid = enc(z_t, z_c, t)
        out = unet(
            z_t, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        torch.nn.functional.mse_loss(out, target).backward()
        opt.step()

    # Step 1: only the zero convs get a nonzero gradient (everything behind them is multiplied by 0).
    step()
    for name, p in enc.named_parameters():
        changed = not torch.equal(p.detach(), start[name])
        assert changed == name.startswith("zero_convs."), name
    assert all(torch.count_nonzero(p) > 0 for p in enc.zero_convs.down.parameters() if p.ndim == 4)

    # Step 2: the now nonzero zero convs pass gradient to every encoder parameter. Attention key
    # biases are the exception: softmax is invariant to q.b_k, so their gradient is ~0 analytically.
    step()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.endswith("to_k.bias"):
            assert torch.count_nonzero(p.grad) > 0, name
            assert not torch.equal(p.detach(), start[name]), name


def test_mismatched_levels_raise():
    unet_cfg = types.SimpleNamespace(block_out_channels=(32, 64, 64), layers_per_block=2)
    with pytest.raises(ValueError, match=r"len\(channel_mult\)=2.*len\(block_out_channels\)=3"):
        GuidanceEncoder(tiny_cfg(), unet_cfg)


def test_mismatched_layers_per_block_raise():
    unet_cfg = {"block_out_channels": (32, 64), "layers_per_block": 1}
    with pytest.raises(ValueError, match=r"layers_per_block=2.*layers_per_block=1"):
        GuidanceEncoder(tiny_cfg(layers=2), unet_cfg)


def test_unet_skip_channels_sd21():
    skips, mid = unet_skip_channels(SD21_UNET)
    assert skips == [320] * 4 + [640] * 3 + [1280] * 5
    assert mid == 1280
    assert unet_skip_channels(types.SimpleNamespace(**SD21_UNET)) == (skips, mid)


def test_full_size_param_counts():
    enc = GuidanceEncoder(GuidanceConfig(), types.SimpleNamespace(**SD21_UNET))
    counts = enc.param_counts()
    assert counts["guidance"] == pytest.approx(45.3e6, rel=0.02)
    assert counts["zero_convs"] == pytest.approx(4.8e6, rel=0.03)
    assert counts["guidance"] + counts["zero_convs"] == sum(p.numel() for p in enc.parameters())
    widths = [m.in_channels for m in enc.zero_convs.down]
    assert widths == [256] * 7 + [512] * 5


@pytest.mark.slow
def test_full_size_against_real_sd21_unet():
    unet = UNet2DConditionModel(**SD21_UNET).eval().requires_grad_(False)
    enc = GuidanceEncoder(GuidanceConfig(), unet.config)
    z_t = torch.randn(1, 4, 12, 20)
    text = torch.randn(1, 2, 1024)
    t = torch.tensor([500])
    want_skips, want_mid = unet_skip_shapes(unet, z_t, t, text)
    with torch.no_grad():
        down, mid = enc(z_t, torch.randn_like(z_t), t)
        plain = unet(z_t, t, text).sample
        guided = unet(
            z_t, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    assert [d.shape for d in down] == want_skips and mid.shape == want_mid
    assert torch.equal(plain, guided)

"""DCM (SwinIR classical SR): shapes, padding, timm block semantics, SwinIR checkpoint loading."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sdatc.errors import SdatcError
from sdatc.models.dcm import (
    DCM,
    DCMConfig,
    load_swinir_checkpoint,
    load_swinir_state_dict,
)


def tiny_cfg(**kw) -> DCMConfig:
    return DCMConfig(embed_dim=24, depths=[2, 2], num_heads=[2, 2], window_size=8, **kw)


def tiny_dcm(seed: int = 0, **kw) -> DCM:
    torch.manual_seed(seed)
    return DCM(tiny_cfg(**kw)).eval()


@pytest.fixture(scope="module")
def dcm() -> DCM:
    return tiny_dcm()


def swinir_layout(dcm: DCM) -> dict[str, torch.Tensor]:
    """The DCM's weights plus the buffers a SwinIR checkpoint carries (and timm recomputes)."""
    state = {k: v.clone() for k, v in dcm.state_dict().items()}
    for i, layer in enumerate(dcm.layers):
        for j, block in enumerate(layer.residual_group.blocks):
            prefix = f"layers.{i}.residual_group.blocks.{j}"
            state[f"{prefix}.attn.relative_position_index"] = (
                block.attn.relative_position_index.clone()
            )
            if j % 2 == 1:  # SwinIR stores the mask of its training size for shifted blocks
                state[f"{prefix}.attn_mask"] = torch.zeros(64, 64, 64)
    return state


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [(45, 80), (17, 9), (16, 24), (3, 5)])
def test_output_shape(dcm, size):
    h, w = size
    with torch.no_grad():
        out = dcm(torch.rand(2, 3, h, w))
    assert out.shape == (2, 3, 4 * h, 4 * w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scale", [2, 3])
def test_other_scales(scale):
    with torch.no_grad():
        out = tiny_dcm(upscale=scale)(torch.rand(1, 3, 9, 11))
    assert out.shape == (1, 3, 9 * scale, 11 * scale)


def test_frames_are_batch_items(dcm):
    b, t = 2, 3
    x = torch.rand(b, t, 3, 16, 16)
    with torch.no_grad():
        out = dcm(x.flatten(0, 1)).unflatten(0, (b, t))
        single = dcm(x[1, 2:3])
    assert out.shape == (b, t, 3, 64, 64)
    torch.testing.assert_close(out[1, 2:3], single, atol=1e-5, rtol=1e-5)


def test_bad_config(dcm):
    with pytest.raises(ValueError, match="upscale"):
        DCMConfig(upscale=5)
    with pytest.raises(ValueError, match="same length"):
        DCMConfig(depths=[6, 6], num_heads=[6])
    with pytest.raises(ValueError, match="divisible"):
        DCMConfig(embed_dim=24, depths=[2], num_heads=[5])


def test_full_size_parameter_count():
    n = sum(p.numel() for p in DCM(DCMConfig()).parameters())
    assert n == pytest.approx(11.90e6, abs=0.01e6)  # SwinIR-M classical x4: 11,900,199


# --------------------------------------------------------------------------- padding / timm block


def test_padding(dcm):
    x = torch.rand(1, 3, 16, 24)
    assert dcm.pad_to_window(x) is x  # multiple of the window: no pad, no crop
    x = torch.rand(1, 3, 13, 21)
    padded = F.pad(x, (0, 3, 0, 3), mode="reflect")
    with torch.no_grad():
        out = dcm(x)
        ref = dcm(padded)[:, :, : 4 * 13, : 4 * 21]
    assert out.shape == (1, 3, 52, 84)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_window_not_shrunk_on_small_inputs(dcm):
    blocks = dcm.layers[0].residual_group.blocks
    assert [b.window_size for b in blocks] == [(8, 8), (8, 8)]
    assert [b.shift_size for b in blocks] == [(0, 0), (4, 4)]
    # the shift is applied even on a single 8x8 window (SwinIR keeps it; timm would drop it
    # without always_partition when input_resolution <= window_size)
    x = torch.rand(1, 8, 8, 24)
    with torch.no_grad():
        shifted = blocks[1](x)
        blocks[1].shift_size = (0, 0)
        try:
            unshifted = blocks[1](x)
        finally:
            blocks[1].shift_size = (4, 4)
    assert not torch.allclose(shifted, unshifted)


def test_unshifted_block_is_window_local(dcm):
    block = dcm.layers[0].residual_group.blocks[0]
    x = torch.rand(1, 16, 16, 24)
    with torch.no_grad():
        full = block(x)
        corner = block(x[:, 8:, :8].contiguous())
    torch.testing.assert_close(full[:, 8:, :8], corner, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- checkpoints


def test_swinir_checkpoint_roundtrip(dcm, tmp_path, capsys):
    state = swinir_layout(dcm)
    decoy = {k: torch.zeros_like(v) for k, v in state.items()}
    path = tmp_path / "swinir_x4.pth"
    torch.save({"params": decoy, "params_ema": state}, path)

    other = tiny_dcm(seed=1)
    load_swinir_checkpoint(other, path)
    assert "missing" not in capsys.readouterr().out
    x = torch.rand(1, 3, 12, 20)
    with torch.no_grad():
        assert torch.equal(other(x), dcm(x))

    st_path = tmp_path / "swinir_x4.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st_path))
    third = tiny_dcm(seed=2)
    load_swinir_checkpoint(third, st_path)
    with torch.no_grad():
        assert torch.equal(third(x), dcm(x))


def test_params_key_is_used_without_params_ema(dcm):
    other = tiny_dcm(seed=3)
    load_swinir_state_dict(other, {"params": dcm.state_dict()}, verbose=False)
    torch.testing.assert_close(other.conv_last.weight, dcm.conv_last.weight, atol=0, rtol=0)


@pytest.mark.parametrize("scale", [2, 3])
def test_wrong_scale_checkpoint(dcm, scale):
    state = {"params_ema": tiny_dcm(upscale=scale).state_dict()}
    with pytest.raises(SdatcError, match=f"x{scale} SwinIR, the DCM is x4"):
        load_swinir_state_dict(dcm, state, verbose=False)


def test_extra_or_missing_key(dcm, capsys):
    state = dcm.state_dict()
    extra = {**state, "conv_extra.weight": torch.zeros(1)}
    with pytest.raises(SdatcError, match="conv_extra.weight"):
        load_swinir_state_dict(dcm, extra)
    assert "conv_extra.weight" in capsys.readouterr().out  # verbose report

    missing = {k: v for k, v in state.items() if k != "layers.1.conv.bias"}
    with pytest.raises(SdatcError, match=r"layers\.1\.conv\.bias"):
        load_swinir_state_dict(dcm, missing, verbose=False)


def test_shape_mismatch():
    wide = DCM(DCMConfig(embed_dim=32, depths=[2, 2], num_heads=[2, 2])).state_dict()
    with pytest.raises(SdatcError, match="shape mismatch.*conv_first.weight"):
        load_swinir_state_dict(tiny_dcm(), wide, verbose=False)


def test_missing_file(dcm, tmp_path):
    with pytest.raises(SdatcError, match="nope.pth.*SwinIR-M_x4"):
        load_swinir_checkpoint(dcm, tmp_path / "nope.pth")


def test_interpolation_start_is_near_bicubic_and_trains(carphone_frames):
    """init_as_interpolation: the same architecture, starting as a cubic x4 upscaler (interior within
    ~1/255 of MATLAB bicubic), with gradients reaching the transformer body after one step."""
    import numpy as np

    from sdatc.data.imresize import bicubic_down, bicubic_up
    from sdatc.metrics.psnr_ssim import psnr_y
    from sdatc.models.dcm import DCM, DCMConfig, init_as_interpolation

    torch.manual_seed(0)
    dcm = init_as_interpolation(DCM(DCMConfig(embed_dim=24, depths=[2], num_heads=[2], num_feat=16)))
    assert set(dcm.state_dict()) == set(
        DCM(DCMConfig(embed_dim=24, depths=[2], num_heads=[2], num_feat=16)).state_dict())
    gt = carphone_frames[0, :128, :160]
    lr = bicubic_down(gt, 4)
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = (dcm(x)[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    ref = bicubic_up(lr, 4)
    inner = (slice(8, -8), slice(8, -8))
    assert psnr_y(y[inner], ref[inner]) > 40
    assert abs(psnr_y(y[inner], gt[inner]) - psnr_y(ref[inner], gt[inner])) < 1.0
    opt = torch.optim.Adam(dcm.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        target = torch.from_numpy(np.ascontiguousarray(gt)).permute(2, 0, 1)[None] / 255
        torch.nn.functional.l1_loss(dcm(x), target).backward()
        opt.step()
    assert dcm.layers[0].residual_group.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

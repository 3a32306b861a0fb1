"""The DCM against an independent SwinIR implementation (spandrel's copy of the official SwinIR code).

The DCM claims to *be* SwinIR classical SR (RSTB body + pixelshuffle upsampler) built from timm's Swin
blocks, so that ``load_swinir_state_dict`` takes SwinIR checkpoints as they are. The existing DCM tests
round-trip the DCM's own state dict; here the weights come from spandrel's ``SwinIR`` (random, seeded,
rescaled so that attention, the relative position bias, the shifted-window mask and the body all
matter), are loaded through ``load_swinir_checkpoint`` from a file, and both networks run on real
image crops of odd sizes (window padding). Tolerances: float32 atol 5e-5 on outputs of std ~1 (timm's
attention and SwinIR's order the same operations differently), float64 atol 1e-10 (the same function
up to rounding). No download: spandrel is a test-only dependency (``.[dev]``).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

spandrel = pytest.importorskip("spandrel")
from spandrel.architectures.SwinIR import SwinIR  # noqa: E402

from sdatc.errors import SdatcError  # noqa: E402
from sdatc.models.dcm import DCM, DCMConfig, load_swinir_checkpoint  # noqa: E402

EMBED, DEPTHS, HEADS, WINDOW, MLP = 24, [2, 2], [2, 2], 8, 2.0
NUM_FEAT = 64  # spandrel's SwinIR hard-codes num_feat = 64 (as the official classical-SR models)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads make these small
    convolutions and attentions several times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spandrel_swinir(upscale: int = 4, img_range: float = 1.0, seed: int = 0) -> torch.nn.Module:
    """spandrel's SwinIR, classical SR layout, with strong seeded random weights (eval mode).

    SwinIR's own init (trunc-normal 0.02 Linear weights, zero bias tables) makes the transformer body
    nearly linear and the relative-position bias irrelevant, so a comparison would barely exercise
    attention; every parameter is redrawn instead: Linear/conv weights N(0, 1/fan_in), LayerNorm
    weights 1 + N(0, 0.3^2), biases N(0, 0.1^2), relative position bias tables N(0, 2^2).
    """
    torch.manual_seed(seed)
    model = SwinIR(img_size=64, in_chans=3, embed_dim=EMBED, depths=DEPTHS, num_heads=HEADS, window_size=WINDOW,
                   mlp_ratio=MLP, upscale=upscale, img_range=img_range, upsampler="pixelshuffle",
                   resi_connection="1conv").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(2.0 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model


def dcm_like(upscale: int = 4, img_range: float = 1.0) -> DCM:
    torch.manual_seed(123)  # its own init is overwritten by the checkpoint
    cfg = DCMConfig(embed_dim=EMBED, depths=DEPTHS, num_heads=HEADS, window_size=WINDOW, mlp_ratio=MLP,
                    upscale=upscale, num_feat=NUM_FEAT, img_range=img_range)
    return DCM(cfg).eval()


def loaded_pair(tmp_path, upscale: int = 4, img_range: float = 1.0) -> tuple[torch.nn.Module, DCM]:
    """(spandrel SwinIR, DCM filled from SwinIR's full state dict saved as a .pth checkpoint)."""
    ref = spandrel_swinir(upscale, img_range)
    state = ref.state_dict()
    # what makes the file a SwinIR checkpoint: its persistent buffers, which timm recomputes
    assert any(k.endswith(".attn.relative_position_index") for k in state)
    assert any(k.endswith(".attn_mask") for k in state)
    path = tmp_path / f"swinir_x{upscale}.pth"
    torch.save({"params_ema": state}, path)
    dcm = dcm_like(upscale, img_range)
    load_swinir_checkpoint(dcm, path)
    return ref, dcm


def crop(frames, h: int, w: int, y: int = 31, x: int = 57, frame: int = 0) -> torch.Tensor:
    """(1, 3, h, w) float32 crop of a real carphone frame in [0, 1]."""
    return torch.from_numpy(frames[frame, y:y + h, x:x + w].copy()).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def x4_pair(tmp_path_factory):
    return loaded_pair(tmp_path_factory.mktemp("swinir"))


@pytest.mark.parametrize("h, w", [(37, 45), (40, 48), (13, 9)])
def test_dcm_equals_swinir_on_real_crops(x4_pair, carphone_frames, h, w):
    """Same outputs as SwinIR (float32) on real crops: a multiple of the window, and odd sizes that
    both pad (reflect, bottom/right) to the window and crop back."""
    ref, dcm = x4_pair
    x = torch.cat([crop(carphone_frames, h, w, frame=0), crop(carphone_frames, h, w, y=80, x=101, frame=5)])
    with torch.no_grad():
        want, got = ref(x), dcm(x)
    assert got.shape == want.shape == (2, 3, 4 * h, 4 * w)
    assert want.std() > 0.3  # the outputs carry signal (not a near-constant function)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=0)


def test_dcm_equals_swinir_in_float64(x4_pair, carphone_frames):
    """In float64 the two agree to 1e-10: the same function, only float32 rounding differs above."""
    ref, dcm = x4_pair
    x = crop(carphone_frames, 13, 19).double()
    with torch.no_grad():
        want, got = copy.deepcopy(ref).double()(x), copy.deepcopy(dcm).double()(x)
    assert want.std() > 0.3
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_comparison_is_sensitive_to_attention_details(x4_pair, carphone_frames):
    """The match above is not vacuous: the shift, the position bias and the padding mode each change
    the output far beyond the tolerance."""
    ref, dcm = x4_pair
    x = crop(carphone_frames, 37, 45)
    with torch.no_grad():
        want = ref(x)
        no_shift = copy.deepcopy(dcm)
        no_shift.layers[1].residual_group.blocks[1].shift_size = (0, 0)
        assert (no_shift(x) - want).abs().max() > 1e-2
        other_bias = copy.deepcopy(dcm)
        table = other_bias.layers[0].residual_group.blocks[0].attn.relative_position_bias_table
        table.copy_(table.flip(0))  # same values, other relative positions
        assert (other_bias(x) - want).abs().max() > 1e-2
        replicate = ref(F.pad(x, (0, 3, 0, 3), mode="replicate"))[..., : 4 * 37, : 4 * 45]
        assert (replicate - want).abs().max() > 1e-2


@pytest.mark.parametrize("upscale, img_range", [(2, 1.0), (3, 1.0), (4, 255.0)])
def test_other_scales_and_img_range(tmp_path, carphone_frames, upscale, img_range):
    """x2 / x3 pixelshuffle upsamplers and img_range 255 (mean subtraction then scaling) match too."""
    ref, dcm = loaded_pair(tmp_path, upscale, img_range)
    x = crop(carphone_frames, 19, 27)
    with torch.no_grad():
        want, got = ref(x), dcm(x)
    assert got.shape == (1, 3, upscale * 19, upscale * 27)
    assert want.std() > 0.05  # (img_range 255 divides the network's output by 255 before adding the mean)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=0)


def test_below_reflect_limit_dcm_pads_replicate(x4_pair, carphone_frames):
    """A documented divergence: an input smaller than its window padding cannot be reflect-padded;
    SwinIR raises, the DCM pads with replicate instead (and equals SwinIR on the replicate-padded input)."""
    ref, dcm = x4_pair
    x = crop(carphone_frames, 3, 5)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            ref(x)
        want = ref(F.pad(x, (0, 3, 0, 5), mode="replicate"))[..., :12, :20]
        got = dcm(x)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=0)


def test_timm_relative_position_index_is_swinirs(x4_pair):
    """The bias-table lookup is the same in both, so a loaded table means the same offsets."""
    ref, dcm = x4_pair
    for i, (r_layer, d_layer) in enumerate(zip(ref.layers, dcm.layers)):
        for j, (rb, db) in enumerate(zip(r_layer.residual_group.blocks, d_layer.residual_group.blocks)):
            assert torch.equal(db.attn.relative_position_index.long(), rb.attn.relative_position_index.long()), (i, j)


def test_spandrel_detection(x4_pair, carphone_frames):
    """spandrel's detector on DCM state dicts.

    As saved, a DCM state dict is NOT a SwinIR checkpoint for spandrel (nor for SwinIR's strict
    ``load_state_dict``): timm keeps ``relative_position_index`` (and the shifted-window mask) as
    non-persistent buffers, and spandrel's SwinIR detection requires
    ``layers.0.residual_group.blocks.0.attn.relative_position_index``. With SwinIR's buffers added
    (the index from timm, equal to SwinIR's; the mask of SwinIR's 64 px training size), spandrel
    detects a classical x4 SwinIR with the DCM's hyper-parameters, and its model equals the DCM.
    """
    from spandrel import ModelLoader, UnsupportedModelError

    _, dcm = x4_pair
    own = dcm.state_dict()
    assert not any(k.endswith("relative_position_index") or k.endswith("attn_mask") for k in own)
    with pytest.raises(UnsupportedModelError):
        ModelLoader().load_from_state_dict(dict(own))

    state = {k: v.clone() for k, v in own.items()}
    for i, layer in enumerate(dcm.layers):
        for j, block in enumerate(layer.residual_group.blocks):
            prefix = f"layers.{i}.residual_group.blocks.{j}"
            state[f"{prefix}.attn.relative_position_index"] = block.attn.relative_position_index.long().clone()
            if j % 2 == 1:
                state[f"{prefix}.attn_mask"] = torch.zeros(64, WINDOW * WINDOW, WINDOW * WINDOW)  # recomputed per size
    desc = ModelLoader().load_from_state_dict(state)
    assert desc.architecture.id == "SwinIR"
    assert desc.scale == 4 and desc.input_channels == 3 and desc.output_channels == 3
    model = desc.model.eval()
    assert model.upsampler == "pixelshuffle" and model.window_size == WINDOW and model.img_range == 1.0
    assert [len(layer.residual_group.blocks) for layer in model.layers] == DEPTHS
    x = crop(carphone_frames, 37, 45)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dcm(x), atol=5e-5, rtol=0)


def test_non_classical_swinir_is_refused(tmp_path):
    """A lightweight (pixelshuffledirect) SwinIR checkpoint from spandrel is refused with a clear error."""
    torch.manual_seed(0)
    light = SwinIR(img_size=64, in_chans=3, embed_dim=EMBED, depths=DEPTHS, num_heads=HEADS, window_size=WINDOW,
                   mlp_ratio=MLP, upscale=4, upsampler="pixelshuffledirect", resi_connection="1conv")
    path = tmp_path / "light.pth"
    torch.save(light.state_dict(), path)
    with pytest.raises(SdatcError, match="lightweight SwinIR"):
        load_swinir_checkpoint(dcm_like(), path)

"""Distortion Control Module (DCM): a SwinIR classical-SR network (pixelshuffle upsampler).

The layout and parameter names follow SwinIR (Liang et al., 2021) so that its released
classical x4 checkpoint (``001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth``) loads directly::

    dcm = DCM(DCMConfig())
    load_swinir_checkpoint(dcm, "weights/001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth")
    hr = dcm(lr)  # (B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w)

The Swin blocks are timm's ``SwinTransformerBlock`` with ``always_partition=True`` (the window
is never shrunk and the shift never dropped, as in SwinIR at inference) and
``dynamic_mask=True`` (the shifted-window mask is built for each input size).

This is the reference forward, with autograd; inference runs the same function in fewer memory passes
(``sdatc/models/dcm_fast.py``, ``dcm_inference(dcm, x)``, called by the pipelines).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from sdatc.errors import SdatcError
from sdatc.utils import read_state_dict

SWINIR_X4_NAME = "001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth"


@dataclasses.dataclass
class DCMConfig:
    """SwinIR classical-SR hyper-parameters (defaults: SwinIR-M x4, 11.9 M parameters).

    Args:
        in_channels: image channels (input and output).
        embed_dim: feature width C of the transformer body.
        depths: number of Swin blocks in each residual Swin transformer block (RSTB).
        num_heads: attention heads in each RSTB (divides ``embed_dim``).
        window_size: attention window; inputs are padded to a multiple of it.
        mlp_ratio: MLP hidden width / C.
        upscale: super-resolution factor: 3 or a power of 2 (2, 4, ...).
        num_feat: channels of the upsampler.
        img_range: pixel range the network works in (1.0 for SwinIR classical SR).
        rgb_mean: per-channel mean subtracted before the network (used when in_channels == 3).
    """

    in_channels: int = 3
    embed_dim: int = 180
    depths: list[int] = dataclasses.field(default_factory=lambda: [6] * 6)
    num_heads: list[int] = dataclasses.field(default_factory=lambda: [6] * 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    upscale: int = 4
    num_feat: int = 64
    img_range: float = 1.0
    rgb_mean: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(
                f"depths {self.depths} and num_heads {self.num_heads} must be non-empty lists "
                "of the same length (one entry per RSTB)"
            )
        for heads in self.num_heads:
            if heads < 1 or self.embed_dim % heads:
                raise ValueError(
                    f"embed_dim {self.embed_dim} is not divisible by num_heads {heads}"
                )
        if self.window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {self.window_size}")
        if not _is_supported_scale(self.upscale):
            raise ValueError(f"upscale must be 3 or a power of 2 (2, 4, ...), got {self.upscale}")
        if self.in_channels == 3 and len(self.rgb_mean) != 3:
            raise ValueError(f"rgb_mean needs 3 values, got {self.rgb_mean}")


def _is_supported_scale(scale: int) -> bool:
    return scale == 3 or (scale >= 2 and scale & (scale - 1) == 0)


def _upsampler(scale: int, num_feat: int) -> nn.Sequential:
    """SwinIR ``Upsample``: [conv, PixelShuffle(2)] x log2(scale), or [conv, PixelShuffle(3)]."""
    layers: list[nn.Module] = []
    if scale == 3:
        layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
    else:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


class PatchEmbed(nn.Module):
    """SwinIR ``PatchEmbed`` with patch size 1: (B, C, H, W) map -> LayerNorm-ed tokens.

    Tokens are kept as a (B, H, W, C) grid, the layout timm's Swin blocks take.

    Args:
        dim: channels C.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, H, W, C)
        return self.norm(x.permute(0, 2, 3, 1))


class BasicLayer(nn.Module):
    """A stack of Swin blocks with alternating shift 0 / window_size // 2 (SwinIR ``BasicLayer``).

    Args:
        dim: channels C.
        depth: number of blocks.
        num_heads: attention heads.
        window_size: attention window (never shrunk).
        mlp_ratio: MLP hidden width / C.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution=(8 * window_size, 8 * window_size),  # unused: see flags below
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                always_partition=True,  # keep window/shift whatever input_resolution says
                dynamic_mask=True,  # build the shift mask for the actual (H, W)
                mlp_ratio=mlp_ratio,
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C), H and W multiples of window_size
        for block in self.blocks:
            x = block(x)
        return x  # (B, H, W, C)



class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin blocks, a 3x3 conv, and a residual add.

    Args:
        dim: channels C.
        depth: Swin blocks in the group.
        num_heads: attention heads.
        window_size: attention window.
        mlp_ratio: MLP hidden width / C.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float):
        super().__init__()
        self.residual_group = BasicLayer(dim, depth, num_heads, window_size, mlp_ratio)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C)
        y = self.residual_group(x).permute(0, 3, 1, 2)  # (B, C, H, W)
        y = self.conv(y).permute(0, 2, 3, 1)  # (B, H, W, C)
        return x + y


class DCM(nn.Module):
    """SwinIR classical SR (``upsampler='pixelshuffle'``) used as the distortion control module.

    Args:
        cfg: network hyper-parameters.
    """

    def __init__(self, cfg: DCMConfig | None = None):
        super().__init__()
        cfg = cfg or DCMConfig()
        self.cfg = cfg
        c, nf = cfg.embed_dim, cfg.num_feat
        mean = cfg.rgb_mean if cfg.in_channels == 3 else (0.0,) * cfg.in_channels
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

        self.conv_first = nn.Conv2d(cfg.in_channels, c, 3, 1, 1)
        self.patch_embed = PatchEmbed(c)
        self.layers = nn.ModuleList(
            RSTB(c, depth, heads, cfg.window_size, cfg.mlp_ratio)
            for depth, heads in zip(cfg.depths, cfg.num_heads)
        )
        self.norm = nn.LayerNorm(c)
        self.conv_after_body = nn.Conv2d(c, c, 3, 1, 1)
        self.conv_before_upsample = nn.Sequential(
            nn.Conv2d(c, nf, 3, 1, 1), nn.LeakyReLU(inplace=True)
        )
        self.upsample = _upsampler(cfg.upscale, nf)
        self.conv_last = nn.Conv2d(nf, cfg.in_channels, 3, 1, 1)
        self.apply(_init_weights)
        self.gradient_checkpointing = False  # recompute each RSTB in backward when training

    def pad_to_window(self, x: torch.Tensor) -> torch.Tensor:
        """Pad bottom/right to a multiple of window_size (reflect; replicate if too small)."""
        h, w = x.shape[-2:]
        ws = self.cfg.window_size
        ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
        if ph == 0 and pw == 0:
            return x
        mode = "reflect" if ph < h and pw < w else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer body. x: (B, C, H, W) -> (B, C, H, W)."""
        t = self.patch_embed(x)  # (B, H, W, C)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                t = torch.utils.checkpoint.checkpoint(layer, t, use_reentrant=False)  # (B, H, W, C)
            else:
                t = layer(t)  # (B, H, W, C)
        return self.norm(t).permute(0, 3, 1, 2)  # (B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-resolve. x: (B, in_channels, h, w) in [0, 1] -> (B, in_channels, s*h, s*w)."""
        h, w = x.shape[-2:]
        s = self.cfg.upscale
        x = self.pad_to_window(x)  # (B, 3, H, W), H, W multiples of window_size
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.cfg.img_range

        feat = self.conv_first(x)  # (B, C, H, W)
        feat = self.conv_after_body(self.forward_features(feat)) + feat  # (B, C, H, W)
        feat = self.conv_before_upsample(feat)  # (B, num_feat, H, W)
        out = self.conv_last(self.upsample(feat))  # (B, 3, s*H, s*W)

        out = out / self.cfg.img_range + mean
        return out[:, :, : s * h, : s * w]  # (B, 3, s*h, s*w)


def _init_weights(m: nn.Module) -> None:
    """SwinIR's init: truncated-normal Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- checkpoints

# Buffers SwinIR saves that timm recomputes (relative position index, shifted-window mask).
_DROPPED_SUFFIXES = (".attn.relative_position_index", ".attn_mask")


def _checkpoint_kind(state: dict[str, torch.Tensor]) -> tuple[str, int | None]:
    """Guess (upsampler, scale) of a SwinIR state dict from its upsampler weights."""
    if "conv_up1.weight" in state:
        return "real-world SwinIR (nearest+conv upsampler)", None
    if "conv_before_upsample.0.weight" not in state:
        if "upsample.0.weight" in state:
            return "lightweight SwinIR (pixelshuffledirect upsampler)", None
        return "SwinIR without an upsampler (denoising / JPEG artifact removal)", 1
    convs = [state[k] for i in range(0, 16, 2) if (k := f"upsample.{i}.weight") in state]
    if not convs:
        return "SwinIR", None
    if len(convs) == 1 and convs[0].shape[0] == 9 * convs[0].shape[1]:
        return "SwinIR", 3
    return "SwinIR", 2 ** len(convs)


def _unwrap(state: dict) -> dict[str, torch.Tensor]:
    """params_ema > params > bare state dict; strip a DataParallel ``module.`` prefix."""
    if not isinstance(state, dict):
        raise SdatcError(f"a SwinIR checkpoint must be a dict, got {type(state).__name__}")
    for key in ("params_ema", "params"):
        if key in state:
            state = state[key]
            break
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SdatcError(f"not a SwinIR state dict: entries {bad[:5]} are not tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_swinir_state_dict(dcm: DCM, state: dict, verbose: bool = True) -> None:
    """Load SwinIR weights into ``dcm`` strictly.

    Args:
        dcm: the module to fill.
        state: a SwinIR checkpoint dict (``params_ema`` preferred over ``params``) or a bare
            state dict. SwinIR's saved ``relative_position_index`` / ``attn_mask`` buffers are
            ignored (timm recomputes them).
        verbose: print the first missing / unexpected keys before raising.

    Raises:
        SdatcError: wrong scale or SwinIR variant, missing / unexpected keys, shape mismatch.
    """
    state = _unwrap(state)
    state = {k: v for k, v in state.items() if not k.endswith(_DROPPED_SUFFIXES)}

    kind, scale = _checkpoint_kind(state)
    want = dcm.cfg.upscale
    if kind != "SwinIR":
        raise SdatcError(f"checkpoint is a {kind}, the DCM is a classical x{want} SwinIR")
    if scale is not None and scale != want:
        raise SdatcError(f"checkpoint is a x{scale} SwinIR, the DCM is x{want}")

    expected = dcm.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if verbose and (missing or unexpected):
        print(
            f"SwinIR checkpoint: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    if missing or unexpected:
        raise SdatcError(
            f"SwinIR checkpoint does not match the DCM ({dcm.cfg.embed_dim} channels, "
            f"depths {dcm.cfg.depths}): missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs DCM {tuple(expected[k].shape)}"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise SdatcError(f"SwinIR checkpoint has {len(wrong)} shape mismatches: {wrong[:3]}")
    dcm.load_state_dict(state, strict=True)


def load_swinir_checkpoint(dcm: DCM, path: str | Path) -> None:
    """Load a SwinIR checkpoint file (``.safetensors`` or a torch pickle) into ``dcm``.

    Args:
        dcm: the module to fill.
        path: checkpoint file, e.g. ``001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth``.

    Raises:
        SdatcError: missing or unreadable file, or weights that do not fit (see
            :func:`load_swinir_state_dict`).
    """
    path = Path(path)
    if not path.is_file():
        raise SdatcError(
            f"DCM checkpoint not found: {path} (expected a SwinIR classical "
            f"x{dcm.cfg.upscale} checkpoint, e.g. {SWINIR_X4_NAME})"
        )
    load_swinir_state_dict(dcm, read_state_dict(path, "DCM checkpoint"))


# --------------------------------------------------------------------------- interpolation start

# Keys cubic (a = -0.5) weights of a 2x upsampler for output phase 0 (input coordinate y - 1/4) on the
# taps y-1, y, y+1; the far tap at y+2 (-0.0234) is dropped and the rest renormalised. Phase 1 mirrors it.
_HALF = torch.tensor([0.2266, 0.8672, -0.0703], dtype=torch.float64)
_HALF = _HALF / _HALF.sum()


@torch.no_grad()
def init_as_interpolation(dcm: DCM) -> DCM:
    """Set a x2 / x4 DCM to start as plain cubic interpolation, so training refines an upscaler
    instead of first learning to upscale at all (a cheap CPU-trained preview model needs this).

    The image passes through unchanged: RGB identity in the first 3 channels of ``conv_first``; the
    transformer body's contribution starts at zero (``conv_after_body`` zero-initialised, so its
    weights still get gradients, as a ControlNet zero conv); ``conv_before_upsample`` carries
    +x and -x (6 channels, so the LeakyReLU loses nothing); each [conv, PixelShuffle(2)] stage
    upsamples those channels with separable cubic 2x kernels; ``conv_last`` recombines +x / -x. All
    other weights keep their random values, and the weights that would mix them into the image path
    start at zero. The architecture is unchanged; this is only a starting point.
    """
    cfg = dcm.cfg
    if cfg.upscale not in (2, 4) or cfg.in_channels != 3 or cfg.num_feat < 6 or cfg.embed_dim < 3:
        raise SdatcError("interpolation start needs an RGB x2/x4 DCM with num_feat >= 6 and embed_dim >= 3")
    first = dcm.conv_first
    first.weight[:3].zero_()
    first.bias[:3].zero_()
    for k in range(3):
        first.weight[k, k, 1, 1] = 1.0 / cfg.img_range  # undo img_range: features carry x - mean
    nn.init.zeros_(dcm.conv_after_body.weight)
    nn.init.zeros_(dcm.conv_after_body.bias)
    before = dcm.conv_before_upsample[0]
    before.weight[:6].zero_()
    before.bias[:6].zero_()
    for k in range(3):
        before.weight[2 * k, k, 1, 1], before.weight[2 * k + 1, k, 1, 1] = 1.0, -1.0
    phases = [torch.outer(a, b) for a in (_HALF, _HALF.flip(0)) for b in (_HALF, _HALF.flip(0))]  # (i, j) order
    for conv in (m for m in dcm.upsample if isinstance(m, nn.Conv2d)):
        conv.weight[:24].zero_()  # output channels 4k + phase of the 6 image channels
        conv.bias[:24].zero_()
        conv.weight[24:, :6].zero_()  # the other channels do not read the image path ...
        for k in range(6):
            for p, kern in enumerate(phases):
                conv.weight[4 * k + p, k] = kern.to(conv.weight.dtype)
    last = dcm.conv_last
    last.weight.zero_()  # ... and only the image path reaches the output, at first
    last.bias.zero_()
    slope = 0.01  # LeakyReLU: lrelu(a) - lrelu(-a) = (1 + slope) a
    for k in range(3):
        last.weight[k, 2 * k, 1, 1], last.weight[k, 2 * k + 1, 1, 1] = 1 / (1 + slope), -1 / (1 + slope)
    return dcm

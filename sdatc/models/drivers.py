"""Drivers: the forwards of diffusers' UNet, VAE encoder and VAE decoder, walking their public children and
calling the unmodified block forwards, with :class:`~sdatc.models.sites.Site` s given a per-call
:class:`~sdatc.models.sites.Ctx`.

diffusers' own ``UNet2DConditionModel.forward`` and ``Decoder.forward`` pass their blocks a fixed list
of arguments, so a temporal module (frames per window) or CFW (encoder features) cannot get its inputs
through them. Without Sites each driver equals the diffusers forward it stands for
(``tests/models/test_sites.py``):

    unet_forward(unet, x, t, text)          == unet(x, t, encoder_hidden_states=text).sample
    vae_encode(vae, x, levels)[0]            == vae.encode(x).latent_dist.mode()
    vae_decode(vae, z, Ctx())                == vae.decode(z).sample   (z unscaled)

Only the SD 2.1 feature set is implemented; :func:`check_unet` refuses the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from sdatc.errors import SdatcError
from sdatc.models.sites import Ctx, Site, sites


def call(m: nn.Module, h: Tensor, ctx: Ctx, inner: Callable):
    """Run ``inner(m, h, rows)``, or the Site's ``pre -> inner -> mid -> resample -> post`` when ``m`` is one.

    ``rows`` is the slice of the batch that ``h`` holds, for inputs ``inner`` must slice alike (time
    embedding, text, skips). With ``ctx.chunk`` (UltraVSR's TAI) the frozen part runs on chunks of that many
    frames and the Site's modules on the whole window; nothing temporal may sit inside a chunked block."""
    if ctx.chunk and ctx.chunk < h.shape[0]:  # (the drivers checked once that no block holds a Site inside)
        run = _chunked(inner, ctx.chunk)
    else:
        def run(block, x):
            return inner(block, x, slice(None))
    return m(h, ctx, run) if isinstance(m, Site) else run(m, h)


def _check_chunkable(root: nn.Module, ctx: Ctx) -> None:
    """With ``ctx.chunk``, no Site may sit inside a frozen block (it would see a chunk, not the window)."""
    if ctx.chunk and any(isinstance(x, Site) for _, s in sites(root) for x in s.block.modules()):
        raise SdatcError("chunked inference (ctx.chunk) over a block that holds new modules: they would see a chunk")


def _chunked(inner: Callable, chunk: int) -> Callable:
    def run(block: nn.Module, h: Tensor):
        outs = [inner(block, h[i:i + chunk], slice(i, i + chunk)) for i in range(0, h.shape[0], chunk)]
        if isinstance(outs[0], tuple):  # (h, skips): each gathered along the batch
            return torch.cat([o[0] for o in outs]), tuple(torch.cat(s) for s in zip(*(o[1] for o in outs), strict=True))
        return torch.cat(outs)

    return run


def _resnet(m: nn.Module, x: Tensor, rows: slice = slice(None)) -> Tensor:
    return m(x, None)


def vae_encode(vae: nn.Module, x: Tensor, levels: Sequence[int] = (),
               checkpoint: bool = False) -> tuple[Tensor, dict[int, Tensor]]:
    """(N, 3, H, W) in [-1, 1] -> the posterior mode (N, C_lat, H/8, W/8), unscaled, and the encoder
    features at ``levels``: :func:`vae_posterior` without the log-variance."""
    mean, _, feats = vae_posterior(vae, x, levels, checkpoint)
    return mean, feats


def vae_posterior(vae: nn.Module, x: Tensor, levels: Sequence[int] = (),
                  checkpoint: bool = False) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """(N, 3, H, W) in [-1, 1] -> the posterior's mean and log-variance (N, C_lat, H/8, W/8) each, unscaled
    and unclamped (``DiagonalGaussianDistribution`` clamps it to [-30, 20]), and the encoder features at
    ``levels`` (after each level's resnets, before its downsampler). The one place that re-implements
    ``Encoder.forward``: it cannot return features. ``checkpoint``: recompute the resnets in backward, each
    resnet and the mid block (gradients reach SDATC's DCM through the encoder in stage 1; UltraVSR's encoder
    carries LoRA)."""
    enc = vae.encoder
    h = enc.conv_in(x)
    feats = {}
    for level, down in enumerate(enc.down_blocks):
        for resnet in down.resnets:
            h = (torch.utils.checkpoint.checkpoint(resnet, h, None, use_reentrant=False) if checkpoint
                 else resnet(h, None))
        if level in levels:
            feats[level] = h  # (N, C_level, H / 2^level, W / 2^level)
        for d in down.downsamplers or ():
            h = d(h)
    h = torch.utils.checkpoint.checkpoint(enc.mid_block, h, use_reentrant=False) if checkpoint else enc.mid_block(h)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))  # (N, 2 C_lat, H/8, W/8)
    if vae.quant_conv is not None:
        h = vae.quant_conv(h)
    # the mid block's Attention returns a transposed view (channels_last strides) that the layers after it keep:
    # the latent in the standard layout, so the guidance encoder's convs (1x1 zero convs included) see it and
    # their weight gradients keep the weights' strides (DDP's buckets warn otherwise)
    c = vae.config.latent_channels
    return h[:, :c].contiguous(), h[:, c:].contiguous(), feats


def vae_decode(vae: nn.Module, z: Tensor, ctx: Ctx) -> Tensor:
    """(N, C_lat, h, w) unscaled latents -> (N, 3, 8h, 8w) in [-1, 1], through the decoder's Sites."""
    dec = vae.decoder
    _check_chunkable(dec, ctx)
    h = vae.post_quant_conv(z) if vae.post_quant_conv is not None else z
    h = dec.conv_in(h)  # (N, 512, h, w)
    mid = dec.mid_block
    h = call(mid.resnets[0], h, ctx, _resnet)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        h = call(resnet, attn(h) if attn is not None else h, ctx, _resnet)

    def level(block: nn.Module, x: Tensor, rows: slice) -> Tensor:  # UpDecoderBlock2D.forward, with Sites inside
        for resnet in block.resnets:
            x = call(resnet, x, ctx, _resnet)
        for u in block.upsamplers or ():
            x = u(x)
        return x

    for up in dec.up_blocks:
        h = call(up, h, ctx, level)  # (N, C_i, h * 2^i, w * 2^i), upsampled except the last
    return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))  # (N, 3, 8h, 8w)


_UNET_DEFAULTS = {"class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim_type": None,
                  "time_cond_proj_dim": None, "center_input_sample": False, "attention_type": "default",
                  "mid_block_type": "UNetMidBlock2DCrossAttn"}


def check_unet(unet: nn.Module) -> None:
    """Refuse UNet features :func:`unet_forward` does not implement (SD 2.1 uses none of them)."""
    bad = [f"{k}={unet.config.get(k)!r}" for k, v in _UNET_DEFAULTS.items() if unet.config.get(k, v) != v]
    if bad:
        raise SdatcError(f"this UNet uses {', '.join(bad)}, "
                         "which sdatc's UNet driver does not implement (SD 2.1 does not)")


def unet_forward(unet: nn.Module, x: Tensor, t: Tensor, text: Tensor, ctx: Ctx,
                 down_res: Sequence[Tensor] | None = None, mid_res: Tensor | None = None) -> Tensor:
    """``UNet2DConditionModel.forward`` for SD 2.1 with Sites: (N, 4, h, w) latents, timesteps (N,), text
    (N, 77, D), optional ControlNet-style residuals -> (N, 4, h, w). h and w: multiples of 2^(levels-1)."""
    _check_chunkable(unet, ctx)
    n_up = len(unet.up_blocks) - 1
    if x.shape[-2] % 2**n_up or x.shape[-1] % 2**n_up:
        raise SdatcError(f"latent {tuple(x.shape[-2:])} is not a multiple of {2**n_up} (pad the input)")
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t))  # (N, D_t)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    def kw(block: nn.Module, rows: slice) -> dict:
        return {"temb": emb[rows],
                **({"encoder_hidden_states": text[rows]} if getattr(block, "has_cross_attention", False) else {})}

    h = unet.conv_in(x)
    skips: list[Tensor] = [h]
    for block in unet.down_blocks:
        h, res = call(block, h, ctx, lambda b, y, rows: b(hidden_states=y, **kw(b, rows)))
        skips += res
    if down_res is not None:
        skips = [s + a for s, a in zip(skips, down_res, strict=True)]
    h = call(unet.mid_block, h, ctx, lambda b, y, rows: b(y, **kw(b, rows)))
    if mid_res is not None:
        h = h + mid_res
    for block in unet.up_blocks:
        n = len(block.resnets)
        res, skips = tuple(skips[-n:]), skips[:-n]
        h = call(block, h, ctx, lambda b, y, rows, res=res: b(
            hidden_states=y, res_hidden_states_tuple=tuple(r[rows] for r in res), **kw(b, rows)))
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


"""Sites: trainable modules placed at named points of a frozen diffusers UNet / VAE, as explicit children.

A :class:`Site` replaces one frozen diffusers module in its parent (``setattr``, as peft's LoRA layers
do) and owns it as ``block`` together with the new modules acting on it, in three slots::

    pre  -> block's layers -> mid -> block's upsampler (if any) -> post

    table = [Placement("unet.up_blocks.0", "mid", "capm", CAPM(1280, cfg))]
    insert(model, table)             # model.unet.up_blocks[0] is now Site(block=CrossAttnUpBlock2D, mid=capm)
    print(model)                     # shows every new module where it acts
    with detached(model):            # the plain diffusers tree, e.g. to save SD's own weights
        model.unet.save_pretrained(folder)

No hooks: the drivers at the end of this file (:func:`unet_forward`, :func:`vae_encode`, :func:`vae_decode`)
walk diffusers' public children and pass a :class:`Ctx` (frames per window, CFW features) to each Site on
every call; nothing per-call is stored on a module. Every slot module is called as ``module(h, ctx=ctx)``.
SD weights load before :func:`insert` and are never converted; frozen keys gain ``.block`` (and
``.resample.0`` for an upsampler moved behind a ``mid`` slot), new keys say where they act
(``unet.up_blocks.0.mid.capm.*``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdatc.errors import SdatcError

SLOTS = ("pre", "mid", "post")


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Per-call inputs of the new modules, passed on every call and never stored.

    num_frames: frames per window on the batch axis (N = B * num_frames, frames of a window adjacent).
    enc_feats: VAE-encoder features by level (CFW), or None (CFW then passes its input through).
    cfw_weight: CFW's w in [0, 1].
    chunk: run the frozen blocks on chunks of this many frames, the Site modules on the whole window
        (UltraVSR's TAI); None: the whole batch at once.
    """

    num_frames: int = 1
    enc_feats: Mapping[int, Tensor] | None = None
    cfw_weight: float = 1.0
    chunk: int | None = None


@dataclasses.dataclass
class Placement:
    """One new module at one point: ``path`` of a frozen module (diffusers names, before insertion),
    ``slot`` in pre | mid | post, ``name`` of the module in that slot."""

    path: str
    slot: str
    name: str
    module: nn.Module


class Site(nn.Module):
    """One frozen diffusers module (``block``, never copied) and the new modules acting on it."""

    def __init__(self, block: nn.Module, slots: Mapping[str, Mapping[str, nn.Module]]):
        super().__init__()
        self.block = block
        for s in SLOTS:  # an empty slot is None (print shows only what acts)
            setattr(self, s, nn.ModuleDict(dict(slots[s])) if slots.get(s) else None)
        self.resample = None  # mid slot: after the block's layers, before its upsampler
        if self.mid is not None and getattr(block, "downsamplers", None) is not None:
            raise SdatcError(f"a mid slot over {type(block).__name__} with downsamplers is not supported")
        if self.mid is not None and getattr(block, "upsamplers", None) is not None:
            self.resample, block.upsamplers = block.upsamplers, None
        self.gradient_checkpointing = False
        self._self_checkpointing: bool | None = None

    @property
    def resnets(self) -> nn.ModuleList:
        return self.block.resnets  # drivers read it; a property, so no key is doubled

    def forward(self, h: Tensor, ctx: Ctx, inner: Callable) -> Tensor | tuple[Tensor, tuple]:
        """``inner(block, h)`` runs the frozen part and returns h or (h, skips); skips pass untouched."""
        ck = self._checkpointing()  # each new module recomputed in backward, as the frozen block is
        for m in (self.pre or {}).values():
            h = checkpoint(m, h, ctx=ctx, use_reentrant=False) if ck else m(h, ctx=ctx)
        if ck and not self._block_checkpoints_itself():
            out = checkpoint(inner, self.block, h, use_reentrant=False)
        else:
            out = inner(self.block, h)
        h, skips = out if isinstance(out, tuple) else (out, None)
        for m in (self.mid or {}).values():
            h = checkpoint(m, h, ctx=ctx, use_reentrant=False) if ck else m(h, ctx=ctx)
        if self.resample is not None:
            h = self.resample[0](h)
        for m in (self.post or {}).values():
            h = checkpoint(m, h, ctx=ctx, use_reentrant=False) if ck else m(h, ctx=ctx)
        return h if skips is None else (h, skips)

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and torch.is_grad_enabled()

    def _block_checkpoints_itself(self) -> bool:
        # diffusers' UNet blocks checkpoint their own layers; a block holding Sites checkpoints inside them.
        # The structure is fixed once Sites are inserted: worked out at the first call, not at every one.
        if self._self_checkpointing is None:
            self._self_checkpointing = hasattr(self.block, "gradient_checkpointing") or any(
                isinstance(m, Site) for m in self.block.modules())
        return self._self_checkpointing



def _resolve(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    try:
        parent = root.get_submodule(parent_path) if parent_path else root
        getattr(parent, name) if not name.isdigit() else parent[int(name)]
    except (AttributeError, IndexError, TypeError) as e:
        raise SdatcError(f"no module at {path!r} to place a new module at ({e})") from None
    return parent, name


def insert(root: nn.Module, table: list[Placement]) -> list[Site]:
    """Wrap each module named in ``table`` in a :class:`Site` holding its new modules (table order)."""
    by_path: dict[str, dict[str, dict[str, nn.Module]]] = {}
    for p in table:
        if p.slot not in SLOTS:
            raise SdatcError(f"unknown slot {p.slot!r} at {p.path} (one of {', '.join(SLOTS)})")
        slot = by_path.setdefault(p.path, {}).setdefault(p.slot, {})
        if p.name in slot:
            raise SdatcError(f"two modules named {p.name!r} in the {p.slot} slot of {p.path}")
        slot[p.name] = p.module
    resolved = {path: _resolve(root, path) for path in by_path}  # all first: nesting order does not matter
    sites = []
    for path, (parent, name) in resolved.items():
        block = getattr(parent, name)
        if isinstance(block, Site):
            raise SdatcError(f"{path} already holds new modules")
        site = Site(block, by_path[path])
        setattr(parent, name, site)
        sites.append(site)
    return sites


def _site_parents(root: nn.Module) -> list[tuple[nn.Module, str, Site]]:
    out = []
    for path, m in root.named_modules():
        if isinstance(m, Site):
            parent_path, _, name = path.rpartition(".")
            out.append((root.get_submodule(parent_path) if parent_path else root, name, m))
    return out


def remove(root: nn.Module) -> list[tuple[nn.Module, str, Site]]:
    """Put every frozen block back where its Site was; returns what :func:`reattach` needs."""
    found = _site_parents(root)
    for parent, name, site in found:
        setattr(parent, name, site.block)
        if site.resample is not None:
            site.block.upsamplers = site.resample
    return found


def reattach(found: list[tuple[nn.Module, str, Site]]) -> None:
    for parent, name, site in found:
        if site.resample is not None:
            site.block.upsamplers = None
        setattr(parent, name, site)


@contextlib.contextmanager
def detached(root: nn.Module) -> Iterator[nn.Module]:
    """The plain diffusers tree within the block (to save or compare SD's own weights)."""
    found = remove(root)
    try:
        yield root
    finally:
        reattach(found)


def sites(root: nn.Module) -> Iterator[tuple[str, Site]]:
    return ((n, m) for n, m in root.named_modules() if isinstance(m, Site))


def site_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Every slot module by its full path (``unet.up_blocks.0.mid.capm``)."""
    return {f"{n}{'.' if n else ''}{s}.{k}": m for n, site in sites(root) for s in SLOTS
            for k, m in (getattr(site, s) or {}).items()}


def pretrained_modules(root: nn.Module) -> list[nn.Module]:
    """The modules of ``root`` outside every Site slot and every peft LoRA adapter: the frozen diffusers parts."""
    new = {id(x) for m in site_modules(root).values() for x in m.modules()}
    new |= {id(x) for n, m in root.named_modules() if n.rsplit(".", 1)[-1].startswith("lora_") for x in m.modules()}
    return [m for m in root.modules() if id(m) not in new]


def cast_pretrained(root: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating weights and buffers of the frozen diffusers parts only; slot modules, LoRA tensors and
    layers with a trainable weight of their own (UltraVSR's conv_in) keep theirs."""
    for m in pretrained_modules(root):
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            m._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)


def pretrained_state_dict(root: nn.Module) -> dict[str, Tensor]:
    """``root.state_dict()`` as plain diffusers names it: without the Site modules and peft's LoRA tensors
    (a LoRA-wrapped layer's ``base_layer`` under the layer's own name)."""
    with detached(root):
        state = root.state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


# Drivers: the forwards of diffusers' UNet, VAE encoder and VAE decoder, walking their public children and
# calling the unmodified block forwards, with Sites given a per-call Ctx.
#
# diffusers' own ``UNet2DConditionModel.forward`` and ``Decoder.forward`` pass their blocks a fixed list
# of arguments, so a temporal module (frames per window) or CFW (encoder features) cannot get its inputs
# through them. Without Sites each driver equals the diffusers forward it stands for
# (``tests/models/test_sites.py``):
#
#     unet_forward(unet, x, t, text)          == unet(x, t, encoder_hidden_states=text).sample
#     vae_encode(vae, x, levels)[0]            == vae.encode(x).latent_dist.mode()
#     vae_decode(vae, z, Ctx())                == vae.decode(z).sample   (z unscaled)
#
# Only the SD 2.1 feature set is implemented; :func:`check_unet` refuses the rest.


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


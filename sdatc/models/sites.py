"""Sites: trainable modules placed at named points of a frozen diffusers UNet / VAE, as explicit children.

A :class:`Site` replaces one frozen diffusers module in its parent (``setattr``, as peft's LoRA layers
do) and owns it as ``block`` together with the new modules acting on it, in three slots::

    pre  -> block's layers -> mid -> block's upsampler (if any) -> post

    table = [Placement("unet.up_blocks.0", "mid", "capm", CAPM(1280, cfg))]
    insert(model, table)             # model.unet.up_blocks[0] is now Site(block=CrossAttnUpBlock2D, mid=capm)
    print(model)                     # shows every new module where it acts
    with detached(model):            # the plain diffusers tree, e.g. to save SD's own weights
        model.unet.save_pretrained(folder)

No hooks: the drivers of :mod:`sdatc.models.drivers` walk diffusers' public children and pass a
:class:`Ctx` (frames per window, CFW features) to each Site on every call; nothing per-call is stored
on a module. Every slot module is called as ``module(h, ctx=ctx)``. SD weights load before
:func:`insert` and are never converted; frozen keys gain ``.block`` (and ``.resample.0`` for an
upsampler moved behind a ``mid`` slot), new keys say where they act
(``unet.up_blocks.0.mid.capm.*``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping

import torch
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

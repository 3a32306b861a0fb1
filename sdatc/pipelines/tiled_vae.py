"""Tiled VAE decode / encode whose normalisation statistics are those of the whole frame.

    x = decode_tiled(model, z, feats, num_frames=5, w=0.75, tile=64, overlap=16)   # (T, 3, 8h, 8w)
    z, feats = encode_tiled(model, img, levels=[1, 2], tile=512, overlap=64)      # z (T, 4, H/8, W/8)

Cutting the VAE into tiles (``tiling.tiled_apply``) makes every GroupNorm normalise each tile with its
own mean and variance, which shifts colour and contrast from tile to tile. Here all tiles advance
together, layer by layer (StableSR's tiled VAE does the same with a hand-written task queue):

* Each tile's forward is the untouched ``model.decode(z_tile, feats_tile, ...)`` /
  ``model.encode(x_tile)``, run in its own thread; a baton lets one thread run at a time, in a fixed
  round-robin order, so the result is deterministic and heavy temporaries are one tile's.
* At a *sync point* a tile hands in partial statistics over the pixels it **owns** (the tiles' owned
  regions partition the frame: overlaps are split at their middle, so no pixel counts twice), passes
  the baton and waits; when the last tile has handed in, the parts are merged and every tile goes on
  with the whole-frame values.
* Sync points, put in by swapping modules for the duration of the call (restored in a ``finally``;
  no torch hooks): every ``nn.GroupNorm`` under ``vae.decoder`` / ``vae.encoder`` (resnets, CFW's
  resblocks, the mid attention's ``group_norm``, ``conv_norm_out``) becomes a :class:`SharedGroupNorm`,
  and the mid block's self-attention a :class:`SharedAttention` whose keys and values are the whole
  frame's tokens (StableSR keeps this attention per tile; on the tiny model that was the largest error
  left). CAPM's whole-map steps (pooled prompt weights, MDTA's L2 norms and ``q k^T``) go through the
  :class:`~sdatc.models.capm.FrameReductions` hook of ``sdatc/models/capm.py``; its prompt is the
  tile's window of the prompt resized to the whole frame (no sync needed).

What stays per tile: convolutions near tile borders (zero padding instead of the neighbours; the
Gaussian blending of the overlaps hides most of it, and the owned pixels near a border carry a little
of it into the statistics). STAM works per pixel over the window's T frames, which every tile holds on
its batch axis, so tiling does not change it.

Memory: the live activations of all tiles exist at once (each thread keeps its own), about those of
the untiled forward plus the overlaps; tiling saves the per-layer temporaries (conv workspaces, the
attention map: a tile's queries x the frame's keys instead of frame x frame). Autocast, grad and
inference mode and the CUDA stream of the caller are carried into the tile threads (each has its own
intra-op thread pool). While a call runs the model's modules are swapped: other threads using the same
model meanwhile get the plain modules (a Shared* module outside a tile thread is the original).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from sdatc.models.capm import using_frame_reductions
from sdatc.pipelines.tiling import tile_starts, tiled_apply

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1)
_local = threading.local()  # .tile: the _Tile this thread runs (tile threads only)


class _Abort(BaseException):
    """Raised in the waiting tiles when another tile failed: unwinds them without being reported."""


# ---------------------------------------------------------------------------------------- the baton


class _Baton:
    """Runs ``n`` tile functions in ``n`` threads, one at a time in round-robin order, and merges
    their partial statistics at each sync point (:meth:`reduce`)."""

    def __init__(self, n: int):
        self.n = n
        self.cond = threading.Condition()
        self.turn: int | None = 0  # the tile that may run; None once all are done
        self.error: BaseException | None = None
        self.done = [False] * n
        self.outputs: list = [None] * n
        self.rounds: list[dict | None] = []  # per sync point: key, parts, result, readers left
        self.pos = [0] * n  # next sync point of each tile

    def _wait_turn(self, k: int) -> None:  # cond held
        self.cond.wait_for(lambda: self.turn == k or self.error is not None)
        if self.error is not None:
            raise _Abort

    def _pass(self, k: int) -> None:  # cond held: the baton to the next unfinished tile
        nxt = [(k + i) % self.n for i in range(1, self.n + 1) if not self.done[(k + i) % self.n]]
        self.turn = nxt[0] if nxt else None
        self.cond.notify_all()

    def reduce(self, k: int, key: str, part, merge: Callable[[list], object]):
        """Tile ``k`` hands in ``part`` at its next sync point; returns ``merge(parts of all tiles)``."""
        with self.cond:
            i = self.pos[k]
            self.pos[k] += 1
            if any(self.done):
                raise RuntimeError(f"tiles disagree: tile {k} reached sync point {i} ({key}) after a tile finished")
            if i == len(self.rounds):
                self.rounds.append({"key": key, "parts": [], "result": None, "left": self.n})
            r = self.rounds[i]
            if r["key"] != key:
                raise RuntimeError(f"tiles disagree at sync point {i}: {r['key']} vs {key} (tile {k})")
            r["parts"].append(part)
            if len(r["parts"]) == self.n:  # the last tile of the round: merge, free the parts
                r["result"], r["parts"] = merge(r["parts"]), None
            self._pass(k)
            self._wait_turn(k)  # the next turn comes after every tile handed in: the result is there
            result = r["result"]
            r["left"] -= 1
            if not r["left"]:
                self.rounds[i] = None
            return result

    def _worker(self, k: int, fn: Callable[[], object]) -> None:
        try:
            with self.cond:
                self._wait_turn(k)
            out = fn()
            with self.cond:
                if self.pos[k] != len(self.rounds):
                    raise RuntimeError(f"tiles disagree: tile {k} finished after {self.pos[k]} of "
                                       f"{len(self.rounds)} sync points")
                self.outputs[k], self.done[k] = out, True
                self._pass(k)
        except _Abort:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            with self.cond:
                if self.error is None:
                    self.error = e
                self.cond.notify_all()

    def run(self, fns: list[Callable[[], object]]) -> list:
        """Run ``fns[k]()`` in thread k; their outputs, or the first exception raised in any of them."""
        threads = [threading.Thread(target=self._worker, args=(k, f), name=f"vae-tile-{k}", daemon=True)
                   for k, f in enumerate(fns)]
        try:
            for t in threads:
                t.start()
            with self.cond:
                self.cond.wait_for(lambda: self.turn is None or self.error is not None)
        except BaseException as e:  # e.g. Ctrl-C while waiting: stop the tiles at their next sync point
            with self.cond:
                self.error = self.error or e
                self.cond.notify_all()
            raise
        finally:
            for t in threads:
                if t.ident is not None:
                    t.join()
        if self.error is not None:
            raise self.error
        return self.outputs


# ---------------------------------------------------------------------------------------- one tile


@dataclasses.dataclass
class _Tile:
    """One tile: its box and owned region in input pixels, the frame size, the shared baton."""

    index: int
    box: Box
    own: Box  # inside box; the owned regions of all tiles partition the frame
    frame: tuple[int, int]  # (H, W) input pixels
    baton: _Baton

    def scale(self, h: int, w: int) -> Fraction:
        """Resolution of a (h, w) activation of this tile relative to the input (e.g. 8, 1, 1/8)."""
        th, tw = self.box[1] - self.box[0], self.box[3] - self.box[2]
        s = Fraction(h, th)
        if s != Fraction(w, tw):
            raise RuntimeError(f"a {h}x{w} activation of a {th}x{tw} tile has two scales")
        return s

    def at(self, v: int, s: Fraction) -> int:
        """Input coordinate ``v`` at scale ``s`` (a whole pixel, or an error)."""
        p = v * s
        if p.denominator != 1:
            raise RuntimeError(f"tile coordinate {v} at scale {s} is not a whole pixel (align the tiles)")
        return int(p)

    def owned(self, x: Tensor) -> Tensor:
        """The owned pixels of a (..., h, w) activation of this tile (a view)."""
        s = self.scale(*x.shape[-2:])
        y0, _, x0, _ = self.box
        oy0, oy1, ox0, ox1 = (self.at(v - o, s) for v, o in zip(self.own, (y0, y0, x0, x0)))
        return x[..., oy0:oy1, ox0:ox1]

    def hw(self, n_pixels: int) -> tuple[int, int]:
        """(h, w) of this tile's activation with ``n_pixels`` pixels (a flattened (N, C, h*w) map)."""
        th, tw = self.box[1] - self.box[0], self.box[3] - self.box[2]
        for s in {Fraction(2) ** e for e in range(-6, 7)}:
            h, w = th * s, tw * s
            if h.denominator == w.denominator == 1 and h * w == n_pixels:
                return int(h), int(w)
        raise RuntimeError(f"no power-of-two scale of a {th}x{tw} tile has {n_pixels} pixels")

    def reduce(self, key: str, part, merge):
        return self.baton.reduce(self.index, key, part, merge)


def _current() -> _Tile | None:
    return getattr(_local, "tile", None)


def _sum_parts(parts: list):
    """Element-wise sum of parts that are tensors or tuples of tensors."""
    if isinstance(parts[0], tuple):
        return tuple(sum(p[i] for p in parts) for i in range(len(parts[0])))
    return sum(parts)


def _merge_moments(parts: list[tuple[int, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(count, mean, sum of squared deviations) per tile -> whole-frame (mean, variance) (Chan et al.)."""
    n = sum(c for c, _, _ in parts)
    mean = sum(c * m for c, m, _ in parts) / n
    m2 = sum(d + c * (m - mean) ** 2 for c, m, d in parts)
    return mean, m2 / n


# ---------------------------------------------------------------------------------------- sync points


class SharedGroupNorm(nn.Module):
    """A GroupNorm (``inner``, its weights) that, in a tile thread, normalises with the whole frame's
    per-sample, per-group mean and variance; elsewhere it is ``inner``."""

    def __init__(self, inner: nn.GroupNorm):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        tile = _current()
        if tile is None:
            return self.inner(x)
        gn = self.inner
        n, c, g = x.shape[0], x.shape[1], gn.num_groups
        x4 = x.unflatten(2, tile.hw(x.shape[2])) if x.dim() == 3 else x  # (N, C, h, w); (N, C, h*w) in attention
        own = tile.owned(x4.unflatten(1, (g, c // g)))  # (N, G, C/G, h_o, w_o), a view
        count = own[0, 0].numel()
        if count:
            var, mean = torch.var_mean(own.float(), dim=(2, 3, 4), correction=0)  # 2 x (N, G)
        else:
            var = mean = x.new_zeros(n, g, dtype=torch.float32)
        mean, var = tile.reduce("group_norm", (count, mean, var * count), _merge_moments)  # whole frame, (N, G)
        scale = torch.rsqrt(var + gn.eps).repeat_interleave(c // g, dim=1)  # (N, C)
        shift = -mean.repeat_interleave(c // g, dim=1) * scale
        if gn.affine:
            scale, shift = scale * gn.weight.float(), shift * gn.weight.float() + gn.bias.float()
        y = torch.addcmul(shift[..., None, None], x4, scale[..., None, None])  # (N, C, h, w), fp32
        if not torch.is_autocast_enabled(x.device.type):
            y = y.to(x.dtype)  # autocast runs group_norm in fp32; keep that, else the input's dtype
        return y.flatten(2) if x.dim() == 3 else y


class SharedAttention(nn.Module):
    """A diffusers spatial self-attention (``inner``, its weights) whose keys and values, in a tile thread,
    are those of the whole frame: each tile hands in the group-normed tokens it owns, and its queries
    attend to all of them. Elsewhere it is ``inner``. Follows diffusers' ``AttnProcessor2_0``."""

    def __init__(self, inner: Attention):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        tile, attn = _current(), self.inner
        if tile is None or x.dim() != 4 or args or any(v is not None for v in kwargs.values()):
            return attn(x, *args, **kwargs)
        n, c, h, w = x.shape
        hn = attn.group_norm(x) if attn.group_norm is not None else x  # (N, C, h, w), whole-frame statistics
        own = tile.owned(hn).flatten(2).transpose(1, 2)  # (N, P_own, C)
        frame = tile.reduce("attention", own, lambda parts: torch.cat(parts, dim=1))  # (N, P_frame, C)
        q = attn.to_q(hn.flatten(2).transpose(1, 2))  # (N, h*w, C')
        k, v = attn.to_k(frame), attn.to_v(frame)  # 2 x (N, P_frame, C')
        q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (N, heads, L, C'/heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2).to(q.dtype)  # (N, h*w, C')
        out = attn.to_out[1](attn.to_out[0](out)).transpose(1, 2).reshape(n, c, h, w)
        if attn.residual_connection:
            out = out + x
        return out / attn.rescale_output_factor


class _TileReductions:
    """CAPM's whole-map steps (:class:`sdatc.models.capm.FrameReductions`) for the current tile."""

    def spatial_mean(self, x: Tensor) -> Tensor:
        # x: (N, C, h, w) -> (N, C, 1, 1)
        tile = _current()
        own = tile.owned(x)  # (N, C, h_o, w_o)
        total, count = tile.reduce("mean", (own.float().sum((-2, -1)), own[0, 0].numel()), _sum_parts)
        return (total / count).to(x.dtype)[..., None, None]

    def resize(self, p: Tensor, size: tuple[int, int]) -> Tensor:
        # p: (N, C, S, S) -> (N, C, h, w): rows / columns of the bilinear resize to the frame, separably
        tile = _current()
        s = tile.scale(*size)
        (fh, fw), (oy, ox) = (tile.at(v, s) for v in tile.frame), (tile.at(v, s) for v in tile.box[::2])

        def rows(src: int, dst: int, start: int, n: int) -> Tensor:  # (src, n) weights, like F.interpolate
            eye = torch.eye(src, device=p.device, dtype=p.dtype)[None]  # (1, src, src)
            return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0, :, start:start + n]

        ay, ax = rows(p.shape[-2], fh, oy, size[0]), rows(p.shape[-1], fw, ox, size[1])
        return torch.einsum("ncst,sy,tx->ncyx", p, ay, ax)

    def normalized_gram(self, q: Tensor, k: Tensor, size: tuple[int, int]) -> Tensor:
        # q, k: (N, g, c, h*w) -> (N, g, c, c)
        tile = _current()
        qo, ko = (tile.owned(t.unflatten(-1, size)).flatten(-2).float() for t in (q, k))  # (N, g, c, P_own)
        part = (qo.square().sum(-1), ko.square().sum(-1), qo @ ko.transpose(-2, -1))
        sq, sk, gram = tile.reduce("gram", part, _sum_parts)
        eps = 1e-12  # F.normalize's
        attn = gram / (sq.sqrt().clamp_min(eps)[..., :, None] * sk.sqrt().clamp_min(eps)[..., None, :])
        return attn.to(q.dtype)


def _shareable(attn: nn.Module) -> bool:
    """A diffusers self-attention SharedAttention can run: no spatial / q-k norms, no cross-attention."""
    return (isinstance(attn, Attention) and not attn.is_cross_attention and attn.spatial_norm is None
            and attn.norm_q is None and attn.norm_k is None and attn.norm_cross is None)


@contextlib.contextmanager
def _shared_norms(root: nn.Module) -> Iterator[None]:
    """Within the block, every nn.GroupNorm under ``root`` is a SharedGroupNorm and every plain
    self-attention (the VAE mid block's) a SharedAttention; put back on exit, whatever happens."""
    todo = [(parent, name, child) for parent in list(root.modules()) for name, child in parent.named_children()
            if isinstance(child, nn.GroupNorm) or _shareable(child)]
    done = []
    try:
        for parent, name, child in todo:
            setattr(parent, name, SharedGroupNorm(child) if isinstance(child, nn.GroupNorm) else SharedAttention(child))
            done.append((parent, name, child))
        yield
    finally:
        for parent, name, child in reversed(done):
            setattr(parent, name, child)


# ---------------------------------------------------------------------------------------- driver


def _plan(h: int, w: int, tile: int, overlap: int, align: int) -> list[tuple[Box, Box]] | None:
    """(box, owned region) per tile, in tiled_apply's tile order; None when one tile covers the frame.
    Owned regions split each overlap at its middle, rounded down to ``align``."""
    ys, xs = tile_starts(h, tile, overlap, align), tile_starts(w, tile, overlap, align)
    if len(ys) == 1 and len(xs) == 1:
        return None
    th, tw = min(tile // align * align, h), min(tile // align * align, w)

    def cuts(starts: list[int], t: int, size: int) -> list[int]:
        return [0, *(((b + a + t) // 2) // align * align for a, b in zip(starts, starts[1:])), size]

    cy, cx = cuts(ys, th, h), cuts(xs, tw, w)
    return [((y0, y0 + th, x0, x0 + tw), (cy[i], cy[i + 1], cx[j], cx[j + 1]))
            for i, y0 in enumerate(ys) for j, x0 in enumerate(xs)]


def _thread_state(device: torch.device) -> Callable[[contextlib.ExitStack], None]:
    """The caller's grad / inference mode, autocast and CUDA stream, to enter in a tile thread."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    casts = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def enter(stack: contextlib.ExitStack) -> None:
        stack.enter_context(torch.inference_mode(inference))
        stack.enter_context(torch.set_grad_enabled(grad))
        for d, dtype in casts:
            stack.enter_context(torch.autocast(d, dtype=dtype))
        if stream is not None:
            stack.enter_context(torch.cuda.stream(stream))

    return enter


def _run_tiles(plan: list[tuple[Box, Box]], frame: tuple[int, int], device: torch.device,
               fn: Callable[[Box], object]) -> dict[Box, object]:
    """``fn(box)`` for every tile of ``plan``, advancing together with whole-frame statistics."""
    baton, enter = _Baton(len(plan)), _thread_state(device)

    def job(tile: _Tile) -> Callable[[], object]:
        def run():
            with contextlib.ExitStack() as stack:
                enter(stack)
                stack.enter_context(using_frame_reductions(_TileReductions()))
                _local.tile = tile
                try:
                    return fn(tile.box)
                finally:
                    _local.tile = None
        return run

    outs = baton.run([job(_Tile(k, box, own, frame, baton)) for k, (box, own) in enumerate(plan)])
    return {box: out for (box, _), out in zip(plan, outs)}


def _vae_factor(model) -> int:
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def decode_tiled(model, z: Tensor, feats: dict[int, Tensor] | None, num_frames: int, w: float,
                 tile: int, overlap: int) -> Tensor:
    """``model.decode`` over latent tiles with whole-frame normalisation statistics, Gaussian-blended.

    Args:
        model: an ``sdatc.models.sdatc.SDATC``.
        z: (T, 4, h, w) scaled latents (T = B * num_frames; every tile holds all T frames).
        feats: CFW encoder features by level, (T, C_l, 8h / 2^l, 8w / 2^l), or None.
        num_frames, w: as ``model.decode``.
        tile, overlap: tile size and minimum overlap in latent pixels (``tiling.tile_starts``).

    Returns:
        (T, 3, 8h, 8w) in [-1, 1]; exactly ``model.decode(z, feats, num_frames=..., w=...)`` when one
        tile covers the latent.
    """
    h, w_ = z.shape[-2:]
    plan = _plan(h, w_, tile, overlap, align=1)
    if plan is None:
        return model.decode(z, feats, num_frames=num_frames, w=w)
    f = _vae_factor(model)

    def fn(box: Box) -> Tensor:
        y0, y1, x0, x1 = box
        ft = None if feats is None else {lv: x[..., y0 * s:y1 * s, x0 * s:x1 * s]
                                         for lv, x in feats.items() for s in [f // 2**lv]}
        return model.decode(z[..., y0:y1, x0:x1], ft, num_frames=num_frames, w=w)  # (T, 3, 8th, 8tw)

    with _shared_norms(model.vae.decoder):
        outs = _run_tiles(plan, (h, w_), z.device, fn)
    return tiled_apply(lambda _, box: outs[box], z, tile, overlap)


def encode_tiled(model, img: Tensor, levels, tile: int, overlap: int) -> tuple[Tensor, dict[int, Tensor]]:
    """``model.encode`` over image tiles with whole-frame normalisation statistics, Gaussian-blended.

    Args:
        model: an ``sdatc.models.sdatc.SDATC``.
        img: (T, 3, H, W) in [0, 1], H and W multiples of the VAE factor (8).
        levels: encoder levels whose features to return (a subset of ``model.cfg.cfw_levels``).
        tile, overlap: tile size and minimum overlap in image pixels; tiles are aligned to the VAE factor.

    Returns:
        z (T, 4, H/8, W/8) scaled latents and {level: (T, C_l, H / 2^l, W / 2^l)}; exactly
        ``model.encode(img)`` (its features at ``levels``) when one tile covers the image.
    """
    levels = list(levels)
    h, w = img.shape[-2:]
    f = _vae_factor(model)
    plan = _plan(h, w, tile, overlap, align=f)
    if plan is None:
        z, feats = model.encode(img)
        return z, {lv: feats[lv] for lv in levels}

    def fn(box: Box) -> tuple[Tensor, ...]:
        z, feats = model.encode(img[..., box[0]:box[1], box[2]:box[3]])
        return (z, *(feats[lv] for lv in levels))

    with _shared_norms(model.vae.encoder):
        outs = _run_tiles(plan, (h, w), img.device, fn)
    out = tiled_apply(lambda _, box: outs[box], img, tile, overlap, align=f)
    return out[0], dict(zip(levels, out[1:]))


def tiled_shared(root: nn.Module, fn: Callable[[Tensor], Tensor | tuple[Tensor, ...]], x: Tensor, tile: int,
                 overlap: int, align: int = 1) -> Tensor | tuple[Tensor, ...]:
    """Any VAE forward ``fn(x_tile)`` over tiles of ``x`` (N, C, H, W) with the GroupNorms (and mid attention)
    under ``root`` sharing whole-frame statistics, Gaussian-blended (UltraVSR's encoder and decoder).
    ``fn(x)`` as is when one tile covers ``x``."""
    h, w = x.shape[-2:]
    plan = _plan(h, w, tile, overlap, align=align)
    if plan is None:
        return fn(x)
    with _shared_norms(root):
        outs = _run_tiles(plan, (h, w), x.device, lambda box: fn(x[..., box[0]:box[1], box[2]:box[3]]))
    return tiled_apply(lambda _, box: outs[box], x, tile, overlap, align=align)

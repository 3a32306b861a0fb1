"""Temporal windows over a stream of frames, their blending weights and a streaming blender.

    windows = plan_windows(num_frames, length=5, stride=3)     # [(0, 5), (3, 8), ...]
    blender = WindowBlender(num_frames, windows)
    for k, (start, end) in enumerate(windows):
        out = restore(frames[start:end])                       # (end - start, ...)
        for i, frame in blender.add(k, out):                   # final frames, in order
            write(i, frame)

Blending convention (a tent per window, normalised per frame): frame ``f`` of window ``[s, e)`` has
the raw score ``r = min(f - s + 1, e - f)`` (1 at the window's edge frames, growing by 1 per frame
towards its middle); its weight is ``r`` divided by the sum of the scores of all windows containing
``f``. So a frame seen by one window has weight 1, and across an overlap the weights ramp linearly,
e.g. a 2-frame overlap gives the entering window 1/3 then 2/3. The last window containing a frame
gets ``1 - (sum of the others' weights)``, so in float64, summed in window order, the weights of
every frame add up to exactly 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

Window = tuple[int, int]


def plan_windows(num_frames: int, length: int, stride: int) -> list[Window]:
    """Half-open windows ``[(start, end)]`` of ``length`` frames covering ``[0, num_frames)``.

    Args:
        num_frames: frames in the clip (>= 1).
        length: frames per window (>= 1); one window of all frames when the clip is shorter.
        stride: frames between consecutive starts, in ``[1, length]``. The last window is shifted
            back so that it ends exactly at ``num_frames`` with its full length (its step from the
            previous start may be smaller than ``stride``).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if length < 1:
        raise ValueError(f"window length must be >= 1, got {length}")
    if not 1 <= stride <= length:
        raise ValueError(f"window stride must be in [1, length={length}], got {stride}")
    if num_frames <= length:
        return [(0, num_frames)]
    last = num_frames - length
    starts = list(range(0, last, stride)) + [last]
    return [(s, s + length) for s in starts]


def _check_windows(windows: list[Window], num_frames: int | None = None) -> None:
    if not windows:
        raise ValueError("no windows")
    for k, (s, e) in enumerate(windows):
        if not 0 <= s < e or (num_frames is not None and e > num_frames):
            raise ValueError(f"window {k} = {(s, e)} is empty or outside the clip")
        if k and s <= windows[k - 1][0]:
            raise ValueError(f"window starts must increase, got {windows[k - 1]} then {(s, e)}")


def _score(f: int, window: Window) -> int:
    s, e = window
    return min(f - s + 1, e - f)


def temporal_weights(start: int, end: int, windows: list[Window]) -> Tensor:
    """(end - start,) float64 blending weights of window ``[start, end)`` for its frames.

    Args:
        start, end: the window; must be one of ``windows``.
        windows: all windows of the clip, starts increasing (as from ``plan_windows``).

    For each frame, the weights of all windows containing it sum to 1 (see the module docstring).
    """
    _check_windows(windows)
    if (start, end) not in windows:
        raise ValueError(f"window {(start, end)} is not one of the planned windows")
    near = [w for w in windows if w[0] < end and w[1] > start]  # windows sharing a frame, in order
    out = torch.empty(end - start, dtype=torch.float64)
    for j, f in enumerate(range(start, end)):
        containing = [w for w in near if w[0] <= f < w[1]]
        total = sum(_score(f, w) for w in containing)
        weights = [_score(f, w) / total for w in containing[:-1]]
        weights.append(1.0 - sum(weights))  # the last window takes the remainder: exact sum
        out[j] = weights[containing.index((start, end))]
    return out


class WindowBlender:
    """Blend per-window outputs (e.g. decoded frames or latents) over overlaps and release each frame
    as soon as no later window contains it.

    Frames are released in increasing order. When windows are added in order (as planned by
    ``plan_windows``), at most one window's frames are held at a time.

    Args:
        num_frames: frames in the clip.
        windows: the clip's windows (starts increasing), covering every frame.
    """

    def __init__(self, num_frames: int, windows: list[Window]):
        _check_windows(windows, num_frames)
        self.num_frames, self.windows = num_frames, list(windows)
        self._remaining = [0] * num_frames  # windows not yet added that contain each frame
        for s, e in self.windows:
            for f in range(s, e):
                self._remaining[f] += 1
        missing = [f for f, n in enumerate(self._remaining) if n == 0]
        if missing:
            raise ValueError(f"frames {missing[:5]}{'...' if len(missing) > 5 else ''} are in no window")
        self._acc: dict[int, Tensor] = {}  # frame -> sum of weight * output so far
        self._dtype: dict[int, torch.dtype] = {}
        self._added: set[int] = set()
        self._next = 0  # the next frame to release

    @property
    def num_held(self) -> int:
        """Frames accumulated but not yet released."""
        return len(self._acc)

    def add(self, window_index: int, outputs: Tensor) -> list[tuple[int, Tensor]]:
        """Accumulate one window's outputs; return the frames that are now final.

        Args:
            window_index: index into ``windows``; each window is added once.
            outputs: (T_w, ...) for the window's frames in order.

        Returns:
            ``[(frame_index, blended)]`` in increasing frame order; the blender forgets them.
        """
        if not 0 <= window_index < len(self.windows):
            raise ValueError(f"window index {window_index} out of range [0, {len(self.windows)})")
        if window_index in self._added:
            raise ValueError(f"window {window_index} was already added")
        start, end = self.windows[window_index]
        if outputs.dim() < 1 or outputs.shape[0] != end - start:
            raise ValueError(f"window {window_index} = {(start, end)} needs {end - start} outputs, "
                             f"got shape {tuple(outputs.shape)}")
        self._added.add(window_index)
        weights = temporal_weights(start, end, self.windows).tolist()
        acc_dtype = torch.promote_types(outputs.dtype, torch.float32)
        for j, f in enumerate(range(start, end)):
            term = outputs[j].to(acc_dtype) * weights[j]
            self._acc[f] = self._acc[f] + term if f in self._acc else term
            self._dtype[f] = outputs.dtype
            self._remaining[f] -= 1
        released = []
        while self._next < self.num_frames and self._remaining[self._next] == 0:
            f = self._next
            released.append((f, self._acc.pop(f).to(self._dtype.pop(f))))
            self._next += 1
        return released


class FrameFeed:
    """Reads (h, w, 3) uint8 frames from an iterator as windows ask for them, checks their sizes, and
    forgets the ones no later window needs (memory flat in clip length).

        feed = FrameFeed(reader, num_frames)
        lq = feed.window(start, end)          # (T, 3, h, w) float in [0, 1]
        feed.release(next_start)              # frames before next_start are no longer needed
    """

    def __init__(self, frames, num_frames: int, min_size: int = 8):
        from sdatc.errors import SdatcError

        if num_frames < 1:
            raise SdatcError("the clip has no frames")
        self.source, self.num_frames, self.min_size = iter(frames), num_frames, min_size
        self.cache: dict[int, Tensor] = {}
        self.size: tuple[int, int] | None = None

    def window(self, start: int, end: int) -> Tensor:
        import numpy as np

        from sdatc.errors import SdatcError

        for i in range(start, end):
            if i in self.cache:
                continue
            try:
                frame = next(self.source)
            except StopIteration:
                raise SdatcError(f"the clip ended after {i} frames, {self.num_frames} expected") from None
            if self.size is None:
                self.size = frame.shape[:2]
                if min(self.size) < self.min_size:
                    raise SdatcError(f"frames of {frame.shape[1]}x{frame.shape[0]} are too small "
                                     f"(at least {self.min_size}x{self.min_size} LR pixels)")
            elif frame.shape[:2] != self.size:
                raise SdatcError(f"frame {i} is {frame.shape[1]}x{frame.shape[0]}, earlier frames "
                                 f"{self.size[1]}x{self.size[0]}")
            self.cache[i] = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().div(255)
        return torch.stack([self.cache[i] for i in range(start, end)])  # (T, 3, h, w)

    def release(self, before: int) -> list[int]:
        """Forget frames before ``before``; returns their indices."""
        gone = [i for i in self.cache if i < before]
        for i in gone:
            del self.cache[i]
        return gone

"""Temporal windows: planning, weights summing to 1 per frame, streaming blending with early release."""

import pytest
import torch

from sdatc.pipelines.windows import WindowBlender, plan_windows, temporal_weights

CASES = [(1, 5, 3), (4, 5, 3), (5, 5, 3), (7, 5, 3), (12, 5, 3), (13, 5, 4), (13, 5, 5), (20, 5, 1),
         (6, 1, 1), (9, 4, 2)]


@pytest.mark.parametrize("n,length,stride", CASES)
def test_plan_windows_cover(n, length, stride):
    windows = plan_windows(n, length, stride)
    assert windows[0][0] == 0 and windows[-1][1] == n
    count = [0] * n
    for s, e in windows:
        assert e - s == min(length, n)
        for f in range(s, e):
            count[f] += 1
    assert min(count) >= 1
    starts = [s for s, _ in windows]
    assert all(b - a == stride for a, b in zip(starts[:-2], starts[1:-1]))
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


def test_plan_windows_examples_and_errors():
    assert plan_windows(12, 5, 3) == [(0, 5), (3, 8), (6, 11), (7, 12)]
    assert plan_windows(13, 5, 5) == [(0, 5), (5, 10), (8, 13)]
    assert plan_windows(3, 5, 3) == [(0, 3)]
    for args in [(0, 5, 3), (5, 0, 1), (5, 5, 0), (5, 3, 4)]:
        with pytest.raises(ValueError):
            plan_windows(*args)


@pytest.mark.parametrize("n,length,stride", CASES)
def test_temporal_weights_sum_to_one(n, length, stride):
    windows = plan_windows(n, length, stride)
    per_frame = [[] for _ in range(n)]  # in window order
    for s, e in windows:
        w = temporal_weights(s, e, windows)
        assert w.shape == (e - s,) and (w > 0).all()
        for j, f in enumerate(range(s, e)):
            per_frame[f].append(float(w[j]))
    for f, ws in enumerate(per_frame):
        assert sum(ws) == 1.0, (f, ws)  # exact, summed in window order
        if len(ws) == 1:
            assert ws == [1.0]


def test_temporal_weights_ramp_and_errors():
    windows = [(0, 5), (3, 8)]  # 2-frame overlap: the entering window ramps 1/3, 2/3
    torch.testing.assert_close(temporal_weights(3, 8, windows)[:2], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(temporal_weights(0, 5, windows),
                               torch.tensor([1, 1, 1, 2 / 3, 1 / 3], dtype=torch.float64))
    with pytest.raises(ValueError, match="not one of"):
        temporal_weights(1, 6, windows)


def _f(i):
    """A distinct frame per index, values in [0, 2) like decoded frames or latents."""
    return torch.full((2, 3, 4), i / 20) + torch.arange(24.0).reshape(2, 3, 4) / 24


@pytest.mark.parametrize("n,length,stride", CASES)
def test_blender_streams_every_frame_once(n, length, stride):
    windows = plan_windows(n, length, stride)
    blender = WindowBlender(n, windows)
    got = []
    for k, (s, e) in enumerate(windows):
        released = blender.add(k, torch.stack([_f(i) for i in range(s, e)]))
        assert blender.num_held <= min(length, n)
        got += released
        next_start = windows[k + 1][0] if k + 1 < len(windows) else n
        assert [i for i, _ in got] == list(range(next_start))  # released as early as possible
    assert [i for i, _ in got] == list(range(n))
    for i, frame in got:
        torch.testing.assert_close(frame, _f(i), atol=1e-6, rtol=0)
    assert blender.num_held == 0


def test_blender_blends_overlaps_and_keeps_dtype():
    windows = plan_windows(8, 5, 3)  # (0, 5), (3, 8)
    blender = WindowBlender(8, windows)
    assert [i for i, _ in blender.add(0, torch.zeros(5, 2, dtype=torch.float16))] == [0, 1, 2]
    out = dict(blender.add(1, torch.ones(5, 2, dtype=torch.float16)))
    assert out[3].dtype == torch.float16
    torch.testing.assert_close(out[3].float(), torch.full((2,), 1 / 3), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[4].float(), torch.full((2,), 2 / 3), atol=1e-3, rtol=0)
    assert torch.equal(out[7], torch.ones(2, dtype=torch.float16))


def test_blender_out_of_order_still_releases_in_order():
    windows = plan_windows(12, 5, 3)
    blender = WindowBlender(12, windows)
    assert blender.add(1, torch.stack([_f(i) for i in range(3, 8)])) == []
    assert [i for i, _ in blender.add(0, torch.stack([_f(i) for i in range(0, 5)]))] == [0, 1, 2, 3, 4, 5]


def test_blender_errors():
    windows = plan_windows(8, 5, 3)
    blender = WindowBlender(8, windows)
    with pytest.raises(ValueError, match="needs 5"):
        blender.add(0, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="out of range"):
        blender.add(2, torch.zeros(5, 2))
    blender.add(0, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="already added"):
        blender.add(0, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="in no window"):
        WindowBlender(10, [(0, 5), (6, 10)])
    with pytest.raises(ValueError, match="outside"):
        WindowBlender(8, [(0, 5), (3, 9)])

"""Peak memory of the tiled VAE decode (sdatc/pipelines/tiled_vae.py) and the planner's estimate of it.

In one fresh process (glibc's mmap threshold fixed, so freed tensors leave the resident set), the peak
resident set above the start (VmHWM, reset before each run) of the tiny SDATC's decode of 3 frames at a
24 x 40 latent: untiled, by tiles of 12 latent pixels, by tiles of 4. A forced tiled decode must hold
less than the untiled one and less again with smaller tiles; the planner's estimate (memory.vae_cost)
must cover each measured peak without overstating it more than 3-fold.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdatc.config import load_config
from sdatc.models.sdatc import SDATC, ModelConfig
from sdatc.pipelines.hardware import vae_cost

ROOT = Path(__file__).resolve().parents[2]
FRAMES, LATENT, TILES = 3, (24, 40), (12, 4)

CHILD = f"""
import json, torch
from sdatc.config import load_config
from sdatc.models.sdatc import SDATC, ModelConfig
from sdatc.pipelines.tiled_vae import decode_tiled

def rss(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) * 1024

torch.set_num_threads(1)
model = SDATC.from_config(load_config(ModelConfig, "configs/model/sdatc_tiny.yaml")).eval()
g = torch.Generator().manual_seed(0)
h, w = {LATENT}
z = torch.randn({FRAMES}, 4, h, w, generator=g)
feats = {{1: torch.randn({FRAMES}, 32, 4 * h, 4 * w, generator=g),
          2: torch.randn({FRAMES}, 32, 2 * h, 2 * w, generator=g)}}
peaks = {{}}
with torch.no_grad():
    for tile in (0, *{TILES}):
        open("/proc/self/clear_refs", "w").write("5")
        before = rss("VmRSS")
        out = (decode_tiled(model, z, feats, {FRAMES}, 0.75, tile) if tile
               else model.decode(z, feats, num_frames={FRAMES}, w=0.75))
        peaks[tile] = rss("VmHWM") - before
        del out
print(json.dumps(peaks))
"""


@pytest.fixture(scope="module")
def peaks() -> dict[int, int]:
    """Peak bytes above the start by tile (0: untiled), measured in a fresh process."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    print("peak MB above the start:", {k: round(v / 2**20) for k, v in peaks.items()})
    return peaks


def test_forced_tiles_hold_less_than_untiled_and_less_with_smaller_tiles(peaks):
    untiled, big, small = peaks[0], peaks[TILES[0]], peaks[TILES[1]]
    assert big < 0.8 * untiled, peaks  # well below: not allocator noise
    assert small < big, peaks


def test_the_planner_estimate_covers_what_runs(peaks):
    model = SDATC.from_config(load_config(ModelConfig, "configs/model/sdatc_tiny.yaml"))
    cost = vae_cost(model, "decode")
    for tile, peak in peaks.items():
        need = cost.need(FRAMES, LATENT, FRAMES, tile or None)
        assert 0.9 * peak <= need <= 3 * peak, (tile, need, peak)

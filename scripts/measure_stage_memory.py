"""Measure the activation memory of each inference stage per pixel, to calibrate the tiling planner
(``sdatc/pipelines/memory.py``).

    python scripts/measure_stage_memory.py --config configs/model/sdatc_sd21.yaml --json mem.json
    python scripts/measure_stage_memory.py --config configs/model/ultravsr_tiny.yaml --stages encode decode

Each measurement runs in a fresh process on the CPU in fp32 with glibc's mmap threshold fixed (freed
blocks go back to the system, so the resident set follows the live tensors): build the model (random
weights), reset the peak resident set (VmHWM), run the stage and take the peak minus the resident set
before the run. Two sizes give a slope: bytes per input pixel of one frame (``whole``). For the VAE
stages also (docs/decisions.md A41):

* ``live`` / ``temp``: what every frame of the window holds for the whole call and what one call of the
  frozen blocks adds per frame, from 3 frames run one frame per call (UltraVSR's ``chunk_frames``, SDATC's
  encoder batches): slope(3 frames) = 3 live + temp, slope(1 frame) = live + temp. SDATC's decoder cannot
  split its window (STAM): live = whole, temp = 0.
* ``tiled_live`` / ``tiled_temp``: the same computed by tiles (``sdatc/pipelines/tiled_vae.py``): the
  slope over frame sizes at a fixed tile, and the slope over tile sizes (bytes per pixel of one tile).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

STAGES = {  # stage -> (input channels, the two input sizes, the two tile sizes) in the stage's input pixels
    "dcm": (3, (32, 64), None),
    "encode": (3, (128, 256), (32, 64)),
    "predict": (4, (16, 32), None),
    "decode": (4, (16, 32), (4, 8)),
}


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(config: str, stage: str, size: int, frames: int, chunk: int, tile: int) -> None:
    """One measurement: ``frames`` frames of ``size`` x ``size`` input pixels, ``chunk`` frames per call of the
    frozen blocks (0: all), ``tile`` pixels per tile (0: untiled); prints the peak above the start in KiB."""
    import torch

    from sdatc.config import load_config
    from sdatc.models.ultravsr import UltraVSR, UltraVSRConfig, is_ultravsr_config
    from sdatc.pipelines.tiled_vae import decode_tiled, encode_tiled, tiled_shared
    from sdatc.pipelines.tiling import tiled_batched

    torch.set_num_threads(1)
    uvsr = is_ultravsr_config(config)
    if uvsr:
        model = UltraVSR.from_config(load_config(UltraVSRConfig, config)).eval()
    else:
        from sdatc.models.sdatc import SDATC, ModelConfig

        model = SDATC.from_config(load_config(ModelConfig, config)).eval()
    c, _, _ = STAGES[stage]
    x = torch.rand(frames, c, size, size)
    feats = None
    if stage == "decode" and not uvsr:
        with torch.no_grad():
            _, feats = model.encode(torch.rand(frames, 3, size * 8, size * 8))
    levels = [] if uvsr else sorted(model.cfg.cfw_levels)

    def enc(img):
        z, f = model.encode(img)
        return (z, *(f[lv] for lv in levels))

    def run():
        with torch.no_grad():
            if stage == "dcm":
                model.upscale(x)
            elif stage == "predict":
                model.predict(x, torch.tensor([500]), x)
            elif uvsr and stage == "encode":
                fn = lambda t: model.encode(t, chunk or None)  # noqa: E731
                tiled_shared(model.vae.encoder, fn, x, tile) if tile else fn(x)
            elif uvsr:
                fn = lambda t: model.decode(t, frames, chunk or None)  # noqa: E731
                tiled_shared(model.vae.decoder, fn, x, tile) if tile else fn(x)
            elif stage == "encode":  # as RestorePipeline._encode: tiled, or batches of `chunk` frames
                encode_tiled(model, x, levels, tile) if tile else tiled_batched(enc, (x,), None, 0, chunk or frames)
            else:
                decode_tiled(model, x, feats, frames, 0.75, tile) if tile else model.decode(x, feats, num_frames=frames)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kb("VmRSS")
    run()
    print(json.dumps({"peak_kb": _rss_kb("VmHWM") - before}))


def measure(config: str, stage: str, size: int, frames: int = 1, chunk: int = 0, tile: int = 0) -> int:
    """Peak bytes of one measurement in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--config", config, "--child", stage, str(size), str(frames),
                          str(chunk), str(tile)], capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"] * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/model/sdatc_sd21.yaml")
    p.add_argument("--stages", nargs="*", default=list(STAGES))
    p.add_argument("--json")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.config, args.child[0], *(int(v) for v in args.child[1:]))
        return
    from sdatc.models.ultravsr import is_ultravsr_config

    uvsr = is_ultravsr_config(args.config)
    result = {"config": args.config}
    for stage in args.stages:
        _, (s0, s1), tiles = STAGES[stage]
        area = s1 * s1 - s0 * s0

        def slope(stage=stage, s0=s0, s1=s1, area=area, **kw) -> float:
            return (measure(args.config, stage, s1, **kw) - measure(args.config, stage, s0, **kw)) / area

        r = {"whole": slope()}
        if tiles is not None:
            if stage == "decode" and not uvsr:  # STAM needs the whole window in every call
                r["live"], r["temp"] = r["whole"], 0.0
            else:
                three = slope(frames=3, chunk=1)
                r["live"] = max(0.0, (three - r["whole"]) / 2)
                r["temp"] = r["whole"] - r["live"]
            t0, t1 = tiles
            r["tiled_live"] = slope(tile=t0)
            big = measure(args.config, stage, s1, tile=t1)
            r["tiled_temp"] = max(0.0, (big - measure(args.config, stage, s1, tile=t0)) / (t1 * t1 - t0 * t0))
        result[stage] = r
        print(stage, {k: round(v, 1) for k, v in r.items()}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

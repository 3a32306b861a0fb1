"""Measure the activation memory of each inference stage per pixel, to calibrate the tiling planner
(``sdatc/pipelines/hardware.py``).

    python scripts/measure_stage_memory.py --config configs/model/sdatc_sd21.yaml --json mem.json
    python scripts/measure_stage_memory.py --config configs/model/ultravsr_tiny.yaml --stages encode decode --vae

Each measurement runs in a fresh process on the CPU in fp32 with glibc's mmap threshold fixed (freed
blocks go back to the system, so the resident set follows the live tensors): build the model (random
weights), reset the peak resident set (VmHWM), run the stage and take the peak minus the resident set
before the run. Two sizes give a slope: bytes per input pixel of one frame (``whole``). For the VAE
stages also (docs/decisions.md A41):

* ``live`` / ``temp``: what every frame of the window holds for the whole call and what one call of the
  frozen blocks adds per frame, from 1 and 3 frames run one frame per call (UltraVSR's ``chunk_frames``,
  SDATC's encoder batches): peak(3) = P (3 live + temp), peak(1) = P (live + temp) at P pixels. SDATC's
  decoder cannot split its window (STAM): live = the 3-frame peak per frame, temp = 0.
* ``tiled_live`` / ``tiled_temp``: computed by tiles (``sdatc/pipelines/tiled_vae.py``), 3 frames at two
  tile sizes a < b: peak(b) - peak(a) = 3 (b^2 - a^2) tiled_temp, peak(a) = 3 P tiled_live + 3 a^2 tiled_temp.

These come from one size (``--vae``: 24x40 latent / 192x320 image) in one fresh process per stage, VmHWM
reset before each run (so they include the process's own constant: conservative); the planner's values
(``VAE_COEF``) are these per channel of the widest level, rounded up by about 10 %.
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
    from sdatc.models.dcm_fast import dcm_inference
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
            if stage == "dcm":  # as the pipelines run it
                dcm_inference(model.dcm, x)
            elif stage == "predict":
                model.predict(x, torch.tensor([500]), x)
            elif uvsr and stage == "encode":
                fn = lambda t: model.encode(t, chunk or None)  # noqa: E731
                tiled_shared(model.vae.encoder, fn, x, tile) if tile else fn(x)
            elif uvsr:
                fn = lambda t: model.decode(t, frames, chunk or None)  # noqa: E731
                tiled_shared(model.vae.decoder, fn, x, tile) if tile else fn(x)
            elif stage == "encode":  # as SDATCPipeline._encode: tiled, or batches of `chunk` frames
                encode_tiled(model, x, levels, tile) if tile else tiled_batched(enc, (x,), None, 0, chunk or frames)
            else:
                decode_tiled(model, x, feats, frames, 0.75, tile) if tile else model.decode(x, feats, num_frames=frames)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kb("VmRSS")
    run()
    print(json.dumps({"peak_kb": _rss_kb("VmHWM") - before}))


VAE_SIZE = {"encode": (192, 320), "decode": (24, 40)}  # input pixels of the --vae measurements
VAE_TILES = {"encode": (32, 96), "decode": (4, 12)}


def vae_child(config: str, stage: str) -> None:
    """All of one VAE stage's runs in this process (VmHWM reset before each): prints {run: peak bytes}."""
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
    levels = [] if uvsr else sorted(model.cfg.cfw_levels)
    h, w = VAE_SIZE[stage]
    g = torch.Generator().manual_seed(0)
    peaks = {}

    def run(name: str, frames: int, chunk: int, tile: int) -> None:
        c = 3 if stage == "encode" else 4
        x = torch.rand(frames, c, h, w, generator=g)
        feats = None
        if stage == "decode" and not uvsr:
            feats = {lv: torch.randn(frames, model.vae.config.block_out_channels[lv], h * 8 // 2**lv, w * 8 // 2**lv,
                                     generator=g) for lv in levels}

        def enc(img):
            z, f = model.encode(img)
            return (z, *(f[lv] for lv in levels))

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kb("VmRSS")
        with torch.no_grad():
            if uvsr and stage == "encode":
                fn = lambda t: model.encode(t, chunk or None)  # noqa: E731
                out = tiled_shared(model.vae.encoder, fn, x, tile) if tile else fn(x)
            elif uvsr:
                fn = lambda t: model.decode(t, frames, chunk or None)  # noqa: E731
                out = tiled_shared(model.vae.decoder, fn, x, tile) if tile else fn(x)
            elif stage == "encode":  # as SDATCPipeline._encode: batches of `chunk` frames, each maybe tiled
                out = tiled_batched((lambda t: (lambda z, f: (z, *f.values()))(*encode_tiled(model, t, levels, tile)))
                                    if tile else enc, (x,), None, 0, chunk or frames)
            else:
                out = (decode_tiled(model, x, feats, frames, 0.75, tile) if tile
                       else model.decode(x, feats, num_frames=frames))
        peaks[name] = (_rss_kb("VmHWM") - before) * 1024
        del out

    a, b = VAE_TILES[stage]
    run("warm-up", 1, 1, 0)  # first-call allocations (thread pools, kernels) out of the way
    run("one", 1, 1, 0)
    run("three", 3, 1, 0)
    run("whole", 3, 0, 0)
    run("tile_a", 3, 0, a)
    run("tile_b", 3, 0, b)
    print(json.dumps(peaks))


def vae_coefficients(config: str, stage: str) -> dict[str, float]:
    """live, temp, tiled_live, tiled_temp (bytes per input pixel) of a VAE stage, from :func:`vae_child`."""
    from sdatc.models.ultravsr import is_ultravsr_config

    out = subprocess.run([sys.executable, __file__, "--config", config, "--vae-child", stage], capture_output=True,
                         text=True, check=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"})
    pk = json.loads(out.stdout.strip().splitlines()[-1])
    (h, w), (a, b) = VAE_SIZE[stage], VAE_TILES[stage]
    px = h * w
    if stage == "decode" and not is_ultravsr_config(config):
        live, temp = pk["whole"] / (3 * px), 0.0
    else:
        live = max(0.0, (pk["three"] - pk["one"]) / (2 * px))
        temp = max(0.0, pk["one"] / px - live)
    tiled_temp = max(0.0, (pk["tile_b"] - pk["tile_a"]) / (3 * (min(b, h) * min(b, w) - min(a, h) * min(a, w))))
    tiled_live = max(0.0, (pk["tile_a"] - 3 * min(a, h) * min(a, w) * tiled_temp) / (3 * px))
    return {"peaks": pk, "live": live, "temp": temp, "tiled_live": tiled_live, "tiled_temp": tiled_temp}


def measure(config: str, stage: str, size: int, frames: int = 1, chunk: int = 0, tile: int = 0) -> int:
    """Peak bytes of one measurement in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--config", config, "--child", stage, str(size), str(frames),
                          str(chunk), str(tile)], capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"] * 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/model/sdatc_sd21.yaml",
                   help="model config (default: configs/model/sdatc_sd21.yaml)")
    p.add_argument("--stages", nargs="*", default=list(STAGES), help=f"stages to measure (default: {' '.join(STAGES)})")
    p.add_argument("--json", help="also write the measurements here")
    p.add_argument("--vae", action="store_true", help="the VAE stages' live / temp / tiled coefficients")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--vae-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.config, args.child[0], *(int(v) for v in args.child[1:]))
        return
    if args.vae_child:
        vae_child(args.config, args.vae_child)
        return
    result = {"config": args.config}
    for stage in args.stages:
        _, (s0, s1), tiles = STAGES[stage]
        area = s1 * s1 - s0 * s0

        def slope(stage=stage, s0=s0, s1=s1, area=area, **kw) -> float:
            return (measure(args.config, stage, s1, **kw) - measure(args.config, stage, s0, **kw)) / area

        r = {"whole": slope()} if not (args.vae and tiles is not None) else {}
        if args.vae and tiles is not None:
            r.update(vae_coefficients(args.config, stage))
        result[stage] = r
        print(stage, {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

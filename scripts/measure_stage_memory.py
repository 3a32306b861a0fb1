"""Measure the activation memory of each inference stage per pixel, to calibrate the tiling planner
(``sdatc/pipelines/memory.py``).

    python scripts/measure_stage_memory.py --config configs/model/sdatc_sd21.yaml --json mem.json

Each (stage, size) runs in a fresh process on the CPU in fp32 with glibc's mmap threshold fixed (freed
blocks go back to the system, so the resident set follows the live tensors): build the model (random
weights), reset the peak resident set (VmHWM), run the stage and take the peak minus the resident set
before the run. Two sizes per stage give the slope: bytes per input pixel of one frame.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

STAGES = {  # stage -> (input channels, the two input sizes, the unit the planner scales by)
    "dcm": (3, (32, 64)),
    "encode": (3, (128, 256)),
    "predict": (4, (16, 32)),
    "decode": (4, (16, 32)),
}


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(config: str, stage: str, size: int) -> None:
    import torch

    from sdatc.config import load_config
    from sdatc.models.sdatc import SDATC, ModelConfig

    torch.set_num_threads(1)
    model = SDATC.from_config(load_config(ModelConfig, config)).eval()
    c, _ = STAGES[stage]
    x = torch.rand(1, c, size, size)
    feats = None
    if stage == "decode":
        img = torch.rand(1, 3, size * 8, size * 8)
        with torch.no_grad():
            _, feats = model.encode(img)

    def run():
        with torch.no_grad():
            if stage == "dcm":
                model.upscale(x)
            elif stage == "encode":
                model.encode(x)
            elif stage == "predict":
                model.predict(x, torch.tensor([500]), x)
            else:
                model.decode(x, feats, num_frames=1)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kb("VmRSS")
    run()
    print(json.dumps({"peak_kb": _rss_kb("VmHWM") - before}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/model/sdatc_sd21.yaml")
    p.add_argument("--stages", nargs="*", default=list(STAGES))
    p.add_argument("--json")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.config, args.child[0], int(args.child[1]))
        return
    result = {"config": args.config}
    for stage in args.stages:
        peaks = {}
        for size in STAGES[stage][1]:
            out = subprocess.run([sys.executable, __file__, "--config", args.config, "--child", stage, str(size)],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"})
            peaks[size] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"] * 1024
        (s0, p0), (s1, p1) = sorted(peaks.items())
        result[stage] = {"peak_bytes": peaks, "bytes_per_pixel": (p1 - p0) / (s1 * s1 - s0 * s0)}
        print(stage, result[stage], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

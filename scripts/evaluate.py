"""Score restored clips against GT with any metric of the registry, per clip and mean.

    python scripts/evaluate.py --sr results/mine/crf25 --gt testsets/REDS4/GT --out results.csv
    python scripts/evaluate.py --sr out.mp4 --gt gt_frames/ weights=weights/ --metrics psnr ssim vmaf lpips

Metrics: psnr_y ssim_y (BT.601 Y, BasicSR), lpips dists fid niqe maniqa clipiqa (pyiqa, weights from
the offline weights folder: see scripts/check_weights.py), vmaf (libvmaf), warping_error tlp tof.
A metric whose weights are missing is reported and marked "missing". SR and GT: folders of clip
folders or videos (paired by clip name), or one clip each.
"""

import argparse

from sdatc.config import add_config_arguments, config_from_args
from sdatc.errors import run_cli
from sdatc.evaluation import EvalConfig, evaluate, format_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, "configs/eval/evaluate.yaml")
    p.add_argument("--sr", help="restored clips")
    p.add_argument("--gt", help="ground-truth clips")
    p.add_argument("--metrics", nargs="+", help="metric names (default: psnr_y ssim_y)")
    p.add_argument("--out", help="CSV file for per-clip rows and the mean")
    args = p.parse_args(argv)
    cfg = config_from_args(EvalConfig, args, {"sr": "sr", "gt": "gt", "metrics": "metrics", "out": "out"})
    rows = evaluate(cfg)
    print(format_table(rows))
    if cfg.out:
        print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)

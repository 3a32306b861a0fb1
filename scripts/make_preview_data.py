"""Build the preview model's training and held-out data from media shipped in PyPI wheels.

    pip install --no-deps scikit-image      # only its sample photos are used
    python scripts/make_preview_data.py --out datasets/preview --demo assets/demo.mp4

Writes datasets/preview/train/<clip>/%08d.png (bigbuckbunny frames 0-71 and 9 public-domain / CC0
photos with synthetic camera motion) and datasets/preview/heldout/<clip>/ (bikes, carphone and the
demo segment of bigbuckbunny, never trained on). See sdatc/data/preview_data.py.
"""

import argparse

from sdatc.errors import run_cli


def main(argv=None) -> int:
    from sdatc.data.preview_data import build_preview_data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="datasets/preview", help="output folder (default datasets/preview)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic camera motion (default 0)")
    p.add_argument("--demo", help="also write the demo clip here (assets/demo.mp4)")
    args = p.parse_args(argv)
    if args.demo:
        from sdatc.data.preview_data import make_demo_clip

        print(f"demo clip: {make_demo_clip(args.demo)}")
    clips = build_preview_data(args.out, seed=args.seed)
    print(f"train: {', '.join(clips['train'])}\nheldout: {', '.join(clips['heldout'])}\nin {args.out}/")
    return 0


if __name__ == "__main__":
    run_cli(main)

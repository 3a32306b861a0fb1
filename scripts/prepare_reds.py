"""Regroup the official REDS download for training: train_sharp 000-239 + val_sharp 000-029 as 240-269.

    python scripts/prepare_reds.py --root datasets/REDS --out datasets/REDS/train_sharp_all [--copy]

Then train with data.root=datasets/REDS/train_sharp_all data.clip_list=reds_train (the 266 clips
without REDS4: 000, 011, 015, 020). Links by default (no extra disk); --copy copies the frames.
"""

import argparse

from sdatc.errors import run_cli


def main(argv=None) -> int:
    from sdatc.data.reds import regroup_reds

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder holding train_sharp/ and val_sharp/")
    p.add_argument("--out", required=True, help="new folder for the 270 clips")
    p.add_argument("--copy", action="store_true", help="copy frames instead of linking the clip folders")
    args = p.parse_args(argv)
    plan = regroup_reds(args.root, args.out, copy=args.copy)
    print(f"{len(plan)} clips in {args.out} ({'copied' if args.copy else 'linked'}); "
          f"train with data.root={args.out} data.clip_list=reds_train")
    return 0


if __name__ == "__main__":
    run_cli(main)

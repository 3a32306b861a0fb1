"""Build the compressed x4 test sets (BIx4, x264 CRF mp4s, decoded PNGs, manifest.json).

    python scripts/make_testsets.py --gt-root datasets/REDS4/GT --out testsets/REDS4
    python scripts/make_testsets.py --gt-root clip.mp4 --out testsets/mine --crf 25 --fps 10
    python scripts/make_testsets.py --gt-root datasets/REDS/train_sharp --out testsets/REDS4 clip_list=reds4

GT is a folder of clip folders (frames), a video file, or a folder of videos. See docs/evaluation.md.
"""

import argparse
import sys

from sdatc.config import add_config_arguments, config_from_args, dump_config
from sdatc.data.testsets import TestSetConfig, build_testsets
from sdatc.errors import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, "configs/data/testsets.yaml")
    p.add_argument("--gt-root", help="GT clips: folder of frame folders, a video file or a folder of videos")
    p.add_argument("--out", help="output root")
    p.add_argument("--crf", type=int, nargs="+", help="x264 CRFs (default 15 25 35)")
    p.add_argument("--pix-fmt", choices=["yuv420p", "yuv444p"], help="chroma of the x264 encode (default yuv420p)")
    p.add_argument("--fps", type=float, help="declared frame rate of the encode (default 10)")
    p.add_argument("--max-frames", type=int, help="only the first N frames of each clip")
    args = p.parse_args(argv)
    cfg = config_from_args(TestSetConfig, args, {"gt_root": "gt_root", "out": "out", "crf": "crf", "pix_fmt": "pix_fmt",
                                                 "fps": "fps", "max_frames": "max_frames"})
    print(dump_config(cfg), end="", file=sys.stderr)
    manifest, summary = build_testsets(cfg)
    n = len(manifest["clips"])
    print(f"{cfg.out}: {n} clips ({summary['built']} built, {summary['reused']} reused), CRF {cfg.crf}, "
          f"{manifest['versions'].get('x264')}; manifest {cfg.out}/manifest.json")
    for name, e in manifest["clips"].items():
        rates = ", ".join(f"crf{q} {v['kbps']:.1f} kbit/s" for q, v in e["crf"].items())
        print(f"  {name}: {e['frames']} frames, GT {e['gt_size'][1]}x{e['gt_size'][0]} "
              f"-> LR {e['lr_size'][1]}x{e['lr_size'][0]}; {rates}")
    return 0


if __name__ == "__main__":
    run_cli(main)

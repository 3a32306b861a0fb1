"""Restore compressed clips x4 with SDATC: a video file, a frame folder, or a folder of clips.

    python scripts/infer.py --config configs/infer/sdatc.yaml --input clips/ --output out/ \
        pretrained=weights/stable-diffusion-2-1-base checkpoint=weights/sdatc
    python scripts/infer.py --config configs/infer/tiny.yaml --input clip.mp4 --output out/   # no weights
    accelerate launch --num_processes 8 scripts/infer.py --config ... --input ... --output ...   # clips sharded

Writes OUT/<name>.mp4 (same fps and frame count, 4x size, audio kept) and, with save_frames=true,
OUT/<name>/%08d.png. Existing outputs are skipped unless overwrite=true. Exit status 1 if a clip failed.
"""

import argparse

from sdatc.config import add_config_arguments, config_from_args
from sdatc.errors import run_cli
from sdatc.inference import InferConfig, run, summary
from sdatc.utils import process_state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, "configs/infer/sdatc.yaml")
    p.add_argument("--input", help="video file, frame folder, or folder of clips")
    p.add_argument("--output", help="output folder")
    args = p.parse_args(argv)
    cfg = config_from_args(InferConfig, args, {"input": "input", "output": "output"})
    results = run(cfg)
    if process_state().is_main_process:
        print(summary(results))
        print(f"outputs in {cfg.output}/")
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    run_cli(main)

r"""Restore compressed clips x4: a video file, a frame folder, or a folder of clips.

    python scripts/infer.py --input clips/ --output out/     # built-in preview model (light DCM), no weights to get
    python scripts/infer.py --config configs/infer/sdatc.yaml --input clips/ --output out/ \
        pretrained=weights/stable-diffusion-2-1-base checkpoint=weights/sdatc
    python scripts/infer.py --config configs/infer/tiny.yaml --input clip.mp4 --output out/   # tiny random SDATC
    accelerate launch --num_processes 8 scripts/infer.py --config ... --input ... --output ...   # 8 GPUs
    ACCELERATE_USE_CPU=1 .venv/bin/accelerate launch --multi_gpu --num_processes 2 scripts/infer.py ...  # CPUs

Without --config: configs/infer/sdatc.yaml when $SDATC_SD21_PATH is set, else configs/infer/preview.yaml.
Writes OUT/<name>.mp4 (the same frames at the same times, 4x size; audio, aspect ratio, rotation,
colour tags and bit depth kept) and, with save_frames=true, OUT/<name>/%08d.png. Existing outputs are
skipped unless overwrite=true. Processes take clips one at a time (lock files OUT/.<name>.lock). Exit
status 1 if a clip failed or was left to another run's lock. Settings: docs/usage.md.
"""

import argparse
import sys

from sdatc.config import add_config_arguments, config_from_args
from sdatc.errors import SdatcError, os_reason, run_cli
from sdatc.inference import InferConfig, default_config, exit_status, run, summary
from sdatc.utils import process_report, process_state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, None, "sdatc.yaml with $SDATC_SD21_PATH, else preview.yaml")
    p.add_argument("--input", help="video file, frame folder, or folder of clips")
    p.add_argument("--output", help="output folder")
    args = p.parse_args(argv)
    state = process_state()
    main_process = state.is_main_process
    line, warning = process_report(state)
    if main_process and (state.num_processes > 1 or warning):  # a single process says nothing unless asked for more
        print(line)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if args.config is None:
        args.config = default_config()
        if main_process:
            print(f"config: {args.config} (the default; --config picks another)")
    cfg = config_from_args(InferConfig, args, {"input": "input", "output": "output"})
    try:
        results = run(cfg)
    except OSError as e:  # what the checks could not foresee (a disk gone read-only mid-run): one line naming the file
        raise SdatcError(f"{e.filename or cfg.output}: {os_reason(e)}") from e
    if main_process:
        print(summary(results))
        print(f"outputs in {cfg.output}/")
    return exit_status(results)


if __name__ == "__main__":
    run_cli(main)

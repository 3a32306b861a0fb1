"""Train SDATC (any stage) with accelerate: one process, several GPUs, or several machines.

    python scripts/train.py --config configs/train/tiny_stage1.yaml data.root=DIR output_dir=runs/tiny max_steps=100
    accelerate launch --num_processes 8 scripts/train.py --config configs/train/stage1.yaml \
        data.root=datasets/REDS/train_sharp pretrained=weights/stable-diffusion-2-1-base output_dir=runs/stage1
    accelerate launch --num_machines 2 --machine_rank R --main_process_ip IP --num_processes 16 scripts/train.py ...
    accelerate launch --config_file fsdp.yaml scripts/train.py ...        # FSDP / DeepSpeed via accelerate config

Resumes from the newest complete checkpoint in output_dir with resume=latest (the default of the
stage configs); resume=PATH picks one. Writes output_dir/metrics.jsonl and checkpoint-<step>/.
"""

import argparse
import json

from sdatc.config import add_config_arguments, config_from_args
from sdatc.errors import run_cli


def main(argv=None) -> int:
    from sdatc.training.config import TrainConfig
    from sdatc.training.trainer import train
    from sdatc.utils import process_state

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, "configs/train/tiny_stage1.yaml")
    cfg = config_from_args(TrainConfig, p.parse_args(argv))
    summary = train(cfg)
    if process_state().is_main_process:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)

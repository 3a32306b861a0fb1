r"""Train SDATC (any stage) with accelerate: one process, several GPUs, or several machines.

    python scripts/train.py --config configs/train/tiny_stage1.yaml data.root=DIR output_dir=runs/tiny max_steps=100
    accelerate launch --num_processes 8 scripts/train.py --config configs/train/stage1.yaml \
        data.root=datasets/REDS/train_sharp_all pretrained=weights/stable-diffusion-2-1-base output_dir=runs/stage1
    accelerate launch --num_machines 2 --machine_rank R --main_process_ip IP --num_processes 16 scripts/train.py ...

Processes are data-parallel (DDP); FSDP and DeepSpeed are not supported (never tested). Stage 2
trains on latents sampled by the stage-1 model: write them first with scripts/make_stage2_latents.py
(same config). Resumes from the newest complete checkpoint in output_dir with resume=latest (the
default of the stage configs); resume=PATH picks one. Writes output_dir/metrics.jsonl and
checkpoint-<step>/.
"""

from sdatc.config import run_config_script
from sdatc.errors import run_cli


def main(argv=None) -> int:
    from sdatc.training.config import TrainConfig
    from sdatc.training.trainer import train

    return run_config_script(TrainConfig, "configs/train/tiny_stage1.yaml", __doc__, train, argv)


if __name__ == "__main__":
    run_cli(main)

r"""Sample stage 2's training latents with the trained stage-1 model (run before stage 2).

    python scripts/make_stage2_latents.py --config configs/train/stage2.yaml \
        data.root=datasets/REDS/train_sharp_all pretrained=weights/stable-diffusion-2-1-base \
        init=[runs/stage1/checkpoint-100000] latents.dir=runs/stage2_latents
    accelerate launch --num_processes 8 scripts/make_stage2_latents.py --config ...   # 8 GPUs claim shards

Takes the stage-2 training config itself (model, init = the stage-1 checkpoint, data, latents.*), so
stage 2 then reads exactly these latents. Shards are written under temporary names; a rerun skips
finished ones; a folder made with other settings is refused. Processes (and other runs on the same folder)
claim shards one at a time through lock files; exit status 1 if shards were left to another run's locks.
See sdatc/training/latents.py.
"""

from sdatc.config import run_config_script
from sdatc.errors import run_cli


def summary_line(s: dict) -> str:
    held = f", {s['held_by_others']} left to other runs' locks" if s["held_by_others"] else ""
    return (f"stage-2 latents: {s['shards']} shards in {s['dir']} ({s['written']} written by this process, "
            f"{s['skipped']} there already{held})")


def main(argv=None) -> int:
    from sdatc.training.config import TrainConfig
    from sdatc.training.latents import generate

    summary = {}

    def make(cfg):
        summary.update(generate(cfg), dir=cfg.latents.dir)
        return summary

    code = run_config_script(TrainConfig, "configs/train/stage2.yaml", __doc__, make, argv, line=summary_line)
    return 1 if summary.get("held_by_others") else code


if __name__ == "__main__":
    run_cli(main)

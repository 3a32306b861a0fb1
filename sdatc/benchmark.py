"""Inference benchmark: seconds per output frame, peak memory, denoiser evaluations and FLOPs per
frame (useful and as executed), achieved TFLOP/s and, on a GPU, MFU.

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
from sdatc.models.dcm_fast import dcm_inference
from sdatc.models.report import (
    count_flops,
    count_flops_ultravsr,
    denoise_step_flops,
    flop_counter_mode,
)
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
    """FLOPs of the DCM on one (height, width) LR frame, as the pipelines run it (``dcm_inference``)."""
    param = next(dcm.parameters())
    x = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        dcm_inference(dcm, x)  # the DCM folds its upsampler on the first call (A45): not counted per frame
        with flop_counter_mode() as fc:
            dcm_inference(dcm, x)
    return int(fc.get_total_flops())


# Dense (no structured sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's product datasheets
# (which print the sparse figure; dense is half of it): A100 40/80 GB, SXM and PCIe, 312; H100 SXM 989,
# PCIe 756, NVL 835; H200 (SXM) 989, H200 NVL 835; L40S 362; A10 125; and the Ada Lovelace
# architecture whitepaper for the GeForce RTX 4090: 165 (FP32 accumulate). First match wins.
GPU_BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"H200 NVL", 835.0), (r"H200", 989.0),
    (r"H100 NVL", 835.0), (r"H100 PCIe", 756.0), (r"H100", 989.0),
    (r"A100", 312.0), (r"L40S", 362.0), (r"\bA10\b", 125.0), (r"RTX 4090", 165.0),
]
PEAK_SOURCE_TABLE = "NVIDIA datasheet, dense bf16 (sdatc.benchmark.GPU_BF16_PEAK_TFLOPS)"


def known_bf16_peak(name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU named ``name`` (torch.cuda.get_device_name), or None."""
    import re

    return next((peak for pat, peak in GPU_BF16_PEAK_TFLOPS if re.search(pat, name)), None)


def measure_bf16_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """TFLOP/s of an (n x n) @ (n x n) bf16 matrix product on random data: the mean of ``reps`` timed
    products after three warm-ups (about 0.4 GB of memory at n=8192)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000
    del a, b
    return 2 * n**3 * reps / seconds / 1e12


class DenoiserTimer:
    """A thin wrapper over the denoiser the pipeline calls (``owner.<attr>``: the pipeline's own
    ``denoiser``, possibly compiled, when it keeps one, else ``model.predict``), set as an instance
    attribute and removed by ``close``. While ``on`` it times each call: CUDA events on a GPU (no
    synchronisation per call), the wall clock on the CPU."""

    def __init__(self, owner, attr: str, device: torch.device):
        self.owner, self.attr, self.device, self.on, self.calls = owner, attr, device, False, 0
        self._events: list = []
        self._cpu = 0.0
        self._own = attr in vars(owner)  # an instance attribute already there (restored by close)
        self._saved = vars(owner).get(attr)
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            if not self.on:
                return inner(*args, **kwargs)
            self.calls += 1
            if device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = inner(*args, **kwargs)
                e.record()
                self._events.append((s, e))
                return out
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            self._cpu += time.perf_counter() - t
            return out

        setattr(owner, attr, timed)

    @classmethod
    def for_pipeline(cls, pipe, device: torch.device) -> DenoiserTimer | None:
        if callable(getattr(pipe, "denoiser", None)):
            return cls(pipe, "denoiser", device)
        model = getattr(pipe, "model", None)
        return cls(model, "predict", device) if callable(getattr(model, "predict", None)) else None

    def seconds(self) -> float:
        _sync(self.device)
        return self._cpu + sum(s.elapsed_time(e) for s, e in self._events) / 1000

    def close(self) -> None:
        if self._own:
            setattr(self.owner, self.attr, self._saved)
        else:
            delattr(self.owner, self.attr)


def _warmup_sampler(pipe, cfg: InferConfig, steps: int | None):
    """The sampler for the warm-up window: SDATC with ``steps`` set gets a shorter chain (the same
    shapes, so compiled graphs and allocator pools warm up the same); otherwise the pipeline's own."""
    if steps is None or cfg.mode != "sdatc" or not hasattr(pipe, "sampler"):
        return None
    import dataclasses

    from sdatc.pipelines.sampler import Sampler

    sc = dataclasses.replace(cfg.pipeline.sampler, steps=steps)
    return Sampler(sc, pipe.model.scheduler.alphas_cumprod, pipe.model.prediction_type)


def load_model(cfg: InferConfig, device: torch.device, dtype: torch.dtype):
    """The model as infer.py builds it, in fp32 on the CPU: ``make_pipeline`` casts it once to ``dtype`` and
    moves it to ``device``."""
    return build_model(cfg)


def _warm_up(pipe, cfg: InferConfig, clip: list, warmup_steps: int | None) -> None:
    """Restore one window before timing (first-call costs); with ``warmup_steps`` n > 0 an n-step chain."""
    short, own = _warmup_sampler(pipe, cfg, warmup_steps), getattr(pipe, "sampler", None)
    if short is not None:
        pipe.sampler = short
    try:
        for _ in pipe.stream(clip, len(clip)):
            pass
    finally:
        if short is not None:
            pipe.sampler = own


def _stage_flops(cfg: InferConfig, model, pipe, height: int, width: int) -> tuple[dict, int]:
    """FLOPs per frame of each stage at the untiled frame, and the denoising steps the pipeline runs."""
    if cfg.mode == "bicubic":
        return {"dcm": 0}, 0
    if cfg.mode == "dcm":  # the DCM alone, once per frame
        return {"dcm": dcm_flops(model, height, width)}, 0
    if cfg.mode == "ultravsr":  # one step, no DCM (bicubic x4 is not counted)
        return {"dcm": 0, **count_flops_ultravsr(model.cfg, 4 * height, 4 * width)}, 1
    return count_flops(model.cfg, 4 * height, 4 * width), len(pipe.sampler)


def _timed_run(pipe, clip: list, device: torch.device) -> tuple[int, float, float, float | None, float | None]:
    """Restore ``clip`` once, timed: (frames out, seconds, peak memory MB, CUDA reserved MB, denoiser seconds)."""
    timer = DenoiserTimer.for_pipeline(pipe, device)
    _sync(device)
    reset_peak_memory(device)
    if timer is not None:
        timer.on = True
    t0 = time.perf_counter()
    n_out = sum(1 for _ in pipe.stream(clip, len(clip)))
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_memory_mb(device)
    reserved = torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None
    denoiser_seconds = None
    if timer is not None:
        timer.on = False
        denoiser_seconds = timer.seconds() if timer.calls else None  # None: the timed callable was bypassed
        timer.close()
    return n_out, seconds, peak, reserved, denoiser_seconds


def bench(cfg: InferConfig, height: int, width: int, frames: int, seed: int = 0,
          warmup_steps: int | None = None) -> dict:
    """Restore ``frames`` synthetic LR frames of (height, width) and measure.

    ``warmup_steps``: None warms up on the first window with the configured sampler; 0 skips the warm-up
    (the timing then includes first-call costs such as torch.compile); n > 0 runs the warm-up window
    with an n-step chain (SDATC only; the same shapes as the timed run).

    FLOPs (``*_tflop_per_frame``): ``useful`` is steps x one denoising step on the untiled (padded)
    frame latent; ``denoiser`` is what the pipeline ran: the per-frame step FLOPs at each latent tile
    shape it evaluated, times how often (``pipe.unet_evals``: tile overlaps and window overlaps
    counted); ``executed`` adds the DCM and VAE encoder (once per frame) and the VAE decoder (once per
    window the frame is in), each counted at the untiled frame (their own tile overlaps are not counted).
    """
    device, dtype = pick_device(cfg, process_state())
    model = load_model(cfg, device, dtype)
    pipe = make_pipeline(model, cfg, device, dtype, progress=False)
    rng = np.random.default_rng(seed)
    clip = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(frames)]
    win = cfg.ultravsr.window if cfg.mode == "ultravsr" else cfg.pipeline.window
    if warmup_steps != 0:
        _warm_up(pipe, cfg, clip[: min(frames, win.length)], warmup_steps)
    pipe.unet_calls = 0
    evals = getattr(pipe, "unet_evals", None)
    if evals is not None:
        evals.clear()
    n_out, seconds, peak, reserved, denoiser_seconds = _timed_run(pipe, clip, device)
    windows = plan_windows(frames, win.length, win.stride)
    window_factor = sum(e - s for s, e in windows) / frames  # times each frame is denoised/decoded
    evals = dict(evals or {})
    flops, steps = _stage_flops(cfg, model, pipe, height, width)
    if cfg.mode in ("bicubic", "dcm"):
        window_factor = 1.0  # no windows: each frame once
    per_shape = denoise_step_flops(model.cfg, list(evals)) if evals else {}
    denoiser = sum(n * per_shape[hw] for hw, n in evals.items())  # FLOPs of the timed run, all frames
    useful = steps * flops.get("denoise_step", 0)
    encodes = 1 if cfg.mode == "sdatc" else window_factor  # SDATC keeps each frame's encoding across windows
    stages = {"dcm": flops["dcm"], "vae_encode": flops.get("vae_encode", 0) * encodes,
              "denoise": denoiser / frames, "vae_decode": flops.get("vae_decode", 0) * window_factor}
    executed = sum(stages.values())
    evals_total = sum(evals.values())
    result = {
        "input": [height, width], "output": [4 * height, 4 * width], "frames": frames, "frames_out": n_out,
        "mode": cfg.mode, "seconds_per_frame": seconds / frames, "seconds_total": seconds,
        "peak_memory_mb": peak, "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
        "peak_memory_reserved_mb": reserved,
        "unet_calls_per_frame": evals_total / frames, "unet_batches_per_frame": pipe.unet_calls / frames,
        "unet_evals": {f"{h}x{w}": n for (h, w), n in sorted(evals.items())},
        "steps": steps, "window": to_dict(win), "window_factor": window_factor,
        "tiles_per_frame_step": evals_total / (frames * steps * window_factor) if steps else 0.0,
        "tiling": to_dict(cfg.ultravsr.tiling if cfg.mode == "ultravsr" else cfg.pipeline.tiling),
        "useful_tflop_per_frame": useful / 1e12, "denoiser_tflop_per_frame": denoiser / frames / 1e12,
        "executed_tflop_per_frame": executed / 1e12, "executed_tflop_total": executed * frames / 1e12,
        "executed_tflop_stages_per_frame": {k: v / 1e12 for k, v in stages.items()},
        "denoise_step_tflop_by_tile": {f"{h}x{w}": f / 1e12 for (h, w), f in sorted(per_shape.items())},
        "flops_stages": flops, "flow_guidance": getattr(pipe, "raft", None) is not None,
        "warmup_steps": warmup_steps, "denoiser_seconds": denoiser_seconds,
        "achieved_tflops": executed * frames / seconds / 1e12,
        "denoiser_achieved_tflops": denoiser / denoiser_seconds / 1e12 if denoiser_seconds else None,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or platform.machine()),
        "dtype": str(dtype).replace("torch.", ""),
        "weights_dtype": str(next(model.parameters(), torch.zeros(())).dtype).replace("torch.", ""),
        "compile": bool(getattr(cfg, "compile", False)),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "peak_tflops": None, "peak_source": None, "mfu": None, "denoiser_mfu": None, "matmul_bf16_tflops": None,
        "mfu_vs_matmul": None,
    }
    if device.type == "cuda":
        result.update(mfu_fields(result, device))
    return result


def mfu_fields(result: dict, device: torch.device) -> dict:
    """MFU against the device's dense bf16 peak: the datasheet figure for a known GPU, else a measured
    large bf16 matrix product (which is measured on every GPU and reported as ``matmul_bf16_tflops``)."""
    measured = measure_bf16_matmul_tflops(device)
    known = known_bf16_peak(result["device"])
    peak, source = ((known, PEAK_SOURCE_TABLE) if known
                    else (measured, "measured: 8192^3 bf16 matmul, random data (GPU not in the table)"))
    den = result["denoiser_achieved_tflops"]
    return {"peak_tflops": peak, "peak_source": source, "matmul_bf16_tflops": measured,
            "mfu": result["achieved_tflops"] / peak, "denoiser_mfu": den / peak if den is not None else None,
            "mfu_vs_matmul": result["achieved_tflops"] / measured}


def memory_ratio(script: str, config: str, overrides: list[str], height: int, width: int,
                 short: int = 16, long: int = 64) -> dict:
    """Peak memory of a ``long``-frame clip over a ``short``-frame clip, each in a fresh process."""
    out = {}
    for n in (short, long):
        cmd = [sys.executable, script, "--config", config, "--height", str(height), "--width", str(width),
               "--frames", str(n), "--single", *overrides]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if p.returncode != 0:
            raise RuntimeError("benchmark child failed: "
                               f"{p.stderr.strip().splitlines()[-1] if p.stderr else p.returncode}")
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
        "losses_first_last": [{k: v for k, v in r.items()
                               if k not in ("lr", "sec_per_step", "samples_per_s", "effective_batch")}
                              for r in (log[0], log[-1])],
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }

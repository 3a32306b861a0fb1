"""The pipelines without diffusion: the DCM alone (the built-in preview model, the DCM-only baseline) and
MATLAB bicubic x4, with the same ``stream(frames, num_frames)`` as ``SDATCPipeline`` and ``UltraVSRPipeline``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from sdatc.errors import SdatcError
from sdatc.models.dcm import DCM
from sdatc.models.dcm_fast import dcm_inference
from sdatc.pipelines.config import PipelineConfig, autocast
from sdatc.pipelines.hardware import StagePlan, StagePlanner
from sdatc.pipelines.tiling import tiled_batched


class Bicubic(torch.nn.Module):
    """MATLAB bicubic x``scale`` (``imresize``, float64) as a module: the baseline through infer.py's I/O."""

    def __init__(self, scale: int = 4):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sdatc.data.imresize import imresize

        return imresize(x.double(), scale=self.scale).to(x.dtype)  # (B, 3, h, w) -> (B, 3, sh, sw)


@contextlib.contextmanager
def _intra_op_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DCMPipeline:
    """DCM-only restoration (the built-in preview model, and the DCM-only baseline): frame by frame, no
    diffusion, no colour correction (the DCM is trained with L1 to GT). ``stream`` as the diffusion
    pipelines'. Tiling as there (``tiling.mode``, :func:`plan_stage`): with ``auto``, whole
    frames when a batch fits the memory budget, else tiles of ``tiling.dcm_tile`` LR pixels; ``plans``
    tells what ran.

    On the CPU the frames of a batch are split over ``workers`` threads (default: torch's intra-op
    thread count, at most ``batch``), each running its frames with that count / workers intra-op
    threads (1 on 2 cores): the DCM's many small operations then do not wait for each other at OpenMP
    barriers (on a shared machine a descheduled OpenMP thread stalls every barrier). The next batch
    runs while the caller consumes the current one. A frame's output does not depend on the split
    (up to float rounding).
    """

    unet_calls = 0
    last_drs = None  # as UltraVSRPipeline's: no degradation score here

    def __init__(self, dcm, cfg: PipelineConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, progress: bool = True, batch: int = 4,
                 workers: int | None = None):
        self.dcm, self.cfg, self.device, self.dtype, self.progress = dcm, cfg, torch.device(device), dtype, progress
        self.model = dcm  # what every pipeline calls its network
        self.batch = batch
        threads = torch.get_num_threads()
        if workers is None:
            workers = threads if self.device.type == "cpu" else 1
        self.workers = max(1, min(workers, batch))
        self.worker_threads = max(1, threads // self.workers)  # intra-op threads of each worker
        self._pool: ThreadPoolExecutor | None = None
        self._plan = StagePlanner(dcm, self.device, cfg.tiling, share=self.workers)  # the workers run at once
        self.plans: dict[str, StagePlan] = self._plan.plans
        autocast(self.device, dtype)  # fp16 on the CPU: an error now, not at the first frame

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network on (B, 3, h, w): the DCM's inference path, or the module itself (``Bicubic``)."""
        return dcm_inference(self.dcm, x) if isinstance(self.dcm, DCM) else self.dcm(x)

    def _restore_batch(self, lq: torch.Tensor) -> list[np.ndarray]:
        """(B, 3, h, w) float in [0, 1] -> B frames (4h, 4w, 3) uint8, in the calling thread."""
        t = self.cfg.tiling
        plan = self._plan("dcm", lq, t.dcm_tile)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = tiled_batched(self._forward, (lq,), t.dcm_tile if plan.tiled else None, t.dcm_overlap, plan.batch)
            out = out.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8).cpu()  # (B, 3, 4h, 4w)
        return [y.permute(1, 2, 0).numpy() for y in out]

    def _submit(self, lq: torch.Tensor) -> list[Future]:
        """Start restoring a batch: its frames split over the worker threads, or here without workers."""
        if self.workers < 2:
            done: Future = Future()
            done.set_result(self._restore_batch(lq))
            return [done]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dcm",
                                            initializer=torch.set_num_threads, initargs=(self.worker_threads,))
        return [self._pool.submit(self._restore_batch, part) for part in lq.tensor_split(min(self.workers, len(lq)))]

    def stream(self, frames: Iterable[np.ndarray], num_frames: int, prompt: str | list[str] | None = None,
               source=None) -> Iterator[np.ndarray]:
        """Stream restored frames (4h, 4w, 3) uint8, in order, for ``num_frames`` input frames (``source``:
        not needed; ``prompt``: only the empty one, as the DCM has no text condition).

        The next batch is restored while the caller consumes this one (with workers, decoding and
        encoding overlap the DCM); with workers, torch's intra-op thread count is the workers' until
        the stream ends, then restored.
        """
        if num_frames < 1:
            raise SdatcError("the clip has no frames")
        if prompt:
            raise SdatcError("the DCM has no text condition: prompts need mode sdatc or ultravsr")
        threads = contextlib.nullcontext() if self.workers < 2 else _intra_op_threads(self.worker_threads)
        with threads:
            size, buf, pending = None, [], []
            count = 0
            for frame in frames:
                if size is None:
                    size = frame.shape[:2]
                    if min(size) < 8:
                        raise SdatcError(f"frames of {size[1]}x{size[0]} are too small (at least 8x8 LR pixels)")
                elif frame.shape[:2] != size:
                    raise SdatcError(f"frame {count} is {frame.shape[1]}x{frame.shape[0]}, "
                                     f"earlier frames {size[1]}x{size[0]}")
                buf.append(torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1))
                count += 1
                if len(buf) == self.batch or count == num_frames:
                    lq = torch.stack(buf).to(self.device).float().div(255)  # (B, 3, h, w)
                    buf = []
                    running = self._submit(lq)
                    for job in pending:
                        yield from job.result()
                    pending = running
                if count == num_frames:
                    break
            for job in pending:
                yield from job.result()
        if count < num_frames:
            raise SdatcError(f"the clip ended after {count} frames, {num_frames} expected")

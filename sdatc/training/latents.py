"""Stage-2 training latents sampled by the trained stage-1 model (what CFW is meant to correct).

    python scripts/make_stage2_latents.py --config configs/train/stage2.yaml init=[runs/stage1/checkpoint-N] \
        latents.dir=runs/stage2_latents latents.num_samples=20000
    ds = GeneratedLatents("runs/stage2_latents", model_cfg)     # stage 2 with latent_source: generated

Sample i is training sample i of the data config (GT crop sequence, its x264-degraded LR, the bitrate:
a pure function of ``(data.seed, i)``); its latents come from the frozen stage-1 model as at inference:
DCM -> VAE encoder -> ``q_sample(z_c, start_t)`` -> ``latents.steps`` respaced steps (with flow guidance
when RAFT weights are configured), the noise of frame j seeded by ``(latents.seed, i * T + j)``.
Shards of ``latents.shard_size`` samples (``gt``/``lq`` uint8, ``z`` fp32, ``index``, ``bitrate``) are
written under temporary names; ``manifest.json`` records the stage-1 checkpoint's hash, the steps,
seeds and configs. A rerun skips finished shards; processes claim shards one at a time (lock files
beside them), and no collective waits on another process's work.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from sdatc.config import to_dict
from sdatc.errors import SdatcError
from sdatc.models.sdatc import WEIGHTS_NAME
from sdatc.training.build import build_model, model_config
from sdatc.training.checkpoints import check_init
from sdatc.training.precision import DTYPES, cast_frozen_backbone, resolve_precision
from sdatc.utils import ClipClaim, atomic_path, atomic_write_text, sha256_file, shared_run_id, tqdm

FORMAT = "sdatc-stage2-latents/1"
MANIFEST = "manifest.json"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def plan(cfg) -> dict:
    """What the latents depend on (compared on every rerun and by stage 2): a TrainConfig ``cfg``."""
    lat = cfg.latents
    init = [{"path": str(p), "sha256": sha256_file(_weights_file(p))} for p in cfg.init]
    return {"format": FORMAT, "num_samples": lat.num_samples, "shard_size": lat.shard_size, "steps": lat.steps,
            "seed": lat.seed, "stage1": init, "model": to_dict(model_config(cfg)), "data": to_dict(cfg.data),
            "flow": to_dict(cfg.flow), "mixed_precision": cfg.mixed_precision}


def _weights_file(path) -> Path:
    p = Path(path)
    return p / WEIGHTS_NAME if p.is_dir() else p


def generate(cfg, progress: bool = True) -> dict:
    """Write the missing shards, claimed one at a time with the other processes (lock files); returns this
    process's summary. ``cfg``: the stage-2 TrainConfig."""
    from sdatc.data.datasets import VideoClipDataset, scan_clips
    from sdatc.pipelines.config import PipelineConfig, WindowConfig
    from sdatc.pipelines.sampler import SamplerConfig
    from sdatc.pipelines.sdatc_pipeline import SDATCPipeline
    from sdatc.utils import process_state

    lat = cfg.latents
    if not lat.dir:
        raise SdatcError("latents.dir is not set (latents.dir=DIR: where the shards go)")
    if not cfg.init and not cfg.allow_random_weights:
        raise SdatcError("no stage-1 checkpoint: set init=[runs/stage1/checkpoint-N] (its DCM, guidance encoder "
                         "and UNet CAPM sample the latents)")
    check_init(cfg)  # each init= checkpoint exists and verifies: one line, before any work
    out = Path(lat.dir)
    state = process_state()
    want = plan(cfg)
    manifest = out / MANIFEST
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            raise SdatcError(f"{out} holds latents made with other settings ({', '.join(diff)} differ); "
                             "use another latents.dir or delete that folder")
    elif state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(manifest, json.dumps(want, indent=1))
    run_id = shared_run_id(state)  # the one collective: before any work, once the manifest is written

    n_shards = -(-lat.num_samples // lat.shard_size)
    todo = [k for k in range(n_shards) if not (out / shard_name(k)).is_file()]
    done = {"shards": n_shards, "written": 0, "skipped": n_shards - len(todo), "held_by_others": 0}
    if todo:
        device = state.device
        mp = resolve_precision(cfg.mixed_precision, device.type == "cuda")
        cfg1 = dataclasses.replace(cfg, stage=1)  # the stage-1 modules, loaded from init
        model, _, _, _ = build_model(cfg1)
        model.to(device).eval()
        cast_frozen_backbone(model, DTYPES[mp])
        lr = cfg.data.gt_size // cfg.data.degradation.scale
        if lr % model.pad_multiple:
            need = model.pad_multiple * cfg.data.degradation.scale
            raise SdatcError(f"data.gt_size {cfg.data.gt_size} gives LR crops of {lr} px, which the model pads: "
                             f"the latents would not match the GT (use a gt_size that is a multiple of {need})")
        t = cfg.data.num_frames
        pcfg = PipelineConfig(sampler=SamplerConfig(steps=lat.steps, seed=lat.seed), flow=cfg.flow,
                              window=WindowConfig(length=t, stride=t))
        pipe = SDATCPipeline(model, pcfg, device=device, torch_dtype=DTYPES[mp], progress=False, cast=False)
        ds = VideoClipDataset(cfg.data, scan_clips(cfg.data))
        bar = tqdm(total=len(todo) * lat.shard_size, desc=f"stage-2 latents (rank {state.process_index})",
                   unit="sample", disable=not progress)  # the other processes share the total
        def attempt(k: int) -> ClipClaim | None:
            """Write shard k unless another process has it; the refused claim when another run holds it."""
            if (out / shard_name(k)).is_file():
                return None  # another process wrote it
            claim = ClipClaim(out, shard_name(k), outputs=[out / shard_name(k)], run=run_id)
            if not claim.acquire():
                return claim if claim.holder.get("run") != run_id else None  # this run's others report theirs
            try:
                if not (out / shard_name(k)).is_file():
                    _write_shard(out, k, ds, pipe, cfg, device, bar)
                    done["written"] += 1
            finally:
                claim.release()
            return None

        held = [(k, c) for k in todo if (c := attempt(k)) is not None]
        for k, refused in held:  # tried again at the end, after waiting for a lock that goes stale soon
            refused.wait_until_stale()
            if (again := attempt(k)) is not None:
                done["held_by_others"] += 1
                print(f"shard {k}: left to another process ({again.describe_holder()} holds its lock); rerun when "
                      "it finishes")
        bar.close()
    if state.num_processes > 1:  # each process reports its own shards: no collective waits on another's work
        print(f"stage-2 latents, rank {state.process_index}: {done['written']} shards written")
    return done


def _write_shard(out: Path, k: int, ds, pipe, cfg, device, bar) -> None:
    """Sample and write shard ``k`` (samples k * shard_size ...) under a temporary name."""
    import numpy as np

    lat, t = cfg.latents, cfg.data.num_frames
    rows = []
    for i in range(k * lat.shard_size, min((k + 1) * lat.shard_size, lat.num_samples)):
        item = ds[i]
        z = pipe.sample_window(item["lq"].to(device), first_frame=i * t)  # (T, 4, H/8, W/8)
        rows.append((item, z.float().cpu()))
        bar.update(1)
    tensors = {
        "gt": torch.stack([_u8(r["gt"]) for r, _ in rows]),  # (S, T, 3, H, W) uint8
        "lq": torch.stack([_u8(r["lq"]) for r, _ in rows]),  # (S, T, 3, h, w) uint8
        "z": torch.stack([z for _, z in rows]).contiguous(),  # (S, T, 4, H/8, W/8)
        "index": torch.tensor([r["index"] for r, _ in rows]),
        "bitrate": torch.tensor(np.array([r["bitrate"] for r, _ in rows], dtype=np.float64)),
    }
    with atomic_path(out / shard_name(k)) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8).contiguous()


def generated_latents(cfg, data_cfg) -> GeneratedLatents:
    """Stage 2's samples with latents of the stage-1 model, checked against this run's model and init."""
    if not cfg.latents.dir:
        raise SdatcError("latent_source=generated needs latents.dir: write the stage-1 model's latents first with "
                         "scripts/make_stage2_latents.py --config <this config> latents.dir=DIR (or set "
                         "latent_source=gt_noise|stage1_x0, cheaper proxies)")
    want = plan(cfg)
    return GeneratedLatents(cfg.latents.dir, {k: want[k] for k in ("stage1", "model")}, data_cfg)


class GeneratedLatents(Dataset):
    """Index -> {"gt", "lq" (float in [0, 1]), "z", "index", ...}; ``len`` = the number of samples.
    Indices past the end wrap around (epochs), so the trainer's sample position works unchanged."""

    def __init__(self, folder: str | Path, expect: dict | None = None, data_cfg=None):
        self.folder = Path(folder)
        self.cfg = data_cfg  # the run's TrainDataConfig: loader workers and seed (make_loader)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise SdatcError(f"no stage-2 latents in {self.folder} (no {MANIFEST}); write them with "
                             "scripts/make_stage2_latents.py, or set latent_source=gt_noise|stage1_x0")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise SdatcError(f"{manifest} is not a manifest of sdatc stage-2 latents")
        for key, value in (expect or {}).items():
            if self.manifest.get(key) != value:
                raise SdatcError(f"the latents in {self.folder} were made with another {key} than this run's; "
                                 "regenerate them with scripts/make_stage2_latents.py")
        n, size = self.manifest["num_samples"], self.manifest["shard_size"]
        missing = [k for k in range(-(-n // size)) if not (self.folder / shard_name(k)).is_file()]
        if missing:
            raise SdatcError(f"the latents in {self.folder} are incomplete ({len(missing)} shards missing, e.g. "
                             f"{shard_name(missing[0])}); rerun scripts/make_stage2_latents.py to finish them")
        self.num_samples, self.shard_size = n, size
        self._cache: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        i = index % self.num_samples
        k, j = divmod(i, self.shard_size)
        if self._cache is None or self._cache[0] != k:
            self._cache = (k, load_file(str(self.folder / shard_name(k))))
        s = self._cache[1]
        return {"gt": s["gt"][j].float().div(255), "lq": s["lq"][j].float().div(255), "z": s["z"][j],
                "index": index, "start": 0, "bitrate": float(s["bitrate"][j]), "clip": f"sample-{int(s['index'][j])}"}

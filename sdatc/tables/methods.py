"""Restore a test set with one method: the built-in bicubic baseline or an inference config.

Outputs: ``<results>/<method>/<set>/crf<q>/<clip>/%08d.png`` (same count as the GT, 4x the LR).
Inference configs run through ``sdatc.inference.run`` with ``save_frames=true`` (which also writes
``<clip>.mp4`` beside the frames); finished clips are skipped on a rerun by both paths.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdatc.baselines import bicubic_upscale_clip
from sdatc.config import load_config, resolve_config_path, to_dict
from sdatc.errors import SdatcError
from sdatc.tables.config import MethodConfig
from sdatc.weights import RAFT_FILE, SDATC_FILES, sd21_dir


class MethodSkipped(SdatcError):
    """A method that cannot run here at all (config or weights missing): skipped with this message."""


@dataclasses.dataclass
class Method:
    """A method ready to run; ``infer`` is its resolved InferConfig (None for the bicubic baseline)."""

    name: str
    cfg: MethodConfig
    infer: object | None = None

    def describe(self) -> dict:
        d = {"kind": self.cfg.builtin or "infer", "label": self.cfg.label or self.name, "paper": self.cfg.paper}
        if self.infer is not None:
            resolved = to_dict(self.infer)
            d.update(infer_config=self.cfg.infer_config, overrides=self.cfg.overrides, resolved=resolved,
                     seed=resolved["pipeline"]["sampler"]["seed"], steps=resolved["pipeline"]["sampler"]["steps"])
        return d


def prepare(name: str, cfg: MethodConfig, weights: Path, extra: list[str] = ()) -> Method:
    """Load a method's InferConfig (MethodSkipped when its config file is not there).

    From the weights folder, when the config and overrides leave them unset: SD 2.1-base
    (``pretrained=``), RAFT (``pipeline.flow.raft_weights=``) and ``checkpoint=<weights>/<checkpoint_dir>``.
    """
    if cfg.builtin:
        return Method(name, cfg)
    from sdatc.inference import InferConfig

    path = resolve_config_path(cfg.infer_config)
    if not path.is_file():
        raise MethodSkipped(f"method {name}: skipped, its inference config {cfg.infer_config} is not there")
    overrides = [*cfg.overrides, *extra]
    infer = load_config(InferConfig, path, overrides)
    auto = []
    if infer.pretrained is None and (sd21_dir(weights) / "unet").is_dir():
        auto.append(f"pretrained={sd21_dir(weights)}")
    if infer.pipeline.flow.raft_weights is None and RAFT_FILE.path(weights).is_file():
        auto.append(f"pipeline.flow.raft_weights={RAFT_FILE.path(weights)}")
    ckpt = weights / cfg.checkpoint_dir if cfg.checkpoint_dir else None
    if infer.checkpoint is None and ckpt is not None and (ckpt / SDATC_FILES[0]).is_file():
        auto.append(f"checkpoint={ckpt}")
    if auto:
        infer = load_config(InferConfig, path, [*overrides, *auto])
    return Method(name, cfg, infer)


def restore(method: Method, lr_root: Path, out: Path, clips: list[str], log=print) -> dict[str, str]:
    """Restore the ``clips`` of ``lr_root`` (frame folders) that have no ``out/<clip>/`` yet.

    Returns {clip: error} for clips that failed; raises MethodSkipped when the method cannot run
    at all (e.g. its weights are missing). An existing output folder is never redone here (its
    frame count is checked when it is scored).
    """
    todo = [c for c in clips if not (out / c).is_dir()]
    if not todo:
        return {}
    if method.infer is None:
        for c in todo:
            bicubic_upscale_clip(lr_root / c, out / c)
        return {}
    return _infer(method, lr_root, out, todo, log)


def _infer(method: Method, lr_root: Path, out: Path, todo: list[str], log) -> dict[str, str]:
    from sdatc.inference import run

    cfg = dataclasses.replace(method.infer, input=str(lr_root), output=str(out), save_frames=True)
    try:
        results = run(cfg)
    except SdatcError as e:  # model cannot be built here: skip the method with this reason
        raise MethodSkipped(f"method {method.name}: skipped, {e}") from None
    return {r["clip"]: r.get("error", "failed") for r in results if r["status"] == "failed" and r["clip"] in todo}

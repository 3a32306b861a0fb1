"""Training checkpoints on disk: the run's position, finding and checking the one to resume from,
and writing one atomically (a hidden temporary folder renamed when complete).

Each checkpoint ends with ``checksums.json`` (size and sha256 of every file, written last, before the
rename). A resume verifies it: ``resume=latest`` takes the newest checkpoint that verifies, naming each
damaged one it skips; ``resume=<path>`` that does not verify is an error. A checkpoint without the manifest
(written before sdatc checked checkpoints) resumes unverified, with a note, if its files are all there.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from safetensors.torch import save_file

from sdatc.config import REPO_ROOT, dump_config, load_config, to_dict
from sdatc.errors import SdatcError
from sdatc.models.saving import (
    CHECKSUMS_NAME,
    CONFIG_NAME,
    checksum_problem,
    verify_weights,
    write_checksums,
)
from sdatc.models.sdatc import FORMAT, WEIGHTS_NAME
from sdatc.training.build import model_config
from sdatc.training.config import TrainConfig
from sdatc.utils import atomic_write_text

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class TrainState:
    """Step and data position (samples consumed by all processes), saved with every checkpoint."""

    def __init__(self):
        self.step, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.position = int(state["step"]), int(state["position"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders, oldest first (temporary folders are ignored)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def checkpoint_problem(path: Path, cfg: TrainConfig) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed from (one phrase), or None when it verifies.
    Without ``checksums.json`` only the presence of its files is checked (``"unverified"`` is not a problem)."""
    why = checksum_problem(path)
    if why != f"no {CHECKSUMS_NAME}":
        return why
    needed = ["train_config.yaml", CONFIG_NAME, weights_name(cfg)[0], "optimizer.bin", "random_states_0.pkl"]
    missing = [n for n in needed if not (path / n).is_file()]
    return f"{', '.join(missing)} missing (and no {CHECKSUMS_NAME})" if missing else None


def check_init(cfg: TrainConfig) -> None:
    """Every ``init=`` checkpoint exists, holds this run's weights file and matches its checksums (one-line errors)."""
    name = weights_name(cfg)[0]
    for item in cfg.init:
        path = Path(item)
        file = path / name if path.is_dir() else path
        if not file.is_file():
            where = f"{path} has no {name}" if path.is_dir() else f"{path} does not exist"
            raise SdatcError(f"init checkpoint not found: {where} (init= takes checkpoint-<step> folders with {name}, "
                             "or the files; train the previous stage first, see docs/training.md)")
        verify_weights(file)


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from, verified and checked against this config before any compute
    (the ``init=`` checkpoints too)."""
    check_init(cfg)
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        found = list_checkpoints(cfg.output_dir)
        if not found:
            print(f"resume=latest: no checkpoint in {cfg.output_dir}, starting a new run")
            return None
        bad = []
        for path in reversed(found):
            why = checkpoint_problem(path, cfg)
            if why is None:
                break
            bad.append(f"{path.name}: {why}")
            print(f"resume=latest: skipping damaged checkpoint {path}: {why}")
        else:
            raise SdatcError(f"resume=latest: no checkpoint in {cfg.output_dir} verifies ({'; '.join(bad)}); "
                             "move them away to start a new run")
        if bad:
            print(f"resume=latest: falling back to {path}, the newest checkpoint that verifies")
    else:
        path = Path(cfg.resume)
        if not path.is_dir():
            raise SdatcError(f"resume checkpoint not found: {path} (a checkpoint-<step> folder, or resume=latest)")
        if (path / "train_config.yaml").is_file() or (path / CHECKSUMS_NAME).is_file():
            why = checkpoint_problem(path, cfg)
            if why is not None:
                raise SdatcError(f"resume checkpoint {path} is damaged: {why} (resume=latest takes the newest "
                                 "checkpoint that verifies)")
    saved = path / "train_config.yaml"
    if not saved.is_file():
        raise SdatcError(f"{path} is not a training checkpoint of sdatc (no train_config.yaml)")
    if not (path / CHECKSUMS_NAME).is_file():
        print(f"note: {path} has no {CHECKSUMS_NAME} (written before sdatc checked checkpoints): resuming unverified")
    old = load_config(TrainConfig, saved)
    mine = model_config(cfg)
    if old.system != cfg.system:
        raise SdatcError(f"checkpoint {path} comes from a {old.system} run, this run is {cfg.system}")
    theirs = load_config(type(mine), path / CONFIG_NAME)
    if old.stage != cfg.stage or to_dict(theirs) != to_dict(mine):
        what = "stage" if old.stage != cfg.stage else "model config"
        raise SdatcError(f"checkpoint {path} comes from another config ({what} differs: stage {old.stage}, "
                         f"model {old.model}); resume it with its own train_config.yaml")
    return path


def load_checkpoint(acc, path: Path) -> None:
    """``acc.load_state`` of a resolved checkpoint; a file that does not load is a one-line error."""
    try:
        acc.load_state(str(path))
    except SdatcError:
        raise
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise SdatcError(f"cannot resume from {path}: {type(e).__name__}: {first} (resume=<an older "
                         "checkpoint-<step>>, or move this one away and use resume=latest)") from None


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def weights_name(cfg: TrainConfig) -> tuple[str, str]:
    """(file name, format) of the trainable weights a checkpoint of this run holds."""
    if cfg.system == "ultravsr":
        from sdatc.models import ultravsr

        return ultravsr.WEIGHTS_NAME, ultravsr.FORMAT
    return WEIGHTS_NAME, FORMAT


def save_checkpoint(acc, cfg: TrainConfig, mcfg, step: int, out: Path, trainable_state, ema, params) -> Path:
    """Full state into a temporary folder, renamed to ``checkpoint-<step>`` when complete."""
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
    name, fmt = weights_name(cfg)
    if acc.is_main_process:
        save_file(trainable_state(), str(tmp / name), metadata={"format": fmt, "step": str(step)})
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
            (tmp / "ema").mkdir(exist_ok=True)
            save_file(trainable_state(), str(tmp / "ema" / name), metadata={"format": fmt, "step": str(step)})
            dump_config(mcfg, tmp / "ema" / CONFIG_NAME)
            write_checksums(tmp / "ema")  # ema/ copied alone (e.g. as a release) stays verifiable
            ema.restore(params)
        dump_config(mcfg, tmp / CONFIG_NAME)
        dump_config(cfg, tmp / "train_config.yaml")
        atomic_write_text(tmp / "info.json", json.dumps({"step": step, "git": _git_revision(), "stage": cfg.stage,
                                                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        write_checksums(tmp)  # last: every process's files are written (the barrier above)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if cfg.checkpoints_total_limit is not None:
            for old in list_checkpoints(out)[: -cfg.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the log lines up to ``step`` (those after it were written after the checkpoint a run resumes
    from; a new run, ``step`` 0, starts the log afresh). Lines that do not parse (a torn last line from a
    kill) are dropped; one note line says what was dropped."""
    if not path.is_file():
        return
    keep, torn, later = [], 0, 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_step = int(row.get("step", 0))
        except (ValueError, TypeError, AttributeError):
            torn += 1
            continue
        if row_step <= step:
            keep.append(line)
        else:
            later += 1
    if torn or later:
        parts = [f"{later} line(s) after step {step}"] if later else []
        parts += [f"{torn} unreadable line(s)"] if torn else []
        print(f"note: {path}: dropped {' and '.join(parts)}")
    atomic_write_text(path, "".join(line + "\n" for line in keep))

"""The model a training run trains: its config, the network with only its new modules trainable, and the
weights it starts from (``init=`` checkpoints, a SwinIR checkpoint for the DCM, cubic-x4 DCM init).

    model, mcfg, modules, notes = build_model(cfg)   # a DCM (stage 0), SDATC (stages 1-2) or UltraVSR
    init_modules(modules, ["runs/stage1/checkpoint-1000"], model)   # strictly, module by module
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sdatc.config import load_config
from sdatc.errors import SdatcError
from sdatc.models.backbone import ENV_SD21, SD21_HELP, resolve_pretrained
from sdatc.models.dcm import DCM, init_as_interpolation, load_swinir_checkpoint
from sdatc.models.sdatc import SDATC, WEIGHTS_NAME, ModelConfig
from sdatc.models.ultravsr import WEIGHTS_NAME as ULTRAVSR_WEIGHTS
from sdatc.models.ultravsr import UltraVSR, UltraVSRConfig


def model_config(cfg) -> ModelConfig | UltraVSRConfig:
    """The run's model config (``cfg``: a TrainConfig): a ModelConfig (SDATC) or, with ``system: ultravsr``,
    an UltraVSRConfig."""
    overrides = list(cfg.model_overrides) + ([f"backbone.pretrained={cfg.pretrained}"] if cfg.pretrained else [])
    return load_config(UltraVSRConfig if cfg.system == "ultravsr" else ModelConfig, cfg.model, overrides)


def _read_weights(path: str | Path, name: str = WEIGHTS_NAME) -> tuple[dict[str, torch.Tensor], str]:
    path = Path(path)
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise SdatcError(f"init checkpoint not found: {file} (a folder with {name}, e.g. a checkpoint-<step>, "
                         "or the file)")
    return load_file(str(file)), str(file)


def init_modules(modules: dict[str, torch.nn.Module], paths: list[str],
                 model: torch.nn.Module | None = None) -> list[str]:
    """Load each listed checkpoint into the new modules it holds, strictly per module; returns what was loaded."""
    loaded = []
    for path in paths:
        if isinstance(model, UltraVSR):  # one strict state for all groups
            state, where = _read_weights(path, ULTRAVSR_WEIGHTS)
            model.load_trainable_state_dict(state, where)
            loaded.append(f"{', '.join(modules)} <- {where}")
            continue
        state, where = _read_weights(path)
        if isinstance(model, SDATC):
            groups = model.group_state_dicts(state)
        else:  # the stage-0 DCM: keys dcm.*
            groups = {}
            for k, v in state.items():
                if not k.startswith("_"):
                    name, _, rest = k.partition(".")
                    groups.setdefault(name, {})[rest] = v
        unknown = [n for n in groups if n not in modules]
        if unknown and not any(n in modules for n in groups):
            raise SdatcError(f"{where} holds no module of this model (it has {', '.join(groups)}; the model has "
                             f"{', '.join(modules)})")
        for name, sd in groups.items():
            if name not in modules:
                continue  # e.g. a stage-1 checkpoint's decoder modules when this model has them switched off
            result = modules[name].load_state_dict(sd, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise SdatcError(f"{where}: module {name} does not match ({len(result.missing_keys)} missing, e.g. "
                                 f"{result.missing_keys[:3]}; {len(result.unexpected_keys)} unexpected, e.g. "
                                 f"{result.unexpected_keys[:3]})")
            loaded.append(f"{name} <- {where}")
    return loaded


def build_model(cfg):
    """The model of the run (``cfg``: a TrainConfig; a DCM for stage 0, SDATC or UltraVSR otherwise) with only
    the modules it trains trainable. Returns (model, its config, its new modules by name, init notes)."""
    mcfg = model_config(cfg)
    if cfg.system == "sdatc" and cfg.stage == 0:
        model = DCM(mcfg.dcm)
        modules = {"dcm": model}
    else:
        if resolve_pretrained(mcfg.backbone) is None and not cfg.allow_random_weights:
            raise SdatcError(f"no SD 2.1 weights: set pretrained=PATH or ${ENV_SD21} ({SD21_HELP}); "
                             "allow_random_weights=true trains on a random backbone, for smoke runs (with "
                             "configs/train/tiny_stage1.yaml: seconds on a CPU)")
        model = (UltraVSR if cfg.system == "ultravsr" else SDATC).from_config(mcfg)
        modules = model.new_modules()
        missing = [n for n in cfg.trainable if n not in modules]
        if missing:
            what = "UltraVSR" if cfg.system == "ultravsr" else f"stage {cfg.stage}"
            raise SdatcError(f"{what} trains {', '.join(cfg.trainable)} but the model config switches "
                             f"off {', '.join(missing)} (enabled.*)")
    if cfg.dcm_init == "interpolation" and "dcm" in modules:
        init_as_interpolation(modules["dcm"])
    notes = init_modules(modules, cfg.init, model)
    if cfg.swinir_init:
        load_swinir_checkpoint(modules["dcm"], cfg.swinir_init)
        notes.append(f"dcm <- {cfg.swinir_init} (SwinIR)")
    model.requires_grad_(False)
    for name in cfg.trainable:
        modules[name].requires_grad_(True)
    return model, mcfg, modules, notes

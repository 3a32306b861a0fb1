"""The tiny configs are the configs users run, at tiny size: each names its full config as ``base:`` and
changes only keys of the size allowlist below. Feature flags (gradient checkpointing, EMA, precision, flow,
GAN, validation, latent source, teacher, DRS, tiling mode, colour fix, ...) are therefore the full configs'
own in every test that uses a tiny config. A test that cannot afford a feature switches it off in one
named place (tests/conftest.py, with the reason), never in a config file (docs/decisions.md)."""

import dataclasses
import fnmatch

import pytest

from sdatc.config import REPO_ROOT, _read_one, load_config, to_dict

CONFIGS = REPO_ROOT / "configs"

# Every tiny config and the full config it must inherit from (a new tiny config must be added here).
TINY_BASES = {
    "train/tiny_stage0.yaml": "train/stage0.yaml",
    "train/tiny_stage1.yaml": "train/stage1.yaml",
    "train/tiny_stage2.yaml": "train/stage2.yaml",
    "train/tiny_ultravsr.yaml": "train/ultravsr.yaml",
    "infer/tiny.yaml": "infer/sdatc.yaml",
    "infer/ultravsr_tiny.yaml": "infer/ultravsr.yaml",
    "model/sdatc_tiny.yaml": "model/sdatc_sd21.yaml",
    "model/ultravsr_tiny.yaml": "model/ultravsr_sd21.yaml",
}

# The keys a tiny config may change (dotted paths, fnmatch patterns), by config folder. Each is a size,
# a path or the random-weights switch of a tiny random backbone; nothing here turns a feature on or off.
SIZE_KEYS = {
    "train": [
        "model",                      # the tiny model config (configs/model/*_tiny.yaml), checked below
        "allow_random_weights",       # the tiny backbone has no pretrained weights: random by design
        "pretrained",                 # (same: no SD 2.1 folder for the tiny backbone)
        "loss.lpips_pretrained_backbone",  # LPIPS' AlexNet weights are not on CI machines: random trunk
        "data.root", "data.clip_list", "data.exclude",  # dataset paths: the test clips, not REDS names
        "val.root", "val.clip", "output_dir", "latents.dir",  # paths
        "data.gt_size", "val.gt_size",  # crop size
        "data.num_frames", "val.num_frames",  # frames per clip
        "data.num_workers",           # loader workers (CI has 2 cores)
        "batch_size", "grad_accum",   # batch (clips per step = batch_size x grad_accum)
        "latents.num_samples", "latents.shard_size",  # size of the stage-2 latent set written before a run
        "max_steps", "checkpoint_every", "val.every",  # run length in steps
        "optim.warmup_steps",         # steps: a 500-step warmup does not end in a 100-step run
        "loss.gan_start_step",        # steps: the GAN starts inside a short run (else it is never run)
        "val.steps", "latents.steps",  # sampling steps
    ],
    "infer": [
        "model_config",               # the tiny model config, checked below
        "allow_random_weights",       # the tiny model is random: no weights
        "input", "output",            # paths
        "pipeline.sampler.steps",     # sampling steps
        "pipeline.tiling.*_tile", "pipeline.tiling.*_overlap",  # tile sizes for tiny frames (not the mode)
        "ultravsr.tiling.*_tile", "ultravsr.tiling.*_overlap",
        "pipeline.window.length", "pipeline.window.stride",  # frames per window
        "ultravsr.window.length", "ultravsr.window.stride",
    ],
    "model": [
        # widths and depths of SD's parts (numbers of levels with their block types, channels, groups and
        # heads that must divide the widths, the latent/pixel sample size of the random backbone)
        "backbone.unet.sample_size", "backbone.unet.layers_per_block", "backbone.unet.block_out_channels",
        "backbone.unet.down_block_types", "backbone.unet.up_block_types", "backbone.unet.cross_attention_dim",
        "backbone.unet.attention_head_dim", "backbone.unet.norm_num_groups",
        "backbone.vae.layers_per_block", "backbone.vae.block_out_channels", "backbone.vae.norm_num_groups",
        "backbone.vae.sample_size",
        # the text tower's size; bos/eos are the last ids of its (smaller) vocabulary
        "backbone.text_encoder.vocab_size", "backbone.text_encoder.hidden_size",
        "backbone.text_encoder.intermediate_size", "backbone.text_encoder.num_hidden_layers",
        "backbone.text_encoder.num_attention_heads", "backbone.text_encoder.projection_dim",
        "backbone.text_encoder.bos_token_id", "backbone.text_encoder.eos_token_id",
        # widths and depths of the new modules
        "dcm.embed_dim", "dcm.depths", "dcm.num_heads", "dcm.num_feat",
        "guidance.base_channels", "guidance.channel_mult", "guidance.layers_per_block", "guidance.attention_levels",
        "guidance.num_heads", "guidance.norm_num_groups",
        "capm.prompt_dim", "capm.prompt_size", "capm.max_width", "capm.cnn_width", "capm.num_heads",
        "stam.head_dim", "cfw.growth", "cfw.groups",
    ],
}


def _classes():
    from sdatc.inference import InferConfig
    from sdatc.models.sdatc import ModelConfig
    from sdatc.models.ultravsr import UltraVSRConfig
    from sdatc.training.config import TrainConfig

    return {"train": TrainConfig, "infer": InferConfig, "model/sdatc": ModelConfig, "model/ultravsr": UltraVSRConfig}


def _class_for(rel: str):
    classes = _classes()
    folder, name = rel.split("/")
    if folder == "model":
        return classes["model/ultravsr" if name.startswith("ultravsr") else "model/sdatc"]
    return classes[folder]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out |= _flat(v, key)
        else:
            out[key] = v
    return out


def _allowed(key: str, folder: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in SIZE_KEYS[folder])


def disallowed_changes(tiny, base, cls, folder: str) -> list[str]:
    """``key: base value -> tiny value`` for every resolved key that differs outside the size allowlist."""
    a, b = _flat(to_dict(load_config(cls, base))), _flat(to_dict(load_config(cls, tiny)))
    missing = object()
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing) and not _allowed(k, folder)]


def test_every_tiny_config_is_listed():
    found = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml") if "tiny" in p.stem)
    assert found == sorted(TINY_BASES), "a tiny config without its full config in TINY_BASES (or one gone)"


@pytest.mark.parametrize("rel", sorted(TINY_BASES))
def test_tiny_config_is_its_base_at_tiny_size(rel):
    folder = rel.split("/")[0]
    path, base = CONFIGS / rel, CONFIGS / TINY_BASES[rel]
    own = _read_one(path)
    assert own.get("base") == base.name, f"{rel} must start with 'base: {base.name}'"
    # the file itself writes only size keys (no restated feature flag, even one equal to the base's) ...
    stray = [k for k in _flat({k: v for k, v in own.items() if k != "base"}) if not _allowed(k, folder)]
    assert not stray, f"{rel} sets keys outside the size allowlist: {stray}"
    # ... and resolved through the dataclass (defaults included) it differs from its base only there
    cls = _class_for(rel)
    assert not disallowed_changes(path, base, cls, folder), disallowed_changes(path, base, cls, folder)
    cfg = load_config(cls, path)
    model = getattr(cfg, "model", None) or getattr(cfg, "model_config", None)
    if model is not None:  # the model a tiny run or inference builds is the tiny model
        assert model in {f"configs/{k}" for k in TINY_BASES if k.startswith("model/")}, model


def test_the_check_sees_a_feature_flag(tmp_path):
    """The comparison above can fail: a tiny config turning off EMA, checkpointing or bf16 is caught, and
    so is a size key of the wrong kind (tiling mode)."""
    from sdatc.inference import InferConfig
    from sdatc.training.config import TrainConfig

    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(f"base: {CONFIGS / 'train/stage1.yaml'}\nema: true\ngradient_checkpointing: false\n"
                    "mixed_precision: 'no'\nbatch_size: 2\n")
    bad = disallowed_changes(tiny, CONFIGS / "train/stage1.yaml", TrainConfig, "train")
    assert [b.split(":")[0] for b in bad] == ["ema", "gradient_checkpointing", "mixed_precision"]
    tiny.write_text(f"base: {CONFIGS / 'infer/sdatc.yaml'}\n"
                    "pipeline:\n  tiling:\n    mode: off\n    latent_tile: 48\n    latent_overlap: 16\n")
    bad = disallowed_changes(tiny, CONFIGS / "infer/sdatc.yaml", InferConfig, "infer")
    assert [b.split(":")[0] for b in bad] == ["pipeline.tiling.mode"]


def test_tiny_configs_keep_the_users_features():
    """The flags issue 22 names, spelled out: in the tiny configs they are the full configs' values."""
    from sdatc.training.config import TrainConfig

    for rel in ("train/tiny_stage1.yaml", "train/tiny_stage2.yaml", "train/tiny_ultravsr.yaml"):
        tiny, full = load_config(TrainConfig, CONFIGS / rel), load_config(TrainConfig, CONFIGS / TINY_BASES[rel])
        assert (tiny.mixed_precision, tiny.gradient_checkpointing, tiny.ema) == ("bf16", True, full.ema), rel
        assert dataclasses.asdict(tiny.loss) | {"gan_start_step": 0, "lpips_pretrained_backbone": 0} == \
            dataclasses.asdict(full.loss) | {"gan_start_step": 0, "lpips_pretrained_backbone": 0}, rel
        assert (tiny.latent_source, tiny.flow, tiny.ultravsr) == (full.latent_source, full.flow, full.ultravsr), rel


def test_suite_switches_name_tiny_configs_and_real_keys():
    """tests/ci_switches.py, the suite's one departure: each entry is a tiny config and loads with it."""
    from ci_switches import SUITE_OVERRIDES

    for config, overrides in SUITE_OVERRIDES.items():
        rel = config.removeprefix("configs/")
        assert rel in TINY_BASES, config
        load_config(_class_for(rel), REPO_ROOT / config, overrides)

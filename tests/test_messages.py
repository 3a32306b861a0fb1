"""Messages a person can act on (issue 23, section 6): missing or foreign weights, random-weight hints, paths
that are never Hub ids, and settings checked when the config loads. Each error is one line."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdatc.config import ConfigError, load_config
from sdatc.errors import SdatcError
from sdatc.inference import InferConfig, build_model
from sdatc.pipelines.base import check_model

ROOT = Path(__file__).resolve().parents[1]


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("mode,name", [("sdatc", "sdatc_modules.safetensors"),
                                       ("ultravsr", "ultravsr_modules.safetensors")])
def test_checkpoint_not_found_says_none_are_published(mode, name, tmp_path):
    with pytest.raises(SdatcError) as e:
        build_model(InferConfig(mode=mode, checkpoint=str(tmp_path / "weights" / "sdatc")))
    msg = one_line(e)
    assert msg.startswith("checkpoint not found") and f"a folder holding {name}" in msg
    assert "no trained SDATC or UltraVSR weights are published" in msg and "preview model" in msg


def test_no_trained_modules_says_none_are_published(tmp_path, monkeypatch, write_sd_folder, tiny_model_config):
    write_sd_folder(tmp_path / "sd", tiny_model_config.backbone)
    with pytest.raises(SdatcError) as e:
        build_model(InferConfig(mode="sdatc", pretrained=str(tmp_path / "sd"),
                                model_config="configs/model/sdatc_tiny.yaml"))
    assert "no trained SDATC modules" in one_line(e)
    assert "no trained SDATC or UltraVSR weights are published" in one_line(e)


def test_checkpoint_of_the_other_system_is_named(tmp_path):
    sdatc_ck, ultra_ck = tmp_path / "sdatc_ck", tmp_path / "ultra_ck"
    sdatc_ck.mkdir()
    ultra_ck.mkdir()
    save_file({"dcm.x": torch.zeros(1)}, str(sdatc_ck / "sdatc_modules.safetensors"), metadata={"format": "sdatc/2"})
    (sdatc_ck / "config.yaml").write_text("dcm: {}\n")  # an SDATC model config: UltraVSR's loader would say 'dcm'
    save_file({"rts.x": torch.zeros(1)}, str(ultra_ck / "ultravsr_modules.safetensors"),
              metadata={"format": "ultravsr/1"})
    with pytest.raises(SdatcError) as e:
        build_model(InferConfig(mode="ultravsr", checkpoint=str(sdatc_ck)))
    assert "is an SDATC checkpoint" in one_line(e) and "mode=sdatc" in one_line(e) and "unknown key" not in one_line(e)
    with pytest.raises(SdatcError) as e:  # the file itself, by its format tag
        build_model(InferConfig(mode="ultravsr", checkpoint=str(sdatc_ck / "sdatc_modules.safetensors")))
    assert "is an SDATC checkpoint" in one_line(e)
    for mode in ("sdatc", "dcm"):
        with pytest.raises(SdatcError) as e:
            build_model(InferConfig(mode=mode, checkpoint=str(ultra_ck)))
        assert "is an UltraVSR checkpoint" in one_line(e) and "mode=ultravsr" in one_line(e)


def test_a_dcm_only_checkpoint_under_mode_sdatc_says_mode_dcm(tmp_path, monkeypatch):
    """The preview model (or a stage-0 checkpoint) given to the diffusion model: one line naming mode=dcm, before
    any model is built (it used to be '612 missing' keys)."""
    monkeypatch.chdir(ROOT)
    for config in ("configs/infer/tiny.yaml", "configs/infer/sdatc.yaml"):
        with pytest.raises(SdatcError) as e:
            build_model(load_config(InferConfig, config, ["checkpoint=assets/preview"]))
        assert "holds the DCM alone" in one_line(e) and "mode=dcm" in one_line(e)
    dcm = build_model(load_config(InferConfig, "configs/infer/preview.yaml"))  # the same folder, as the DCM
    assert type(dcm).__name__ == "DCM"
    switches = ("guidance", "capm_unet", "capm_vae", "stam", "cfw")
    off = ["model_overrides=[" + ",".join(f"enabled.{m}=false" for m in switches) + "]"]
    model_cfg, _ = check_model(load_config(InferConfig, "configs/infer/tiny.yaml", ["checkpoint=assets/preview", *off]))
    assert not model_cfg.enabled.guidance  # an ablation of SDATC with the DCM alone loads it: not refused
    full = tmp_path / "full"  # a checkpoint with more than the DCM is not refused by this check
    full.mkdir()
    save_file({"dcm.x": torch.zeros(1), "guidance.x": torch.zeros(1)}, str(full / "sdatc_modules.safetensors"),
              metadata={"format": "sdatc/2"})
    with pytest.raises(SdatcError) as e:  # no config.yaml: the tiny config's model; the strict load says what is off
        build_model(load_config(InferConfig, "configs/infer/tiny.yaml", [f"checkpoint={full}"]))
    assert "holds the DCM alone" not in one_line(e) and "does not match this model" in one_line(e)


def test_random_weights_hint_points_at_the_tiny_config(tmp_path, monkeypatch):
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    for mode in ("sdatc", "ultravsr"):
        with pytest.raises(SdatcError) as e:
            build_model(InferConfig(mode=mode, model_config=f"configs/model/{mode}_sd21.yaml"))
        msg = one_line(e)
        assert msg.startswith("no SD 2.1 weights") and "configs/infer/tiny.yaml" in msg


def test_check_weights_says_no_trained_weights_are_published(tmp_path, run_script, monkeypatch):
    monkeypatch.chdir(ROOT)
    p = run_script("check_weights.py", "--weights", tmp_path)
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if "trained SDATC / UltraVSR modules" in x)
    assert "none are published" in line and "train them" in line and "preview model" in line
    assert str(tmp_path / "sdatc") in line


@pytest.mark.parametrize("cls_path,overrides,words", [
    ("sdatc.inference:InferConfig", ["device=banana"], "unknown device 'banana'"),
    ("sdatc.inference:InferConfig", ["fps=.nan"], "fps must be a frame rate > 0"),
    ("sdatc.inference:InferConfig", ["fps=0"], "fps must be a frame rate > 0"),
    ("sdatc.inference:InferConfig", ["pipeline.tiling.latent_tile=0"], "latent_tile must be a whole number"),
    ("sdatc.inference:InferConfig", ["ultravsr.tiling.decoder_tile=-8"], "decoder_tile must be"),
    ("sdatc.inference:InferConfig", ["pipeline.tiling.dcm_overlap=-1"], "dcm_overlap must be"),
    ("sdatc.inference:InferConfig", ["pipeline.tiling.encoder_overlap=512"], "encoder_overlap must be"),
    ("sdatc.inference:InferConfig", ["pipeline.sampler.steps=0"], "steps must be >= 1"),
    ("sdatc.evaluation:EvalConfig", ["device=banana"], "unknown device"),
    ("sdatc.data.testsets:TestSetConfig", ["fps=-1"], "fps must be a frame rate > 0"),
    ("sdatc.training.config:TrainConfig", ["data.degradation.fps=.inf"], "fps must be a frame rate > 0"),
    ("sdatc.training.config:TrainConfig", ["val.steps=0"], "val.steps"),
    ("sdatc.training.config:TrainConfig", ["latents.steps=-3"], "latents.steps"),
])
def test_settings_are_checked_when_the_config_loads(cls_path, overrides, words):
    import importlib

    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, overrides)
    assert words in one_line(e)


def test_infer_cli_device_banana_is_one_line(tmp_path, run_script, monkeypatch):
    monkeypatch.chdir(ROOT)
    p = run_script("infer.py", "--input", tmp_path, "--output", tmp_path / "o", "device=banana")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "unknown device 'banana'" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_train_stage2_with_an_init_that_does_not_exist_yet(tmp_path, capsys):
    """README's stage-2 command before stage 1 has run: one line, before "starting a new run"."""
    from sdatc.training.config import TrainConfig
    from sdatc.training.trainer import train

    cfg = load_config(TrainConfig, "configs/train/tiny_stage2.yaml",
                      [f"init=[{tmp_path / 'runs' / 'stage1' / 'checkpoint-100000'}]", f"output_dir={tmp_path / 'o'}",
                       f"data.root={tmp_path}", "latent_source=generated", f"latents.dir={tmp_path / 'lat'}"])
    with pytest.raises(SdatcError) as e:
        train(cfg, progress=False)
    assert one_line(e).startswith("init checkpoint not found") and "checkpoint-100000 does not exist" in one_line(e)
    assert "starting a new run" not in capsys.readouterr().out

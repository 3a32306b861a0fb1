"""Config system: strict keys, typed overrides, dump round trip, every config file loads."""

import dataclasses
from pathlib import Path
from typing import Literal

import pytest
import yaml

from sdatc.config import (
    REPO_ROOT,
    ConfigError,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
)


@dataclasses.dataclass
class Sub:
    preset: str = "medium"
    threads: int = 1
    lr: float = 5e-5


@dataclasses.dataclass
class Cfg:
    name: str = "x"
    crf: list[int] = dataclasses.field(default_factory=lambda: [15, 25])
    flag: bool = False
    out: str | None = None
    size: tuple[int, int] = (64, 64)
    sub: Sub = dataclasses.field(default_factory=Sub)


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: a\ncrff: [1]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key 'crff'"):
        load_config(Cfg, f)
    f.write_text("sub:\n  presett: slow\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key 'sub\.presett'"):
        load_config(Cfg, f)


def test_types_are_checked(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("crf: [15, fast]\n")
    with pytest.raises(ConfigError, match=r"crf\[1\].*integer"):
        load_config(Cfg, f)
    f.write_text("flag: 3\n")
    with pytest.raises(ConfigError, match="true/false"):
        load_config(Cfg, f)
    f.write_text("sub:\n  lr: 1e-4\n")  # YAML 1.1 reads this as a string; still a float here
    assert load_config(Cfg, f).sub.lr == pytest.approx(1e-4)


def test_overrides_typed_without_eval():
    cfg = apply_overrides(Cfg(), ["crf=[35]", "sub.preset=slow", "sub.threads=4", "flag=true", "name=000",
                                  "size=[32, 48]", "out=null"])
    assert cfg.crf == [35] and cfg.sub.preset == "slow" and cfg.sub.threads == 4 and cfg.flag is True
    assert cfg.name == "000"  # str fields are taken verbatim, not parsed as numbers
    assert cfg.size == (32, 48) and cfg.out is None
    assert apply_overrides(Cfg(), ["crf=25"]).crf == [25]
    with pytest.raises(ConfigError, match="unknown key 'sub.nope'"):
        apply_overrides(Cfg(), ["sub.nope=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(Cfg(), ["crf"])
    with pytest.raises(ConfigError, match="integer"):
        apply_overrides(Cfg(), ["sub.threads=__import__('os')"])


def test_dump_round_trip(tmp_path):
    cfg = apply_overrides(Cfg(), ["sub.preset=slow", "out=dir"])
    text = dump_config(cfg, tmp_path / "resolved.yaml")
    assert (tmp_path / "resolved.yaml").read_text() == text
    assert load_config(Cfg, tmp_path / "resolved.yaml") == cfg
    assert yaml.safe_load(text)["sub"]["preset"] == "slow"


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, tmp_path / "bad.yaml")
    assert from_dict(Cfg, None) == Cfg()


def _config_classes():
    """Each folder of configs/ holds configs of one dataclass (a "folder/file.yaml" key names an exception)."""
    from sdatc.data.testsets import TestSetConfig
    from sdatc.evaluation import EvalConfig
    from sdatc.inference import InferConfig
    from sdatc.models.sdatc import ModelConfig
    from sdatc.models.ultravsr import UltraVSRConfig
    from sdatc.tables.config import TablesConfig
    from sdatc.training.config import TrainConfig

    return {"data": TestSetConfig, "eval": EvalConfig, "model": ModelConfig, "infer": InferConfig,
            "train": TrainConfig, "eval/tables.yaml": TablesConfig,
            "model/ultravsr_sd21.yaml": UltraVSRConfig, "model/ultravsr_tiny.yaml": UltraVSRConfig}


def test_every_config_file_loads():
    classes = _config_classes()
    files = sorted(p.relative_to(REPO_ROOT / "configs").as_posix() for p in (REPO_ROOT / "configs").rglob("*.yaml"))
    assert files, "no config files found"
    unmapped = [f for f in files if f.split("/")[0] not in classes]
    assert not unmapped, f"config files without a known dataclass in this test: {unmapped}"
    for rel in files:
        cls = classes.get(rel) or classes[rel.split("/")[0]]
        cfg = load_config(cls, Path("configs") / rel)  # relative to the repo root, from any cwd
        assert dataclasses.asdict(cfg) == dataclasses.asdict(load_config(cls, REPO_ROOT / "configs" / rel))


@dataclasses.dataclass
class Words:
    mode: Literal["auto", "on", "off"] = "auto"
    name: str = "x"
    maybe: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    flag: bool = False
    other: bool = True


def test_yaml_11_booleans_reach_string_fields_as_written(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mode: off\nname: No\nmaybe: YES\ntags: [on, off, yes]\nflag: yes\nother: off\n")
    cfg = load_config(Words, f)
    assert (cfg.mode, cfg.name, cfg.maybe, cfg.tags) == ("off", "No", "YES", ["on", "off", "yes"])
    assert cfg.flag is True and cfg.other is False
    cfg = apply_overrides(Words(), ["mode=on", "name=off", "maybe=no", "tags=[yes, On]", "flag=ON", "other=No"])
    assert (cfg.mode, cfg.name, cfg.maybe, cfg.tags) == ("on", "off", "no", ["yes", "On"])
    assert cfg.flag is True and cfg.other is False
    assert apply_overrides(Words(), ["tags=off"]).tags == ["off"]  # a single value where a list is expected
    f.write_text("flag: true\nother: FALSE\n")  # true/false stay booleans
    assert (load_config(Words, f).flag, load_config(Words, f).other) == (True, False)
    assert apply_overrides(Words(), ["flag=true", "other=false"]) == Words(flag=True, other=False)
    f.write_text("flag: maybe\n")
    with pytest.raises(ConfigError, match="true/false"):
        load_config(Words, f)
    f.write_text("name: true\n")  # a real boolean is not a string
    with pytest.raises(ConfigError, match="expected a string"):
        load_config(Words, f)
    cfg = Words(mode="off", name="on", tags=["no"], flag=True)
    dump_config(cfg, tmp_path / "d.yaml")  # safe_dump quotes 'off': the dump round-trips
    assert load_config(Words, tmp_path / "d.yaml") == cfg


def test_tiling_mode_off_in_file_and_override(tmp_path):
    from sdatc.inference import InferConfig

    f = tmp_path / "infer.yaml"
    f.write_text("pipeline:\n  tiling:\n    mode: off\n")
    assert load_config(InferConfig, f).pipeline.tiling.mode == "off"
    cfg = load_config(InferConfig, REPO_ROOT / "configs" / "infer" / "tiny.yaml", ["pipeline.tiling.mode=off"])
    assert cfg.pipeline.tiling.mode == "off"
    cfg = apply_overrides(cfg, ["pipeline.tiling.mode=on", "overwrite=yes"])
    assert cfg.pipeline.tiling.mode == "on" and cfg.overwrite is True

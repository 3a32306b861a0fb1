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


def test_base_chain_merges_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("name: root\ncrf: [1, 2, 3]\nsub:\n  preset: slow\n  threads: 8\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nsub:\n  threads: 2\n")  # relative to the file
    (tmp_path / "leaf.yaml").write_text("base: sub/mid.yaml\ncrf: [9]\nsub:\n  lr: 1.0e-3\n")
    cfg = load_config(Cfg, tmp_path / "leaf.yaml")
    assert cfg.name == "root" and cfg.crf == [9]  # scalars inherited, lists replaced
    assert (cfg.sub.preset, cfg.sub.threads, cfg.sub.lr) == ("slow", 2, 1e-3)  # mappings merged key by key
    assert load_config(Cfg, tmp_path / "leaf.yaml", ["sub.threads=5"]).sub.threads == 5  # overrides come last
    (tmp_path / "null.yaml").write_text("base: root.yaml\nout: null\ncrf: []\n")
    assert load_config(Cfg, tmp_path / "null.yaml").crf == []


def test_base_missing_or_cyclic_is_one_line_naming_both_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: base config file not found: .*gone\.yaml") as e:
        load_config(Cfg, tmp_path / "a.yaml")
    assert "\n" not in str(e.value)
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError,
                       match=r"b\.yaml: base 'a\.yaml' makes a cycle \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(Cfg, tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Cfg, tmp_path / "self.yaml")
    (tmp_path / "c.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="base must be the path"):
        load_config(Cfg, tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("crff: 1\n")  # an error in the base names the base
    with pytest.raises(ConfigError, match="unknown key 'crff'"):
        load_config(Cfg, tmp_path / "d.yaml")


def test_base_works_for_every_kind_of_config_and_referenced_configs(tmp_path):
    """Train, infer, model, eval and data configs inherit; so do configs named inside other configs
    (a train config's model:, an infer config's model_config) and is_ultravsr_config."""
    from sdatc.data.testsets import TestSetConfig
    from sdatc.evaluation import EvalConfig
    from sdatc.inference import InferConfig
    from sdatc.models.sdatc import ModelConfig
    from sdatc.models.ultravsr import UltraVSRConfig, is_ultravsr_config
    from sdatc.training.checkpoints import model_config as train_model_config
    from sdatc.training.config import TrainConfig

    c = REPO_ROOT / "configs"
    cases = [(TrainConfig, "train/stage1.yaml", "max_steps: 7", lambda x: x.max_steps == 7 and x.stage == 1),
             (InferConfig, "infer/sdatc.yaml", "output_crf: 20", lambda x: x.output_crf == 20 and x.mode == "sdatc"),
             (ModelConfig, "model/sdatc_sd21.yaml", "cfw: {growth: 8}",
              lambda x: x.cfw.growth == 8 and x.cfw.num_rdb == 2),
             (EvalConfig, "eval/evaluate.yaml", "batch_size: 2",
              lambda x: x.batch_size == 2 and x.metrics == ["psnr_y", "ssim_y"]),
             (TestSetConfig, "data/testsets.yaml", "crf: [25]", lambda x: x.crf == [25] and x.x264_threads == 1)]
    for cls, base, line, check in cases:
        f = tmp_path / f"{cls.__name__}.yaml"
        f.write_text(f"base: {c / base}\n{line}\n")
        assert check(load_config(cls, f)), cls
    model = tmp_path / "uv_model.yaml"
    model.write_text(f"base: {c / 'model/ultravsr_tiny.yaml'}\nlora: {{rank: 2}}\n")
    assert is_ultravsr_config(model)  # rts: only in the base chain
    train = tmp_path / "uv_train.yaml"
    train.write_text(f"base: {c / 'train/tiny_ultravsr.yaml'}\nmodel: {model}\n")
    mcfg = train_model_config(load_config(TrainConfig, train))
    assert isinstance(mcfg, UltraVSRConfig) and mcfg.lora.rank == 2
    assert mcfg.backbone.unet["block_out_channels"] == [32, 64]
    infer = tmp_path / "infer.yaml"
    infer.write_text(f"base: {c / 'infer/tiny.yaml'}\nmodel_config: {model}\n")
    assert load_config(InferConfig, infer).model_config == str(model)


def test_duplicate_key_names_file_key_and_line(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("name: a\nsub:\n  preset: slow\n  threads: 2\n  preset: fast\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: duplicate key 'preset' on line 5 \(first on line 3\)"):
        load_config(Cfg, f)
    f.write_text("name: a\nflag: true\nname: b\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'name' on line 3"):
        load_config(Cfg, f)
    f.write_text("d: &d {preset: slow}\nsub:\n  <<: *d\n  preset: fast\n")  # a YAML merge key may be overridden
    assert yaml.safe_load(f.read_text())["sub"]["preset"] == "fast"
    with pytest.raises(ConfigError, match="cannot parse"):  # also in an override's value
        apply_overrides(Cfg(), ["sub={preset: a, preset: b}"])


def test_binary_or_non_utf8_config_is_one_line(tmp_path):
    for name, data in [("bin.yaml", bytes(range(256))), ("latin1.yaml", "name: caf\xe9\n".encode("latin-1")),
                       ("nul.yaml", b"name: a\x00b\n")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=rf"{name}: not a YAML config") as e:
            load_config(Cfg, tmp_path / name)
        assert "\n" not in str(e.value)
    (tmp_path / "ok.yaml").write_text("name: café\n", encoding="utf-8")
    assert load_config(Cfg, tmp_path / "ok.yaml").name == "café"


def test_binary_config_on_the_command_line_is_one_line(tmp_path, run_script):
    """infer.py's main as the script runs it (tests/conftest.py::run_script: no new interpreter)."""
    f = tmp_path / "clip.mp4"
    f.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)))
    for script in ("infer.py",):
        r = run_script(script, "--config", f)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "not a YAML config" in lines[0], r.stderr

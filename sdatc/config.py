"""Typed configs: YAML -> dataclasses with strict keys, ``key.sub=value`` overrides, YAML dump.

    cfg = load_config(TestSetConfig, "configs/data/testsets.yaml", ["crf=[15,25]", "x264.preset=slow"])
    print(dump_config(cfg))

Values are converted by the dataclass field's type (never ``eval``): an override for a ``str``
field is taken verbatim (so ``clip=000`` stays ``"000"``); any other value is parsed as YAML
(``[15, 25]``, ``true``, ``null``, ``1e-4``) and then checked against the type.

YAML is read with YAML 1.2 core booleans (only ``true``/``false``): ``tiling.mode: off`` reaches a
string field as ``"off"`` (PyYAML's YAML 1.1 would make it False); bool fields also accept
``yes``/``no``/``on``/``off`` (any case).

Inheritance: a file may name ``base: other.yaml`` (relative to the file; chains allowed). Its keys
override the base's recursively: mappings merge key by key, lists and scalars replace. A missing base
or a cycle is a one-line error naming both files. A duplicate key in a mapping is an error naming the
file, the key and the line; a file that is not UTF-8 text is a one-line error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from sdatc.errors import SdatcError

T = TypeVar("T")


class ConfigError(SdatcError):
    """A config file or override that does not match its dataclass."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core booleans: true/false only; on/off/yes/no stay the strings written."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}



class _DuplicateKey(Exception):
    """A mapping names one key twice (raised by the loader; :func:`read_config_file` adds the file)."""

    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r} on line {line} (first on line {first})")


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """SafeLoader's mapping, refusing a key written twice (PyYAML keeps the last one silently).

    Keys brought in by a YAML merge (``<<: *anchor``) may be overridden: only keys written in this
    mapping itself count."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key, line = loader.construct_object(key_node, deep=True), key_node.start_mark.line + 1
        try:
            if key in seen:
                raise _DuplicateKey(key, line, seen[key])
            seen[key] = line
        except TypeError:  # an unhashable key: SafeConstructor reports it below
            continue
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.construct_mapping = _construct_mapping


def _load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`_Loader` (safe, YAML 1.2 core booleans, no duplicate keys)."""
    return yaml.load(text, Loader=_Loader)  # safe: _Loader is a SafeLoader


# --------------------------------------------------------------------------- conversion


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to type ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]  # a single value where a list is expected: `crf=25`
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, where): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:  # yes/no/on/off (any case)
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, (float, str)):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # a bug in a config class


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type[T], data: dict, where: str) -> T:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {'.'.join(filter(None, [_path(where), str(unknown[0])]))!r} "
            f"(known keys: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if _path(where) else f"{where}:{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ validation
        raise ConfigError(f"{where}: {e}") from None


def _path(where: str) -> str:
    """The dotted key part of a location string ``file:key.sub`` (empty at the top level)."""
    return where.split(":", 1)[1] if ":" in where else ""


# --------------------------------------------------------------------------- public API


def from_dict(cls: type[T], data: dict | None, source: str = "<dict>") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys are errors naming the key and source."""
    return _from_dict(cls, data or {}, source)


def to_dict(cfg: Any) -> dict:
    """Plain-dict view of a config (tuples become lists), ready for YAML/JSON."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def dump_config(cfg: Any, path: str | Path | None = None) -> str:
    """YAML text of a resolved config; also written to ``path`` when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        from sdatc.utils import atomic_write_text

        atomic_write_text(path, text)
    return text


def parse_override(item: str) -> tuple[str, str]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    return key.strip(), raw


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Return a copy of ``cfg`` with ``key.sub=value`` overrides applied (typed, strict)."""
    data = to_dict(cfg)
    cls = type(cfg)
    for item in overrides:
        key, raw = parse_override(item)
        node, tp = data, cls
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not (dataclasses.is_dataclass(tp) and part in _hints(tp)):
                raise ConfigError(f"command line: unknown key {'.'.join(parts[: i + 1])!r} in override {item!r}")
            ftp = _hints(tp)[part]
            if i < len(parts) - 1:
                sub = _unwrap_optional(ftp)
                if node.get(part) is None:
                    node[part] = {} if dataclasses.is_dataclass(sub) else node.get(part)
                node, tp = node[part], sub
            else:
                if _wants_str(ftp) and not (_is_optional(ftp) and raw.strip() in ("null", "~", "None")):
                    node[part] = raw
                else:
                    node[part] = _yaml_value(raw, item)
    return _from_dict(cls, data, "command line")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``path`` (YAML, with its ``base:`` chain) into ``cls``, apply overrides. ``path=None``: the defaults."""
    if path is None:
        cfg = from_dict(cls, {}, "<defaults>")
    else:
        path = resolve_config_path(path)
        cfg = from_dict(cls, read_config_file(path), str(path))
    return apply_overrides(cfg, overrides)


BASE_KEY = "base"


def read_config_file(path: str | Path) -> dict:
    """The mapping a YAML config file holds, its ``base:`` chain merged in (see :func:`merge_config`).

    ``base`` is a path relative to the file that names it. A missing file, a missing base, a cycle, a
    duplicate key, a file that is not UTF-8 text or not YAML: one-line ConfigErrors naming the files."""
    return _read_with_bases(resolve_config_path(path), [])


def _read_with_bases(path: Path, chain: list[Path]) -> dict:
    data = _read_one(path)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must be the path of another config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    chain = [*chain, path.resolve()]
    if base_path in chain:
        loop = " -> ".join(str(p) for p in [*chain[chain.index(base_path):], base_path])
        raise ConfigError(f"{path}: base {base!r} makes a cycle ({loop})")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base config file not found: {base_path}")
    return merge_config(_read_with_bases(base_path, chain), data)


def _read_one(path: Path) -> dict:
    """One file's own mapping (``base`` not followed)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML config (not UTF-8 text: byte {e.start} is 0x{e.object[e.start]:02x})") \
            from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a YAML config (a binary file: it holds NUL bytes)")
    try:
        data = _load_yaml(text)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return data


def merge_config(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``: mappings merge key by key (recursively); lists, scalars and null replace."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_config_path(path: str | Path) -> Path:
    """``path`` as given, or relative to the repository root (so scripts run from any folder)."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None, none: str = "") -> None:
    """``--config FILE`` plus positional ``key.sub=value`` overrides, for every script; ``none`` says what
    a script does without ``--config`` when ``default`` is None."""
    parser.add_argument("--config", default=default, help=f"YAML config (default: {default or none})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _wants_str(tp: Any) -> bool:
    return _unwrap_optional(tp) is str


def _yaml_value(raw: str, item: str) -> Any:
    try:
        return _load_yaml(raw) if raw.strip() else None
    except (yaml.YAMLError, _DuplicateKey):
        raise ConfigError(f"command line: cannot parse the value of override {item!r}") from None


def config_from_args(cls: type[T], args: argparse.Namespace, flags: dict[str, str] | None = None) -> T:
    """Resolve a script's config: ``--config`` file, then named flags (``{"gt_root": "gt_root"}``:
    argparse dest -> config key, applied when not None), then ``key=value`` overrides."""
    cfg = load_config(cls, args.config)
    data = to_dict(cfg)
    for dest, key in (flags or {}).items():
        value = getattr(args, dest)
        if value is not None:
            data[key] = value
    cfg = from_dict(cls, data, "command line")
    return apply_overrides(cfg, args.overrides)


def run_config_script(cls: type[T], default: str, doc: str | None, fn, argv=None, line=None) -> int:
    """The body of a script that takes ``--config FILE key=value ...``: ``fn(cfg)`` returns a summary
    dict, which the main process prints as ``line(summary)`` (one line), or as JSON without ``line``."""
    import json

    from sdatc.utils import process_state

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, default)
    summary = fn(config_from_args(cls, p.parse_args(argv)))
    if process_state().is_main_process:
        print(line(summary) if line else json.dumps(summary, indent=1))
    return 0


# Checks of single settings shared by several config dataclasses (called from their ``__post_init__``;
# a ValueError there becomes one line naming the config file and key).


def check_device(value: str, key: str = "device") -> None:
    """``auto`` or a device torch knows (``cpu``, ``cuda``, ``cuda:1``, ``mps``...)."""
    if value == "auto":
        return
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{key}: unknown device {value!r} (auto, cpu, cuda or cuda:N)") from None


def check_fps(value: float, key: str = "fps") -> None:
    """A frame rate: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a frame rate > 0, got {value!r}")

"""Typed configuration: every key declared once with its type, default and limits.

Loading, validation, `--set` overrides and the derived paths of the seed README
("output_dir = {output_root}/{name}", ...) all follow from the declarations below.
Validation runs before any model is loaded and reports every problem at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from pathlib import Path
from typing import Any, Union

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.rules import config_warnings, cross_check
from sdxl_ff.config.schema import Config
from sdxl_ff.config.value_checks import bounds_error, dataclass_of, did_you_mean, matches_type, non_finite, type_error

log = logging.getLogger(__name__)

# The format of the saved sdxl_ff_config.json and trainer_state.pt; files without one are version 1.
# 2: both carry format_version. A newer file is refused; an older trainer state is migrated (checkpoint.py).
FORMAT_VERSION = 2


def _build(cls: type, raw: dict, prefix: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, appending every problem to `errors`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            hint = did_you_mean(key, list(fields), prefix) or f"; valid keys here: {', '.join(sorted(fields))}"
            errors.append(f"unknown key '{full}'{hint}")
            continue
        f, tp = fields[key], hints[key]
        if not matches_type(value, tp):
            errors.append(type_error(full, value, tp))
            continue
        sub = dataclass_of(tp)
        if sub is None and non_finite(value):  # a NaN rate trains a NaN model and still exits 0
            errors.append(f"{full}: {json.dumps(value)} is not a finite number; give a finite value")
            continue
        if sub is not None and isinstance(value, dict):
            value = _build(sub, value, f"{full}.", errors)
        elif sub is not None and isinstance(value, list):  # a list of sections, e.g. data.datasets
            value = [_build(sub, item, f"{full}[{i}].", errors) for i, item in enumerate(value)]
        elif (msg := bounds_error(full, value, f.metadata)) is not None:
            errors.append(msg)
            continue
        pending = f.metadata.get("pending")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if pending and value != default and not (dataclasses.is_dataclass(value) and value == default):
            errors.append(f"{full}: {json.dumps(raw[key])} is not supported yet ({pending}); "
                          f"remove the key or set it to {json.dumps(_plain(default))}")
            continue
        kwargs[key] = value
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# --------------------------------------------------------------------------- overrides

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and repeatable --set, the same for every command that reads a training config."""
    parser.add_argument("--config", default="config.json", help="path to the JSON config (default: config.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (JSON or plain string); repeatable")


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `section.key=value` override; value is JSON, or a plain string."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. training.num_steps=100")
    dotted, text = assignment.split("=", 1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    *parents, leaf = dotted.strip().split(".")
    if _takes_text(parents + [leaf]) and isinstance(value, (bool, int, float)):
        value = text  # run.name=2024 is the name "2024", not a number
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:  # absent, or a null optional section (lr_scheduler: null): start it from its defaults
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[leaf] = value


def _takes_text(path: list[str]) -> bool:
    """Whether the key at `path` is declared as a string (plain or optional), per the Config classes."""
    tp: Any = Config
    for part in path:
        cls = dataclass_of(tp)
        if cls is None or part not in (hints := typing.get_type_hints(cls)):
            return False
        tp = hints[part]
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))


# --------------------------------------------------------------------------- loading

class _JsonObject(dict):
    """A parsed JSON object that remembers the dotted paths of keys written twice in it or below it."""

    duplicates: list[str]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _JsonObject:
        obj = cls()
        obj.duplicates = []
        for key, value in pairs:
            if key in obj:
                obj.duplicates.append(key)
            if isinstance(value, _JsonObject):
                obj.duplicates += [f"{key}.{inner}" for inner in value.duplicates]
            obj[key] = value
        return obj


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read, override, type-check, cross-check and resolve a config; raise ConfigError."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8-sig"), object_pairs_hook=_JsonObject.from_pairs)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found; pass --config PATH to an existing file") from None
        except IsADirectoryError:
            raise ConfigError(f"--config {path} is a folder; pass the JSON file itself, e.g. "
                              f"{Path(path) / 'config.json'}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8 JSON") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a JSON object with sections like \"training\"")
        if raw.duplicates:
            raise ConfigError(f"{path}: " + "; ".join(f"key '{key}' appears more than once" for key in raw.duplicates)
                              + " (JSON would silently keep the last one); keep one of each")
    for assignment in overrides:
        apply_override(raw, assignment)
    errors: list[str] = format_version_errors(raw.pop("format_version", FORMAT_VERSION))
    cfg = _build(Config, raw, "", errors)
    cfg.explicit = frozenset(written_keys(raw))
    if not errors:
        errors += cross_check(cfg)
    if errors:
        raise ConfigError(f"{source}: {len(errors)} problem(s):\n  - " + "\n  - ".join(errors))
    for warning in config_warnings(cfg):
        log.warning("%s: %s", source, warning)
    cfg.source = source
    cfg.overrides = tuple(overrides)
    resolve_paths(cfg)
    return cfg


def written_keys(raw: dict, prefix: str = "") -> list[str]:
    """The dotted paths of every key in `raw` (the file with its --set overrides), sections and their keys."""
    keys = []
    for key, value in raw.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += written_keys(value, f"{prefix}{key}.")
    return keys


def format_version_errors(version: Any) -> list[str]:
    """A saved config (sdxl_ff_config.json) may be given as --config: its format_version must be one we read."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return [f"format_version: {json.dumps(version)} is not a format version (a whole number from 1); remove the "
                f"key or set it to {FORMAT_VERSION}"]
    if version > FORMAT_VERSION:
        return [f"format_version: {version}: this config was written by a newer sdxl-ff (this version reads "
                f"format_version up to {FORMAT_VERSION}); update sdxl-ff, or remove the key and check every setting"]
    return []


def resolve_paths(cfg: Config) -> None:
    """Fill the paths the seed README derives from `run.*` when left empty."""
    run, t = cfg.run, cfg.training
    if not run.checkpoint_root:
        run.checkpoint_root = str(Path(run.output_root) / "safetensors")
    if not t.output_dir:
        t.output_dir = str(Path(run.output_root) / run.name)
    if not cfg.export.checkpoint_path and run.name:
        suffix = ".safetensors" if cfg.export.use_safetensors else ".ckpt"
        cfg.export.checkpoint_path = str(Path(run.checkpoint_root) / f"{run.name}{suffix}")
    if not t.state_path:
        t.state_path = str(Path(t.output_dir) / "trainer_state.pt")
    if cfg.data.image_dir is None and not cfg.data.datasets:
        cfg.data.image_dir = "data/images"
    cfg.resume_state_explicit = bool(t.resume_state_path)
    if t.resume_from and not t.resume_state_path:
        t.resume_state_path = str(Path(t.resume_from) / "trainer_state.pt")
    tb = t.tensorboard
    if not tb.log_dir:
        tb.log_dir = str(Path(tb.base_dir) / (run.name or Path(t.output_dir).name))


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain JSON data (for logs and the saved copy), with its format_version first."""
    data = {"format_version": FORMAT_VERSION, **dataclasses.asdict(cfg)}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            data.pop(f.name, None)
    return data

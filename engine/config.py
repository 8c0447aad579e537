"""Dataclass configs -> command-line flags and TOML files: one mechanism for every CLI.

A config is a dataclass whose fields are declared with `option(default, help, group)`. `add_dataclass_flags`
turns each field into a `--field-name` flag of the field's type (from its annotation), listed under its
group in `--help`: the groups are concerns (GROUPS), not classes, so the model's width and the learning
rate are found where a user looks for them. Every such flag defaults to None, so that a caller can tell
what was given (`explicit_fields`) from what a preset or the dataclass supplies.

`--config FILE.toml` holds the same flags by name (`read_config_file`), and `config_toml` writes a
resolved config in that form, which reads back to the same config. Bad input is one line: `ArgumentParser`
for flags, `UsageError` for files, `ValueError` from a config's `__post_init__` (its shared checks are
`require_positive_integers` and `require_finite_numbers`).

The device and dtype settings every command takes (`--device auto`, `--dtype auto`) are resolved here
too (`resolve_device`, `resolve_dtype`): engine.train, engine.sample, engine.check and the benchmarks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Callable

import torch

from engine.errors import UsageError
from engine.ops.backend import DTYPES

# The --help groups, by concern, in the order --help lists them; every option() names one.
MODEL = "model"
DATA = "data and tokenizer"
OPTIMIZATION = "optimization and schedule"
EVALUATION = "evaluation, logging and checkpoints"
DEVICE = "device, precision and backends"
PROFILING = "profiling and debugging"
DISTRIBUTED = "distributed"
GROUPS = (MODEL, DATA, OPTIMIZATION, EVALUATION, DEVICE, PROFILING, DISTRIBUTED)


def option(default, help: str, group: str, *, parse: Callable[[str], object] | None = None,
           metavar: str | None = None):
    """A dataclass field that is also a flag: its help text, its --help group (one of GROUPS), and, where the
    annotation's type does not parse the flag's text, a parser of its own (with the metavar --help shows)."""
    if group not in GROUPS:
        raise ValueError(f"unknown flag group {group!r}; choose one of {', '.join(GROUPS)}")
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "parse": parse,
                                                        "metavar": metavar})


# ----------------------------------------------------------------------------- checks configs share

def require_positive_integers(config, names: tuple[str, ...]) -> None:
    """ValueError naming the first of `names` whose value is not a positive integer (True is not one)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def require_finite_numbers(config, names: tuple[str, ...]) -> None:
    """ValueError naming the first of `names` whose value is set and not a finite number. Run it before range
    checks: nan and inf, which compare false with everything, are then named as such."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


# ----------------------------------------------------------------------------- flags

class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '2h' -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}; use seconds or a number with s, m or h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def flag_groups(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One --help group per concern, in GROUPS order (argparse leaves a group without flags out of --help)."""
    return {title: parser.add_argument_group(title) for title in GROUPS}


def _flag_type(hint):
    """The argparse type of a field's type hint: int for `int`, float for `float | None`."""
    if isinstance(hint, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def add_dataclass_flags(groups: dict[str, argparse._ArgumentGroup], cls,
                        default_text: Callable[[type, dataclasses.Field], object]) -> None:
    """A flag per field of the dataclass `cls`, in its group (flag_groups); default_text(cls, field) is the
    default --help shows, which may differ from the field's own (a preset's, say)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        group = groups[field.metadata["group"]]
        help_text = f"{field.metadata['help']} (default: {default_text(cls, field)})"
        kind = field.metadata["parse"] or _flag_type(hints[field.name])
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=None, metavar=field.metadata["metavar"] or field.name.upper(),
                               help=help_text)


def explicit_fields(args: argparse.Namespace, cls) -> dict:
    """The dataclass fields the user gave (on the command line or in a --config file)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}


# ----------------------------------------------------------------------------- TOML files

def _config_file_value(path: Path, key: str, value, action: argparse.Action):
    """A TOML value checked and converted as its flag's type would be, or a one-line error."""
    def bad(expected: str) -> UsageError:
        return UsageError(f"config file {path}: {key} must be {expected}, got {value!r}")

    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)  # TOML's true is not a 1
    if action.type is int:
        if not number or not isinstance(value, int):
            raise bad("an integer")
        return value
    if action.type is float:
        if not number:
            raise bad("a number")
        return float(value)
    if action.type is parse_duration:
        try:
            if not (number or isinstance(value, str)):
                raise argparse.ArgumentTypeError(value)
            return parse_duration(str(value))
        except argparse.ArgumentTypeError:
            raise bad("a duration in seconds or a number with s, m or h (e.g. \"15m\")") from None
    if not isinstance(value, str):
        raise bad("a string")
    if action.choices is not None and value not in action.choices:
        raise bad(f"one of {', '.join(map(str, action.choices))}")
    return Path(value) if action.type is Path else value


def read_config_file(path: Path, parser: argparse.ArgumentParser, not_settings: tuple[str, ...]) -> dict:
    """A TOML file of flags -> {flag destination: value}; keys are flag names (max_steps or max-steps).

    not_settings: the destinations of flags that cannot be in a file (--help, --config itself, flags that act
    at once). An unknown key, a value of the wrong type or a file that is not TOML is a one-line error.
    """
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    # argparse has no public way to list a parser's actions; _actions has been stable for many Python versions.
    actions = {action.dest: action for action in parser._actions if action.dest not in not_settings}
    resolved = {}
    for key, value in values.items():
        action = actions.get(key.replace("-", "_"))
        if action is None:
            raise UsageError(f"config file {path}: unknown key {key!r} (keys are the flags' names, "
                             "e.g. max_steps = 100; see --help)")
        resolved[action.dest] = _config_file_value(path, key, value, action)
    return resolved


def toml_value(value) -> str:
    """A Python scalar as a TOML value (JSON's string escapes are valid in TOML's basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def config_toml(sections: dict[str, dict]) -> str:
    """Flat keys under one comment per section; a None (not set) field becomes a comment, TOML has no null."""
    lines = []
    for title, values in sections.items():
        lines.append(f"# {title}")
        for key, value in values.items():
            lines.append(f"# {key}: not set" if value is None else f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- device and dtype

def resolve_device(name: str) -> torch.device:
    """--device: 'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'; anything else is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but no CUDA GPU is available to this PyTorch")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it oneDNN emulates bf16
    with fp32 instructions plus conversions, which is slower than plain fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype auto: bf16 autocast (fp32 weights, optimizer state and loss) on a GPU that supports bf16 and on a
    CPU with native bf16 arithmetic, else fp32. On a 2-core AMD EPYC with AVX512-BF16 a training step then
    takes about 0.46x (nanogpt-cpu preset), 0.54x (toy) and 0.38x (default) the time of fp32, at the same loss
    within the spread of seeds. (bench/results/2026-12-07-cpu/: the engine-fp32/plain-fp32 tok/s ratio over
    the engine-bf16/plain-fp32 one, each a median over alternated pairs, so the machine's drift cancels.)"""
    if name == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
        else:
            bf16 = cpu_has_native_bf16()
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[name]

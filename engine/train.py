"""`python -m engine.train`: parse flags, build the trainer, run, always close.

With no arguments it trains on the built-in Shakespeare corpus: the `default` preset in bf16 on
a CUDA GPU, or the `toy` preset on a CPU (it reaches a readable loss in minutes there), in bf16 where the
CPU has native bf16 arithmetic (see resolve_dtype), else fp32.
Every GPTConfig and TrainConfig field is a flag; `--help` lists them. `--config FILE.toml` gives
flags in a file (flag names as keys: `max_steps = 100` or `max-steps = 100`), the command line
overrides it, and the resolved config is printed and saved as RUN/config.toml (which --config reads
back). Bad input is one line on stderr and exit status 2; SIGINT/SIGTERM save a checkpoint and exit
with 128 + the signal number; a write that fails mid-run (a full disk) is one line and exit status 1,
the last checkpoint kept. A run holds an exclusive lock on its folder while it lives (see
lock_run_folder).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import itertools
import json
import os
import re
import shutil
import sys
import time
import tomllib
import types
import typing
from pathlib import Path

import torch

from engine import distributed, ops
from engine.check import prepare_backends
from engine.checkpoint import CHECKPOINT_NAME, check_model_state, check_optimizer_state, load_checkpoint
from engine.data import is_nanogpt_folder, load_token_data, save_tokenizer, tokenizer_from_dict
from engine.errors import RunFailure, UsageError, run_cli
from engine.model import GPT, PRESETS, GPTConfig, preset
from engine.ops.backend import DTYPES
from engine.trainer import TrainConfig, Trainer

# The preset trained when --preset is not given.
DEFAULT_PRESET = {"cuda": "default", "cpu": "toy"}
# Training settings per preset where they differ from TrainConfig's defaults (flags override them).
# toy: about 3 minutes on 2 CPU cores to a validation loss of about 1.73, on characters; default: the
# classic Shakespeare recipe on an 8192-token BPE vocabulary (about 23M parameters with tied embeddings),
# on every device: a preset is one model wherever it runs; gpt2: GPT-2 small's learning rate, 16 x 1024
# tokens per micro-batch.
PRESET_TRAINING = {
    "toy": {"lr": 3e-3, "batch_size": 32, "max_steps": 2000},
    "nanogpt-cpu": {"lr": 1e-3, "batch_size": 12, "max_steps": 2000},
    "default": {"lr": 1e-3, "batch_size": 64, "max_steps": 5000, "tokenizer": "bpe"},
    "gpt2": {"lr": 6e-4, "batch_size": 16, "max_steps": 5000, "warmup_steps": 200},
}
PRESET_DEPENDENT = {name for values in PRESET_TRAINING.values() for name in values}
# Fields a resumed run must keep: they define what the checkpoint's tokens mean.
FIXED_ON_RESUME = ("data", "tokenizer", "bpe_vocab")
# The file in a run folder that a live run holds an exclusive lock on (and writes its pid into).
LOCK_NAME = ".lock"


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


def _flag_type(annotation):
    """The argparse type for a dataclass field annotation such as 'int' or 'float | None'."""
    hint = eval(annotation, {"typing": typing}) if isinstance(annotation, str) else annotation  # noqa: S307
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field.type)
        default = field.default
        if cls is GPTConfig and field.name == "vocab_size":
            default = "from the tokenizer"
        elif field.name in PRESET_DEPENDENT or cls is GPTConfig and len(
                {str(values.get(field.name, field.default)) for values in PRESETS.values()}) > 1:
            presets = PRESET_TRAINING if field.name in PRESET_DEPENDENT else PRESETS
            default = "depends on --preset: " + ", ".join(f"{name} {values.get(field.name, field.default)}"
                                                          for name, values in presets.items())
        help_text = f"{field.metadata.get('help', '')} (default: {default})"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif field.name == "max_time":
            group.add_argument(flag, type=parse_duration, default=None, metavar="SECONDS", help=help_text)
        else:
            group.add_argument(flag, type=kind, default=None, metavar=field.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m engine.train",
        description="Train a GPT-style decoder on the built-in Shakespeare corpus or your own text.",
    )
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="model preset (default: 'default' on a GPU, 'toy' on a CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder (default: runs/<preset>-<date>-<time>, with -2, -3, ... if that is taken)")
    parser.add_argument("--resume", type=Path, default=None, metavar="DIR",
                        help="continue the run in DIR (or from a checkpoint file) exactly where it stopped")
    parser.add_argument("--list-backends", action="store_true", help="print every backend's availability and exit")
    parser.add_argument("--no-self-check", action="store_true",
                        help="do not check the chosen backends against reference on this device before training "
                             "(see python -m engine.check)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                        help="flags from a TOML file (keys are the flag names, e.g. max_steps = 100); "
                             "flags on the command line override it")
    add_dataclass_flags(parser, GPTConfig, "model (GPTConfig)")
    add_dataclass_flags(parser, TrainConfig, "training (TrainConfig)")
    return parser


# Flags that are not settings: they act at once, or name the file the settings come from.
NOT_IN_CONFIG_FILES = ("help", "config", "list_backends")


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


def read_config_file(path: Path, parser: argparse.ArgumentParser) -> dict:
    """--config FILE.toml -> {flag destination: value}; keys are flag names (max_steps or max-steps).

    An unknown key, a value of the wrong type or a file that is not TOML is a one-line error.
    """
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    # argparse has no public way to list a parser's actions; _actions has been stable for many Python versions.
    actions = {action.dest: action for action in parser._actions if action.dest not in NOT_IN_CONFIG_FILES}
    resolved = {}
    for key, value in values.items():
        action = actions.get(key.replace("-", "_"))
        if action is None:
            raise UsageError(f"config file {path}: unknown key {key!r} (keys are the flags' names, "
                             "e.g. max_steps = 100; see --help)")
        resolved[action.dest] = _config_file_value(path, key, value, action)
    return resolved


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line over the --config file over the defaults (every setting flag defaults to None)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        for dest, value in read_config_file(args.config, parser).items():
            if getattr(args, dest) is None:
                setattr(args, dest, value)
    return args


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


def explicit_fields(args: argparse.Namespace, cls) -> dict:
    """The dataclass fields the user gave on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}


def resolve_device(name: str) -> torch.device:
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
    costs about 0.7x (nanogpt-cpu preset) to 0.85x (toy) the CPU time of fp32, at the same loss per step
    (`python -m bench.train --baseline plain` measures it)."""
    if name == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
        else:
            bf16 = cpu_has_native_bf16()
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[name]


def resolved_data_path(data: str | None) -> str | None:
    """--data as an absolute path, so that a resumed run finds it from any directory."""
    return None if data is None else str(Path(data).expanduser().resolve())


def warn_slow_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """CPUs have no fast fp16 arithmetic: autocast to fp16 there runs about 10x slower than fp32. Say so."""
    if dtype == torch.float16 and device.type == "cpu":
        print("warning: --dtype fp16 on a CPU is emulated and about 10x slower than fp32; use --dtype fp32 "
              "(or auto) unless you are testing fp16 itself", file=sys.stderr)


def configs_for_new_run(args) -> tuple[str, GPTConfig, TrainConfig, torch.device]:
    train_flags = explicit_fields(args, TrainConfig)
    if "data" in train_flags:
        train_flags["data"] = resolved_data_path(train_flags["data"])
    if "tokenizer" in train_flags and is_nanogpt_folder(train_flags.get("data")):
        raise UsageError(f"--tokenizer does not apply to a nanoGPT folder: {train_flags['data']} brings its own "
                         "token ids (meta.pkl, or GPT-2 BPE ids without one)")
    device = resolve_device(train_flags.get("device", "auto"))
    preset_name = args.preset or DEFAULT_PRESET[device.type]
    train_config = TrainConfig(**PRESET_TRAINING[preset_name] | train_flags)
    model_config = preset(preset_name, **explicit_fields(args, GPTConfig))
    return preset_name, model_config, train_config, device


def model_config_of(state: dict, path: Path) -> GPTConfig:
    """The GPTConfig a checkpoint records; one that this engine cannot build is a UsageError naming the file."""
    try:
        return GPTConfig.from_dict(state["model_config"])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"checkpoint {path} has a model config this engine cannot build: {exc}") from None


def configs_for_resume(args, checkpoint: dict) -> tuple[GPTConfig, TrainConfig, torch.device]:
    saved_model = checkpoint["model_config"]
    for name, value in explicit_fields(args, GPTConfig).items():
        if saved_model.get(name) != value:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"checkpoint config mismatch: {name} is {saved_model.get(name)!r} in the checkpoint "
                             f"but {flag} {value!r} was given")
    if args.preset is not None:
        for name, value in PRESETS[args.preset].items():
            if name != "vocab_size" and saved_model.get(name) != value:
                raise UsageError(f"checkpoint config mismatch: the checkpoint's {name} is {saved_model.get(name)!r}, "
                                 f"preset {args.preset!r} has {value!r}")
    train_flags = explicit_fields(args, TrainConfig)
    if "data" in train_flags:
        train_flags["data"] = resolved_data_path(train_flags["data"])
    # A wall-clock limit belongs to the invocation that gave it: a resumed run has none unless given again.
    saved_train = checkpoint["train_config"] | {"max_time": None}
    saved_train["data"] = resolved_data_path(saved_train.get("data"))  # older checkpoints stored it as typed
    for name in FIXED_ON_RESUME:
        if name in train_flags and train_flags[name] != saved_train.get(name):
            raise UsageError(f"checkpoint config mismatch: {name} is {saved_train.get(name)!r} in the checkpoint "
                             f"but {train_flags[name]!r} was given")
    unknown = sorted(set(saved_train) - {field.name for field in dataclasses.fields(TrainConfig)})
    if unknown:
        raise UsageError(f"checkpoint {args.resume} has training settings this engine does not know: "
                         f"{', '.join(unknown)} (written by another version or program?)")
    train_config = TrainConfig(**(saved_train | train_flags))
    return model_config_of(checkpoint, args.resume), train_config, resolve_device(train_config.device)


def checkpoint_bytes(model_config: GPTConfig) -> int:
    """About how large a checkpoint is: fp32 weights plus AdamW's two moments, plus 10%."""
    with torch.device("meta"):
        parameters = GPT(model_config).num_parameters()
    return int(parameters * 4 * 3 * 1.1) + (1 << 20)


def default_out_dir(preset_name: str) -> Path:
    """runs/<preset>-<date>-<time>: the run folder when --out is not given (claim_out_dir makes it unique)."""
    return Path("runs") / f"{preset_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def claim_out_dir(base: Path) -> Path:
    """Create the first of base, base-2, base-3, ... that does not exist yet and return it: mkdir is
    atomic, so two runs started in the same second never get the same default folder."""
    for number in itertools.count(1):
        candidate = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise UsageError(f"cannot create run folder {candidate}: {exc.strerror or exc}") from None


def lock_run_folder(out_dir: Path) -> typing.IO:
    """Take an exclusive lock on out_dir/.lock (flock) for as long as the returned file stays open.

    The kernel drops the lock when the process dies, SIGKILL included, so a lock is never stale;
    while a run holds it, a second run or a --resume of the same folder is refused, naming the
    holder's pid (which the holder writes into the file once it has checked the folder).
    """
    handle = open(out_dir / LOCK_NAME, "a+")  # noqa: SIM115 - the caller keeps it open for the run's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UsageError(f"{out_dir} is in use by a live run (pid {holder}); wait for it to finish, stop it, "
                         "or choose another --out") from None
    return handle


def is_engine_config(path: Path) -> bool:
    """Whether path is a config.json that engine.train wrote (a run that died before its first checkpoint)."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and {"model", "train"} <= set(values)


def prepare_out_dir(out_dir: Path, resuming_in_place: bool, needed_bytes: int, rank: int = 0) -> typing.IO | None:
    """Make sure the run folder can be written and has room for checkpoints, and never overwrite
    another run's checkpoint: all before training starts, not hours later.

    Returns the run folder's lock (rank 0 only; None on the other ranks), to keep open while training.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output path {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_run_folder(out_dir) if rank == 0 else None
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from None
    try:
        check_out_dir(out_dir, resuming_in_place, needed_bytes, rank)
        if lock is not None:  # the folder is ours: say who holds it
            lock.seek(0)
            lock.truncate()
            lock.write(f"{os.getpid()}\n")
            lock.flush()
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock


def check_out_dir(out_dir: Path, resuming_in_place: bool, needed_bytes: int, rank: int) -> None:
    """prepare_out_dir's checks, under the folder's lock."""
    if not resuming_in_place and (out_dir / CHECKPOINT_NAME).exists():
        raise UsageError(f"{out_dir} already holds a run; continue it with --resume {out_dir} or choose another --out")
    if not resuming_in_place and (out_dir / "metrics.jsonl").exists():
        raise UsageError(f"{out_dir} holds metrics.jsonl of an earlier run that saved no checkpoint; "
                         "delete that folder or choose another --out")
    if not resuming_in_place and (out_dir / "config.json").exists() and not is_engine_config(out_dir / "config.json"):
        raise UsageError(f"{out_dir} holds a config.json that engine.train did not write; choose another --out")
    try:
        probe = out_dir / f".write-test-{rank}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from None
    # A save writes the new checkpoint beside the old one before replacing it: room for two.
    free = shutil.disk_usage(out_dir).free
    existing = (out_dir / CHECKPOINT_NAME).stat().st_size if (out_dir / CHECKPOINT_NAME).exists() else 0
    if free + existing < 2 * needed_bytes:
        raise UsageError(f"not enough free disk space in {out_dir} for checkpoints: about "
                         f"{2 * needed_bytes / 1e6:,.0f} MB needed, {free / 1e6:,.0f} MB free")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_backends:
        for name, (ok, reason) in ops.available_backends().items():
            print(f"{name:10s} {'available' if ok else 'unavailable: ' + reason}")
        return 0

    checkpoint = None
    if args.resume is not None:
        checkpoint = load_checkpoint(args.resume)
        model_config, train_config, device = configs_for_resume(args, checkpoint)
        out_dir = args.out or (args.resume if args.resume.is_dir() else args.resume.parent)
        resuming_in_place = out_dir.resolve() == (args.resume if args.resume.is_dir() else args.resume.parent).resolve()
        tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
        banner = f"resuming {args.resume} at step {checkpoint['step']}"
    else:
        preset_name, model_config, train_config, device = configs_for_new_run(args)
        args.preset = preset_name  # resolved: recorded in config.toml
        out_dir = args.out or default_out_dir(preset_name)
        resuming_in_place = False
        tokenizer = None
        banner = f"preset {preset_name!r}"
        if args.preset is None:
            banner += (" (a CUDA GPU is present)" if device.type == "cuda" else
                       " (no CUDA GPU: the small model that trains to a readable loss in minutes on a CPU;"
                       " --preset default trains the 6x512 model)")

    context = distributed.setup(device.type)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    if train_config.fsdp and not context.enabled:
        raise UsageError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node=N")
    held = contextlib.ExitStack()  # what the run holds until it ends: its folder's lock
    try:
        return train(args, checkpoint, model_config, train_config, device, context, out_dir, resuming_in_place,
                     tokenizer, banner, held=held, claim=args.out is None and checkpoint is None)
    finally:
        held.close()
        distributed.teardown(context)


def train(args, checkpoint, model_config, train_config, device, context, out_dir, resuming_in_place, tokenizer,
          banner, held: contextlib.ExitStack, claim: bool = False) -> int:
    """Load the data, check the run folder, build the Trainer, run it, print a sample.

    held keeps the run folder's lock until the caller closes it; claim: out_dir is a default name, to be
    made unique (claim_out_dir) once the input has been checked.
    """
    say = print if context.is_main else (lambda *a, **k: None)
    dtype = resolve_dtype(train_config.dtype, device)
    if context.is_main:
        warn_slow_dtype(dtype, device)
    ops.set_backend(train_config.backend)
    setup_error = claimed = None
    try:
        data = load_token_data(train_config.data, train_config.tokenizer, tokenizer, train_config.bpe_vocab,
                               expected_fingerprint=checkpoint.get("data_fingerprint") if checkpoint else None)
        if checkpoint is None:
            vocab_size = args.vocab_size or data.tokenizer.vocab_size
            if vocab_size < data.tokenizer.vocab_size:
                raise UsageError(f"--vocab-size {vocab_size} is smaller than the tokenizer's "
                                 f"{data.tokenizer.vocab_size}")
            model_config = GPTConfig.from_dict(model_config.to_dict() | {"vocab_size": vocab_size})
        data.check_fits(model_config.max_seq_len)
        if checkpoint is not None:
            with torch.device("meta"):
                shapes = GPT(model_config)
            check_model_state(checkpoint["model"], shapes, f"checkpoint {args.resume}")
            check_optimizer_state(checkpoint["optimizer"], shapes, f"checkpoint {args.resume}")
        backends = prepare_backends(model_config, device, dtype, self_check=not args.no_self_check,
                                    decode=train_config.sample_tokens > 0)
        if claim and context.is_main:
            out_dir = claimed = claim_out_dir(out_dir)
        if context.is_main or not claim:  # the other ranks learn rank 0's claimed folder below
            lock = prepare_out_dir(out_dir, resuming_in_place, checkpoint_bytes(model_config), context.rank)
            if lock is not None:
                held.enter_context(lock)
    except (UsageError, ValueError) as exc:
        setup_error = exc
        if claimed is not None:  # a folder this run created and never used
            shutil.rmtree(claimed, ignore_errors=True)
    # Under torchrun the ranks fail together: one rank alone would leave the others waiting forever.
    if distributed.any_rank(setup_error is not None, context, device):
        raise setup_error or UsageError("another rank failed to set up; see its error")
    if claim and context.enabled:
        out_dir = Path(distributed.gather_objects(str(out_dir), context)[0])

    trainer = Trainer(model_config, train_config, data, out_dir, device, dtype, checkpoint, context=context)
    if context.is_main:
        config_json = {"model": model_config.to_dict(), "train": train_config.to_dict()}
        resolved = config_toml({"run": {"preset": args.preset}, "model (GPTConfig)": model_config.to_dict(),
                                "training (TrainConfig)": train_config.to_dict()})
        try:
            (out_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
            (out_dir / "config.toml").write_text(resolved, encoding="utf-8")
            save_tokenizer(data.tokenizer, out_dir / "tokenizer.json")
        except OSError as exc:
            raise RunFailure(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from None
        say(f"resolved config (saved as {out_dir / 'config.toml'}; python -m engine.train --config reads it):")
        say(resolved.rstrip())

    parallel = f", {context.world_size} ranks ({'FSDP' if train_config.fsdp else 'DDP'})" if context.enabled else ""
    say(f"{banner}: {trainer.model.num_parameters() / 1e6:.2f}M parameters, {device} "
          f"{str(dtype).removeprefix('torch.')}, {train_config.max_steps} steps of "
          f"{trainer.tokens_per_step:,} tokens, corpus {data.source} ({len(data.train):,} train / "
          f"{len(data.val):,} val tokens, {data.tokenizer.kind} vocabulary of {data.tokenizer.vocab_size}){parallel}")
    say(f"backends: {backends}; run folder {out_dir}")
    try:
        status = trainer.run()
    except OSError as exc:  # the disk filled, or the run folder went away, mid-run
        reason = f"cannot write {exc.filename}: {exc.strerror}" if exc.filename else exc.strerror or str(exc)
        raise RunFailure(f"training stopped at step {trainer.step}: {reason}; the last checkpoint in {out_dir} is "
                         f"kept: make room and continue with --resume {out_dir}") from None
    except ValueError as exc:  # not bad input but a failure inside training: keep its traceback
        raise RuntimeError(f"training failed at step {trainer.step}: {exc}") from exc
    if status == 0 and train_config.sample_tokens > 0 and context.is_main:
        if train_config.fsdp:
            say(f"(no sample under --fsdp; run python -m engine.sample --run {out_dir})")
        else:
            say("sample:")
            say(trainer.sample(train_config.sample_tokens))
    return status


def entry_point(argv: list[str] | None = None) -> int:
    """main() with bad input turned into one line on stderr and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(entry_point())

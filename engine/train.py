"""`python -m engine.train`: parse flags, build the trainer, run, always close.

With no arguments it trains on the built-in Shakespeare corpus: the `default` preset in bf16 on
a CUDA GPU, or the `toy` preset on a CPU (it reaches a readable loss in minutes there), in bf16 where the
CPU has native bf16 arithmetic (see resolve_dtype), else fp32.
Every GPTConfig and TrainConfig field is a flag; `--help` lists them. Bad input is one line on
stderr and exit status 2; SIGINT/SIGTERM save a checkpoint and exit with 128 + the signal number.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import time
import types
import typing
from pathlib import Path

import torch

from engine import distributed, ops
from engine.checkpoint import CHECKPOINT_NAME, load_checkpoint
from engine.data import load_token_data, save_tokenizer, tokenizer_from_dict
from engine.errors import UsageError, run_cli
from engine.model import GPT, PRESETS, GPTConfig, preset
from engine.trainer import DTYPES, TrainConfig, Trainer, describe_backends

# The preset trained when --preset is not given.
DEFAULT_PRESET = {"cuda": "default", "cpu": "toy"}
# Training settings per preset where they differ from TrainConfig's defaults (flags override them).
# toy: about 3 minutes on 2 CPU cores to a validation loss of about 1.73; default: the classic char-level
# Shakespeare recipe; gpt2: GPT-2 small's learning rate, 16 x 1024 tokens per micro-batch.
PRESET_TRAINING = {
    "toy": {"lr": 3e-3, "batch_size": 32, "max_steps": 2000},
    "nanogpt-cpu": {"lr": 1e-3, "batch_size": 12, "max_steps": 2000},
    "default": {"lr": 1e-3, "batch_size": 64, "max_steps": 5000},
    "gpt2": {"lr": 6e-4, "batch_size": 16, "max_steps": 5000, "warmup_steps": 200},
}
PRESET_DEPENDENT = {name for values in PRESET_TRAINING.values() for name in values}
# Fields a resumed run must keep: they define what the checkpoint's tokens mean.
FIXED_ON_RESUME = ("data", "tokenizer")


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
        if field.name in PRESET_DEPENDENT:
            default = ", ".join(f"{name} {values.get(field.name, field.default)}"
                                for name, values in PRESET_TRAINING.items())
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
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<preset>-<time>)")
    parser.add_argument("--resume", type=Path, default=None, metavar="DIR",
                        help="continue the run in DIR (or from a checkpoint file) exactly where it stopped")
    parser.add_argument("--list-backends", action="store_true", help="print every backend's availability and exit")
    add_dataclass_flags(parser, GPTConfig, "model (GPTConfig)")
    add_dataclass_flags(parser, TrainConfig, "training (TrainConfig)")
    return parser


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


def configs_for_new_run(args) -> tuple[str, GPTConfig, TrainConfig, torch.device]:
    train_flags = explicit_fields(args, TrainConfig)
    device = resolve_device(train_flags.get("device", "auto"))
    preset_name = args.preset or DEFAULT_PRESET[device.type]
    train_config = TrainConfig(**PRESET_TRAINING[preset_name] | train_flags)
    model_config = preset(preset_name, **explicit_fields(args, GPTConfig))
    return preset_name, model_config, train_config, device


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
    saved_train = checkpoint["train_config"]
    for name in FIXED_ON_RESUME:
        if name in train_flags and train_flags[name] != saved_train.get(name):
            raise UsageError(f"checkpoint config mismatch: {name} is {saved_train.get(name)!r} in the checkpoint "
                             f"but {train_flags[name]!r} was given")
    train_config = TrainConfig(**(saved_train | train_flags))
    return GPTConfig.from_dict(saved_model), train_config, resolve_device(train_config.device)


def checkpoint_bytes(model_config: GPTConfig) -> int:
    """About how large a checkpoint is: fp32 weights plus AdamW's two moments, plus 10%."""
    with torch.device("meta"):
        parameters = GPT(model_config).num_parameters()
    return int(parameters * 4 * 3 * 1.1) + (1 << 20)


def prepare_out_dir(out_dir: Path, resuming_in_place: bool, needed_bytes: int, rank: int = 0) -> None:
    """Make sure the run folder can be written and has room for checkpoints, and never overwrite
    another run's checkpoint: all before training starts, not hours later."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output path {out_dir} exists and is not a folder")
    if not resuming_in_place and (out_dir / CHECKPOINT_NAME).exists():
        raise UsageError(f"{out_dir} already holds a run; continue it with --resume {out_dir} or choose another --out")
    if not resuming_in_place and (out_dir / "metrics.jsonl").exists():
        raise UsageError(f"{out_dir} holds metrics.jsonl of an earlier run that saved no checkpoint; "
                         "delete that folder or choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
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
    args = build_parser().parse_args(argv)
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
        out_dir = args.out or Path("runs") / f"{preset_name}-{time.strftime('%Y%m%d-%H%M%S')}"
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
    try:
        return train(args, checkpoint, model_config, train_config, device, context, out_dir, resuming_in_place,
                     tokenizer, banner)
    finally:
        distributed.teardown(context)


def train(args, checkpoint, model_config, train_config, device, context, out_dir, resuming_in_place, tokenizer,
          banner) -> int:
    """Load the data, check the run folder, build the Trainer, run it, print a sample."""
    say = print if context.is_main else (lambda *a, **k: None)
    dtype = resolve_dtype(train_config.dtype, device)
    ops.set_backend(train_config.backend)
    setup_error = None
    try:
        data = load_token_data(train_config.data, train_config.tokenizer, tokenizer)
        if checkpoint is None:
            vocab_size = args.vocab_size or data.tokenizer.vocab_size
            if vocab_size < data.tokenizer.vocab_size:
                raise UsageError(f"--vocab-size {vocab_size} is smaller than the tokenizer's "
                                 f"{data.tokenizer.vocab_size}")
            model_config = GPTConfig.from_dict(model_config.to_dict() | {"vocab_size": vocab_size})
        data.check_fits(model_config.max_seq_len)
        backends = describe_backends(device.type, model_config.dropout > 0)
        prepare_out_dir(out_dir, resuming_in_place, checkpoint_bytes(model_config), context.rank)
    except (UsageError, ValueError) as exc:
        setup_error = exc
    # Under torchrun the ranks fail together: one rank alone would leave the others waiting forever.
    if distributed.any_rank(setup_error is not None, context, device):
        raise setup_error or UsageError("another rank failed to set up; see its error")

    trainer = Trainer(model_config, train_config, data, out_dir, device, dtype, checkpoint, context=context)
    if context.is_main:
        config_json = {"model": model_config.to_dict(), "train": train_config.to_dict()}
        (out_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        save_tokenizer(data.tokenizer, out_dir / "tokenizer.json")

    parallel = f", {context.world_size} ranks ({'FSDP' if train_config.fsdp else 'DDP'})" if context.enabled else ""
    say(f"{banner}: {trainer.model.num_parameters() / 1e6:.2f}M parameters, {device} "
          f"{str(dtype).removeprefix('torch.')}, {train_config.max_steps} steps of "
          f"{trainer.tokens_per_step:,} tokens, corpus {data.source} ({len(data.train):,} train / "
          f"{len(data.val):,} val tokens, {data.tokenizer.kind} vocabulary of {data.tokenizer.vocab_size}){parallel}")
    say(f"backends: {backends}; run folder {out_dir}")
    try:
        status = trainer.run()
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

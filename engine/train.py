"""`python -m engine.train`: parse flags, build the trainer, run, always close.

With no arguments it trains on the built-in Shakespeare corpus: the `default` preset in bf16 on
a CUDA GPU, or the `toy` preset on a CPU (it reaches a readable loss in minutes there), in bf16 where the
CPU has native bf16 arithmetic (see engine.config.resolve_dtype), else fp32.
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
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import distributed, ops
from engine.check import prepare_backends
from engine.checkpoint import CHECKPOINT_NAME, check_model_state, check_optimizer_state, load_checkpoint
from engine.config import (DEVICE, MODEL, ArgumentParser, add_dataclass_flags, config_toml, explicit_fields,
                           flag_groups, read_config_file, resolve_device, resolve_dtype)
from engine.data import (TokenData, Tokenizer, is_nanogpt_folder, load_token_data, save_tokenizer,
                         tokenizer_from_dict)
from engine.distributed import Context
from engine.errors import RunFailure, UsageError, run_cli
from engine.model import GPT, PRESETS, GPTConfig, preset
from engine.trainer import TrainConfig, Trainer

# The preset trained when --preset is not given.
DEFAULT_PRESET = {"cuda": "default", "cpu": "toy"}
# Training settings per preset where they differ from TrainConfig's defaults (flags override them).
# toy: under 2 minutes on 2 CPU cores to a validation loss of about 1.72, on characters; default: the
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


def default_text(cls, field: dataclasses.Field) -> object:
    """The default --help shows for a field of GPTConfig or TrainConfig: a preset's where presets differ."""
    if cls is GPTConfig and field.name == "vocab_size":
        return "from the tokenizer"
    if field.name in PRESET_DEPENDENT or cls is GPTConfig and len(
            {str(values.get(field.name, field.default)) for values in PRESETS.values()}) > 1:
        presets = PRESET_TRAINING if field.name in PRESET_DEPENDENT else PRESETS
        return "depends on --preset: " + ", ".join(f"{name} {values.get(field.name, field.default)}"
                                                   for name, values in presets.items())
    return field.default


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m engine.train",
        description="Train a GPT-style decoder on the built-in Shakespeare corpus or your own text.",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder (default: runs/<preset>-<date>-<time>, with -2, -3, ... if that is taken)")
    parser.add_argument("--resume", type=Path, default=None, metavar="DIR",
                        help="continue the run in DIR (or from a checkpoint file) exactly where it stopped")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                        help="flags from a TOML file (keys are the flag names, e.g. max_steps = 100); "
                             "flags on the command line override it")
    groups = flag_groups(parser)
    groups[MODEL].add_argument("--preset", choices=list(PRESETS), default=None,
                               help="model preset (default: 'default' on a GPU, 'toy' on a CPU)")
    groups[DEVICE].add_argument("--list-backends", action="store_true",
                                help="print every backend's availability and exit")
    groups[DEVICE].add_argument("--no-self-check", action="store_true",
                                help="do not check the chosen backends against reference on this device before "
                                     "training (see python -m engine.check)")
    for cls in (GPTConfig, TrainConfig):
        add_dataclass_flags(groups, cls, default_text)
    return parser


# Flags that are not settings: they act at once, or name the file the settings come from.
NOT_IN_CONFIG_FILES = ("help", "config", "list_backends")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line over the --config file over the defaults (every setting flag defaults to None)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        for dest, value in read_config_file(args.config, parser, NOT_IN_CONFIG_FILES).items():
            if getattr(args, dest) is None:
                setattr(args, dest, value)
    return args


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


@dataclass
class RunPlan:
    """What a run is to do, decided from the flags before any data is read (plan_new_run, plan_resume)."""

    model_config: GPTConfig  # a new run's vocab_size is settled by its tokenizer (set_up)
    train_config: TrainConfig
    device: torch.device
    out_dir: Path
    banner: str  # how the start-up line names the run: its preset, or the checkpoint it continues
    preset: str | None = None  # recorded in config.toml
    checkpoint: dict | None = None  # resuming: the checkpoint, the path it was read from, its tokenizer
    checkpoint_path: Path | None = None
    tokenizer: Tokenizer | None = None
    resuming_in_place: bool = False  # out_dir is the folder of the run it continues
    claim: bool = False  # out_dir is a default name, made unique (claim_out_dir) once the input is checked
    vocab_size: int | None = None  # --vocab-size (default: the tokenizer's)
    self_check: bool = True  # check the chosen backends against reference first (no --no-self-check)


def plan_new_run(args: argparse.Namespace) -> RunPlan:
    preset_name, model_config, train_config, device = configs_for_new_run(args)
    banner = f"preset {preset_name!r}"
    if args.preset is None:
        banner += (" (a CUDA GPU is present)" if device.type == "cuda" else
                   " (no CUDA GPU: the small model that trains to a readable loss in minutes on a CPU;"
                   " --preset default trains the 6x512 model)")
    return RunPlan(model_config, train_config, device, args.out or default_out_dir(preset_name), banner,
                   preset=preset_name, claim=args.out is None, vocab_size=args.vocab_size,
                   self_check=not args.no_self_check)


def plan_resume(args: argparse.Namespace) -> RunPlan:
    checkpoint = load_checkpoint(args.resume)
    model_config, train_config, device = configs_for_resume(args, checkpoint)
    run_folder = args.resume if args.resume.is_dir() else args.resume.parent
    out_dir = args.out or run_folder
    return RunPlan(model_config, train_config, device, out_dir, f"resuming {args.resume} at step {checkpoint['step']}",
                   preset=args.preset, checkpoint=checkpoint, checkpoint_path=args.resume,
                   tokenizer=tokenizer_from_dict(checkpoint["tokenizer"]),
                   resuming_in_place=out_dir.resolve() == run_folder.resolve(), self_check=not args.no_self_check)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_backends:
        for name, (ok, reason) in ops.available_backends().items():
            print(f"{name:10s} {'available' if ok else 'unavailable: ' + reason}")
        return 0
    plan = plan_resume(args) if args.resume is not None else plan_new_run(args)
    context = distributed.setup(plan.device.type)
    if context.enabled and plan.device.type == "cuda":
        plan.device = torch.device("cuda", context.local_rank)
    if plan.train_config.fsdp and not context.enabled:
        raise UsageError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node=N")
    held = contextlib.ExitStack()  # what the run holds until it ends: its folder's lock
    try:
        return train(plan, context, held)
    finally:
        held.close()
        distributed.teardown(context)


def set_up(plan: RunPlan, context: Context, dtype: torch.dtype,
           held: contextlib.ExitStack) -> tuple[RunPlan, TokenData, str]:
    """Load the data, settle the vocabulary, check the checkpoint and the backends, claim and lock the run folder
    (held keeps the lock). Returns the settled plan, the data and the backends' start-up line.

    Under torchrun the ranks fail together: one rank alone would leave the others waiting forever.
    """
    config, checkpoint = plan.train_config, plan.checkpoint
    model_config, out_dir = plan.model_config, plan.out_dir
    setup_error = claimed = None
    try:
        data = load_token_data(config.data, config.tokenizer, plan.tokenizer, config.bpe_vocab,
                               expected_fingerprint=checkpoint.get("data_fingerprint") if checkpoint else None)
        if checkpoint is None:
            vocab_size = plan.vocab_size or data.tokenizer.vocab_size
            if vocab_size < data.tokenizer.vocab_size:
                raise UsageError(f"--vocab-size {vocab_size} is smaller than the tokenizer's "
                                 f"{data.tokenizer.vocab_size}")
            model_config = GPTConfig.from_dict(model_config.to_dict() | {"vocab_size": vocab_size})
        data.check_fits(model_config.max_seq_len)
        if checkpoint is not None:
            with torch.device("meta"):
                shapes = GPT(model_config)
            check_model_state(checkpoint["model"], shapes, f"checkpoint {plan.checkpoint_path}")
            check_optimizer_state(checkpoint["optimizer"], shapes, f"checkpoint {plan.checkpoint_path}")
        backends = prepare_backends(model_config, plan.device, dtype, self_check=plan.self_check,
                                    decode=config.sample_tokens > 0)
        if plan.claim and context.is_main:
            out_dir = claimed = claim_out_dir(out_dir)
        if context.is_main or not plan.claim:  # the other ranks learn rank 0's claimed folder below
            lock = prepare_out_dir(out_dir, plan.resuming_in_place, checkpoint_bytes(model_config), context.rank)
            if lock is not None:
                held.enter_context(lock)
    except (UsageError, ValueError) as exc:
        setup_error = exc
        if claimed is not None:  # a folder this run created and never used
            shutil.rmtree(claimed, ignore_errors=True)
    if distributed.any_rank(setup_error is not None, context, plan.device):
        raise setup_error or UsageError("another rank failed to set up; see its error")
    if plan.claim and context.enabled:
        out_dir = Path(distributed.gather_objects(str(out_dir), context)[0])
    return dataclasses.replace(plan, model_config=model_config, out_dir=out_dir), data, backends


def write_run_files(plan: RunPlan, data: TokenData, say) -> None:
    """config.json, the resolved config as config.toml (printed too) and the tokenizer, in the run folder."""
    config_json = {"model": plan.model_config.to_dict(), "train": plan.train_config.to_dict()}
    resolved = config_toml({"run": {"preset": plan.preset}, "model (GPTConfig)": plan.model_config.to_dict(),
                            "training (TrainConfig)": plan.train_config.to_dict()})
    try:
        (plan.out_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        (plan.out_dir / "config.toml").write_text(resolved, encoding="utf-8")
        save_tokenizer(data.tokenizer, plan.out_dir / "tokenizer.json")
    except OSError as exc:
        raise RunFailure(f"cannot write to output folder {plan.out_dir}: {exc.strerror or exc}") from None
    say(f"resolved config (saved as {plan.out_dir / 'config.toml'}; python -m engine.train --config reads it):")
    say(resolved.rstrip())


def train(plan: RunPlan, context: Context, held: contextlib.ExitStack) -> int:
    """Load the data, check the run folder, build the Trainer, run it, print a sample; held keeps the run
    folder's lock until the caller closes it."""
    say = print if context.is_main else (lambda *a, **k: None)
    dtype = resolve_dtype(plan.train_config.dtype, plan.device)
    if context.is_main:
        warn_slow_dtype(dtype, plan.device)
    ops.set_backend(plan.train_config.backend)
    plan, data, backends = set_up(plan, context, dtype, held)
    config, out_dir = plan.train_config, plan.out_dir
    trainer = Trainer(plan.model_config, config, data, out_dir, plan.device, dtype, plan.checkpoint, context=context)
    if context.is_main:
        write_run_files(plan, data, say)
    parallel = f", {context.world_size} ranks ({'FSDP' if config.fsdp else 'DDP'})" if context.enabled else ""
    say(f"{plan.banner}: {trainer.model.num_parameters() / 1e6:.2f}M parameters, {plan.device} "
        f"{str(dtype).removeprefix('torch.')}, {config.max_steps} steps of "
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
    if status == 0 and config.sample_tokens > 0 and context.is_main:
        if config.fsdp:
            say(f"(no sample under --fsdp; run python -m engine.sample --run {out_dir})")
        else:
            say("sample:")
            say(trainer.sample(config.sample_tokens))
    return status


def entry_point(argv: list[str] | None = None) -> int:
    """main() with bad input turned into one line on stderr and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    distributed.exit_process(entry_point())

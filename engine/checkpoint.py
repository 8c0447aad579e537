"""Checkpoints: one file, written atomically, loaded safely.

A checkpoint holds everything needed to continue a run bit for bit: model and optimizer state,
the step, the RNG states (global torch, CUDA, and the data sampler's generator), the configs
and the tokenizer. It is written to a temporary file in the same folder, flushed, fsynced and
renamed over the old one, so a crash at any moment leaves either the old or the new checkpoint.
Loading uses `torch.load(weights_only=True)`: no arbitrary objects are unpickled.

On the CPU a resumed run repeats the uninterrupted one bit for bit. On a GPU with the `triton`
backend its kernels do too (none uses atomics, which tests/test_preflight.py checks, and autotune
choices are kept in Triton's on-disk cache), with what remains: a resume on another machine, or with
a cleared Triton cache, may time another tile shape and change last bits; so may the first run of
several ranks, each tuning at once. PyTorch's own CUDA ops are outside this: the token embedding's
backward adds with atomics unless torch.use_deterministic_algorithms(True), and the `torch`
backend's SDPA backward may too.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.errors import UsageError

FORMAT = "gpt-engine-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
REQUIRED_KEYS = ("model", "optimizer", "step", "model_config", "train_config", "tokenizer", "rng")


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` to `path` atomically: temp file, flush, fsync, rename, fsync the folder."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save({"format": FORMAT, "version": VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    fsync_directory(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)


def checkpoint_path(location: str | Path) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file (which must exist)."""
    location = Path(location)
    path = location / CHECKPOINT_NAME if location.is_dir() else location
    if not location.exists():
        raise UsageError(f"resume path {location} does not exist")
    if not path.is_file():
        raise UsageError(f"no {CHECKPOINT_NAME} in {location}; nothing to resume")
    return path


def load_checkpoint(location: str | Path, map_location="cpu") -> dict:
    """Load and validate a checkpoint; a truncated or foreign file is a UsageError naming it."""
    path = checkpoint_path(location)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unreadable file is the same user error
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"checkpoint {path} is truncated or not a checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path} is not a gpt-engine checkpoint")
    if state.get("version") != VERSION:
        raise UsageError(f"checkpoint {path} has format version {state.get('version')}, expected {VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise UsageError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return state

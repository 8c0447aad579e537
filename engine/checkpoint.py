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
import pickle
import re
from pathlib import Path

import torch

from engine.errors import UsageError, os_error_in

FORMAT = "gpt-engine-checkpoint"
# Version 2 names the feed-forward layers blocks.N.ffn.fc1/fc2 (version 1: blocks.N.fc1/fc2); load_checkpoint
# renames a version 1 checkpoint's tensors as it reads them.
VERSION = 2
# blocks.N.fc1.weight (version 1) -> blocks.N.ffn.fc1.weight (version 2).
_VERSION_1_NAME = re.compile(r"^(blocks\.\d+\.)(fc[12]\.)")
CHECKPOINT_NAME = "checkpoint.pt"
REQUIRED_KEYS = ("model", "optimizer", "step", "model_config", "train_config", "tokenizer", "rng")
DICT_KEYS = ("model", "optimizer", "model_config", "train_config", "tokenizer", "rng")


def load_failure(path: Path, exc: Exception) -> str:
    """One line saying why torch.load refused a file.

    A file that holds objects other than tensors and plain data fails weights_only loading with a
    message advising weights_only=False, which would execute whatever the file holds: name the
    object instead and never repeat that advice.
    """
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in text:
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            return (f"{path} holds {found.group(1)}, not only tensors and plain data; it was not unpickled "
                    "(objects can run code)")
        detail = re.search(r"Unpickler error:\s*([^\n]+)", text)
        reason = detail.group(1).strip() if detail else "not a pickle of tensors and plain data"
    return f"checkpoint {path} is truncated or not a checkpoint ({reason})"


def check_model_state(saved, model: torch.nn.Module, source, config_name: str = "the model's config") -> None:
    """Refuse weights that do not fit the model built from their own config (a foreign or edited file):
    one UsageError naming the first missing, unexpected or misshapen tensor, instead of load_state_dict's
    multi-line RuntimeError."""
    if not isinstance(saved, dict) or not all(isinstance(value, torch.Tensor) for value in saved.values()):
        raise UsageError(f"{source} holds no model weights (not a dict of tensors)")
    expected = model.state_dict()
    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    if missing or unexpected:
        raise UsageError(f"{source} does not match {config_name}: missing {', '.join(missing[:3]) or 'nothing'}, "
                         f"unexpected {', '.join(unexpected[:3]) or 'nothing'}")
    for name, tensor in expected.items():
        if saved[name].shape != tensor.shape:
            raise UsageError(f"{source} does not match {config_name}: {name} has shape {tuple(saved[name].shape)}, "
                             f"{config_name} gives {tuple(tensor.shape)}")


def check_optimizer_state(saved: dict, model: torch.nn.Module, source) -> None:
    """Refuse optimizer state that belongs to other parameters (AdamW's moments must have each
    parameter's shape: the fused kernel aborts the process on a mismatch, rather than raising)."""
    parameters = dict(model.named_parameters())
    state = saved.get("state", {})
    if not isinstance(state, dict):
        raise UsageError(f"{source} holds a malformed optimizer state")
    for name, entry in state.items():
        if name not in parameters or not isinstance(entry, dict):
            raise UsageError(f"{source} holds optimizer state for {name!r}, which the model does not have")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameters[name].shape:
                raise UsageError(f"{source} does not match the model's config: the optimizer's {name}'s {key} has "
                                 f"shape {tuple(value.shape)}, the parameter has {tuple(parameters[name].shape)}")


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
    except (OSError, RuntimeError) as exc:
        error = os_error_in(exc)
        if error is None:
            raise
        # One OSError that names the file, instead of torch's RuntimeError chained to the OSError behind it.
        raise OSError(error.errno, f"cannot write checkpoint {path}: {error.strerror or error}") from None
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
        raise UsageError(load_failure(path, exc)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path} is not a gpt-engine checkpoint")
    if state.get("version") not in (1, VERSION):
        raise UsageError(f"checkpoint {path} has format version {state.get('version')}, expected 1 or {VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise UsageError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    malformed = [key for key in DICT_KEYS if not isinstance(state[key], dict)]
    if malformed or not isinstance(state["step"], int):
        raise UsageError(f"checkpoint {path} is malformed: {', '.join(malformed or ['step'])} of the wrong type")
    if state["version"] == 1:
        upgrade_from_version_1(state)
    return state


def upgrade_from_version_1(state: dict) -> None:
    """Rename a version 1 checkpoint's feed-forward tensors (model and optimizer state) as version 2 names them."""
    def rename(name):
        return _VERSION_1_NAME.sub(r"\1ffn.\2", name) if isinstance(name, str) else name

    state["model"] = {rename(name): tensor for name, tensor in state["model"].items()}
    optimizer = state["optimizer"]
    if isinstance(optimizer.get("state"), dict):
        optimizer["state"] = {rename(name): entry for name, entry in optimizer["state"].items()}
    for group in optimizer.get("param_groups", []):
        if isinstance(group, dict) and isinstance(group.get("params"), list):
            group["params"] = [rename(name) for name in group["params"]]
    state["version"] = VERSION

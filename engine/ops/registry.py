"""The one place that decides which backend runs an op.

Backend names map to modules that export a `Backend` record; a module is imported only when
its backend is first asked for, so a missing Triton or an unbuilt C++ extension makes that
backend unavailable (with the reason) instead of breaking `import engine`.

Resolution, per op and per device type of the op's first tensor argument:
- an explicit backend must be available, run on that device and implement the op, or the call
  raises `BackendError` saying why and listing what is available; there is no silent fallback.
- `auto` walks the preference list for the device and takes the first available backend that
  implements the op, falling back to `reference` for an op no faster backend implements. It logs
  each choice once.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable

from engine.ops.backend import OP_NAMES, Backend

log = logging.getLogger("engine.ops")

# name -> "module:attribute" of the Backend record. Order is the order users see.
BACKEND_LOCATIONS: dict[str, str] = {
    "reference": "engine.ops.reference:BACKEND",
    "torch": "engine.ops.torch_native:BACKEND",
    "triton": "engine.ops.triton:BACKEND",
    "cuda": "engine.ops.extension:CUDA_BACKEND",
    "cpp": "engine.ops.extension:CPP_BACKEND",
}

# `auto`'s preference per device type, fastest first.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}

BACKEND_CHOICES = ("auto", *BACKEND_LOCATIONS)


class BackendError(ValueError):
    """An explicit backend choice that cannot run the requested op here."""


_loaded: dict[str, Backend | Exception] = {}
_resolved: dict[tuple[str, str, str, bool], Callable] = {}
_current = "auto"


def _load(name: str) -> Backend | Exception:
    """Import the backend module once; an import failure is remembered as the reason.

    (No lock: Python's import lock already serializes the import, and a lock would stop
    torch.compile from tracing through a first resolution.)
    """
    if name not in _loaded:
        module_name, attribute = BACKEND_LOCATIONS[name].split(":")
        try:
            _loaded[name] = getattr(importlib.import_module(module_name), attribute)
        except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
            _loaded[name] = exc
    return _loaded[name]


def _availability(name: str) -> tuple[bool, str]:
    backend = _load(name)
    if isinstance(backend, Exception):
        return False, f"failed to import: {type(backend).__name__}: {backend}"
    return backend.availability()


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every known backend name -> (available, reason). The reason is empty when available."""
    return {name: _availability(name) for name in BACKEND_LOCATIONS}


def _available_names() -> str:
    return ", ".join(name for name, (ok, _) in available_backends().items() if ok)


def check_backend_name(name: str) -> None:
    """Raise BackendError for an unknown name, or for a known backend that cannot run here."""
    if name == "auto":
        return
    if name not in BACKEND_LOCATIONS:
        raise BackendError(f"unknown backend {name!r}; known backends: {', '.join(BACKEND_CHOICES)}")
    ok, reason = _availability(name)
    if not ok:
        raise BackendError(f"backend {name!r} is unavailable: {reason}; available: {_available_names()}")


def set_backend(name: str) -> None:
    """Set the process-wide backend used when an op is called with backend=None."""
    global _current
    check_backend_name(name)
    _current = name
    _resolved.clear()


def get_backend() -> str:
    """The process-wide backend name (`auto` unless set_backend chose another)."""
    return _current


def _supports(name: str, op: str, device_type: str, dropout: bool) -> bool:
    backend = _load(name)
    return (
        not isinstance(backend, Exception)
        and backend.availability()[0]
        and device_type in backend.devices
        and op in backend.ops
        and (op in backend.dropout_ops or not dropout)
    )


def resolve_name(op: str, device_type: str, backend: str | None = None, dropout: bool = False) -> str:
    """The backend name that runs `op` on `device_type` for the given (or process-wide) choice.

    dropout: the call asks for dropout_p > 0 (auto then skips backends that do not implement it).
    """
    if op not in OP_NAMES:
        raise ValueError(f"unknown op {op!r}; known ops: {OP_NAMES}")
    choice = _current if backend is None else backend
    if choice != "auto":
        check_backend_name(choice)
        record = _load(choice)
        if device_type not in record.devices:
            raise BackendError(
                f"backend {choice!r} does not run on {device_type} tensors (it runs on {sorted(record.devices)})"
            )
        if op not in record.ops:
            raise BackendError(f"backend {choice!r} does not implement {op!r}; use --backend auto to fall back")
        if dropout and op not in record.dropout_ops:
            raise BackendError(f"backend {choice!r} does not implement dropout in {op!r}; train with --dropout 0, "
                               f"or use --backend auto, torch or reference")
        return choice
    for name in AUTO_PREFERENCE.get(device_type, ()):
        if _supports(name, op, device_type, dropout):
            return name
    return "reference"


def resolve(op: str, device_type: str, backend: str | None = None, dropout: bool = False) -> Callable:
    """The implementation of `op` for tensors on `device_type` (cached per choice)."""
    choice = _current if backend is None else backend
    key = (op, device_type, choice, dropout)
    implementation = _resolved.get(key)
    if implementation is None:
        name = resolve_name(op, device_type, choice, dropout)
        if choice == "auto":
            log.info("backend auto: %s on %s%s runs on %r", op, device_type, " with dropout" if dropout else "", name)
        implementation = _load(name).ops[op]
        _resolved[key] = implementation
    return implementation

"""The one place that decides which backend runs an op.

Backend names map to modules that export a `Backend` record; a module is imported only when
its backend is first asked for, so a missing Triton or an unbuilt C++ extension makes that
backend unavailable (with the reason) instead of breaking `import engine`.

Resolution is per call (`Call`: op, device type, compute dtype, dropout, attention's head
dimension and whether it is a decode step with T_q != T_k), cached per call so that an op call
costs one dict lookup once its kind of call has been seen:
- an explicit backend must be available, run on that device, implement the op, have every
  capability the call needs and not have failed its self-check, or the call raises `BackendError`
  saying why and listing the backends that would run it; there is no silent fallback.
- `auto` walks the preference list for the device and takes the first backend that could run
  the call, falling back to `reference` when none can. It logs each choice once, with the
  backends it passed over and why.
`check_model_support` asks all of this up front for a model's calls, before training starts.
The device self-check (engine/check.py) reports failing backends here (`record_self_check_failure`);
`auto` then passes over them and an explicit choice of one is an error.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch

from engine.ops.backend import DTYPE_NAMES, OP_NAMES, Backend, Call

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
# (choice, op, device_type, dtype, dropout, head_dim, decode) -> implementation
_resolved: dict[tuple, Callable] = {}
_chosen: dict[tuple, str] = {}  # the same keys -> the backend's name
# (op, device_type, backend) -> the error of its failed self-check
_self_check_failures: dict[tuple[str, str, str], str] = {}
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
    _chosen.clear()


def get_backend() -> str:
    """The process-wide backend name (`auto` unless set_backend chose another)."""
    return _current


def _dtype_list(dtypes) -> str:
    return ", ".join(DTYPE_NAMES.get(d, str(d)) for d in sorted(dtypes, key=list(DTYPE_NAMES).index))


def _lacks(backend: Backend, call: Call) -> str | None:
    """Why `backend` cannot run `call` (a phrase after "backend 'name'"), or None when it can."""
    op = call.op
    if call.device_type not in backend.devices:
        return f"does not run on {call.device_type} tensors (it runs on {sorted(backend.devices)})"
    if op not in backend.ops:
        return f"does not implement {op!r}"
    if call.dropout and op not in backend.dropout_ops:
        return f"does not implement dropout in {op!r}"
    if call.dtype is not None and call.dtype not in backend.dtypes:
        return (f"does not compute {op!r} in {DTYPE_NAMES.get(call.dtype, call.dtype)} "
                f"(supported: {_dtype_list(backend.dtypes)})")
    if call.head_dim is not None and backend.head_dims is not None and call.head_dim not in backend.head_dims:
        return (f"does not support {op!r} with head dimension D={call.head_dim} "
                f"(supported: {tuple(sorted(backend.head_dims))})")
    if call.decode and not backend.decode:
        return f"does not support {op!r} with fewer queries than keys (T_q != T_k, as KV-cache decoding needs)"
    failure = _self_check_failures.get((op, call.device_type, backend.name))
    if failure is not None:
        return f"failed its self-check of {op!r} on this {call.device_type} device ({failure})"
    return None


def why_not(name: str, call: Call) -> str | None:
    """Why backend `name` cannot run `call` here (unavailable, or a capability it lacks), or None."""
    ok, reason = _availability(name)
    if not ok:
        return f"is unavailable: {reason}"
    return _lacks(_load(name), call)


def capable_backends(call: Call) -> list[str]:
    """Every backend that could run `call` here, in the order users see."""
    return [name for name in BACKEND_LOCATIONS if why_not(name, call) is None]


def auto_candidates(call: Call) -> list[str]:
    """`auto`'s candidates for `call`, best first, ending with `reference` (the fallback)."""
    preferred = [name for name in AUTO_PREFERENCE.get(call.device_type, ()) if why_not(name, call) is None]
    return [*preferred, "reference"]


def _describe(call: Call) -> str:
    """The call as the log and the errors name it: "attention on cuda (D=96, decode) with dropout"."""
    details = [f"D={call.head_dim}"] if call.head_dim is not None else []
    if call.decode:
        details.append("decode")
    text = f"{call.op} on {call.device_type}" + (f" ({', '.join(details)})" if details else "")
    return text + (" with dropout" if call.dropout else "")


def _resolve_call(choice: str, call: Call) -> str:
    if call.op not in OP_NAMES:
        raise ValueError(f"unknown op {call.op!r}; known ops: {OP_NAMES}")
    if choice != "auto":
        check_backend_name(choice)
        reason = _lacks(_load(choice), call)
        if reason is not None:
            others = ", ".join(capable_backends(call)) or "none"
            raise BackendError(f"backend {choice!r} {reason}; backends that run this call here: {others} "
                               f"(or --backend auto)")
        return choice
    candidates = auto_candidates(call)
    passed_over = [f"{name} {why_not(name, call)}" for name in AUTO_PREFERENCE.get(call.device_type, ())
                   if name not in candidates and _availability(name)[0]]
    log.info("backend auto: %s runs on %r%s", _describe(call), candidates[0],
             f" (passed over: {'; '.join(passed_over)})" if passed_over else "")
    return candidates[0]


def resolve_name(op: str, device_type: str, backend: str | None = None, dropout: bool = False, *,
                 dtype: torch.dtype | None = None, head_dim: int | None = None, decode: bool = False) -> str:
    """The backend name that runs `op` on `device_type` for the given (or process-wide) choice.

    dropout, dtype, head_dim, decode: what the call needs (see `Call`); dtype None is not checked.
    """
    choice = _current if backend is None else backend
    return _resolve_call(choice, Call(op, device_type, dtype, dropout, head_dim, decode))


def resolve(op: str, device_type: str, backend: str | None = None, dropout: bool = False, *,
            dtype: torch.dtype | None = None, head_dim: int | None = None, decode: bool = False) -> Callable:
    """The implementation of `op` for this call (cached per choice and kind of call: a dict lookup)."""
    choice = _current if backend is None else backend
    key = (choice, op, device_type, dtype, dropout, head_dim, decode)
    implementation = _resolved.get(key)
    if implementation is None:
        name = _resolve_call(choice, Call(op, device_type, dtype, dropout, head_dim, decode))
        implementation = _load(name).ops[op]
        _resolved[key] = implementation
        _chosen[key] = name
    return implementation


def model_calls(config, device_type: str, dtype: torch.dtype, *, training: bool = True,
                decode: bool = False) -> list[Call]:
    """The kinds of op call a GPT with `config` makes (engine/model.py) when run in `dtype`.

    config: anything with d_model, n_heads and dropout (a GPTConfig). dtype is the training
    dtype: fp32 runs without autocast, fp16/bf16 under autocast, where the residual stream (and
    so LayerNorm's input) stays fp32 and the matmul ops compute in the autocast dtype.
    training: include the calls with dropout (when config.dropout > 0) besides evaluation's.
    decode: include attention's KV-cache decode step (sampling with the cache).
    """
    head_dim = config.d_model // config.n_heads
    dropouts = [False, True] if training and config.dropout > 0 else [False]
    calls = [Call("attention", device_type, dtype, dropout, head_dim) for dropout in dropouts]
    if decode:
        calls.append(Call("attention", device_type, dtype, False, head_dim, True))
    calls += [Call("ffn", device_type, dtype, dropout) for dropout in dropouts]
    calls.append(Call("layer_norm", device_type, torch.float32))
    calls += [Call(op, device_type, dtype) for op in ("cross_entropy", "linear_cross_entropy")]
    return calls


def check_model_support(config, device_type: str, dtype: torch.dtype, *, training: bool = True,
                        decode: bool = False, backend: str | None = None) -> dict[Call, str]:
    """Resolve every kind of call the model makes, now: call -> backend name.

    Raises BackendError before any training (or sampling) starts when an explicit backend lacks
    what the model needs (a head dimension, dropout, decoding, a dtype); fills the resolution cache
    so the first step, possibly under torch.compile, finds every op resolved.
    """
    choice = _current if backend is None else backend
    chosen = {}
    for call in model_calls(config, device_type, dtype, training=training, decode=decode):
        resolve(call.op, call.device_type, choice, call.dropout, dtype=call.dtype, head_dim=call.head_dim,
                decode=call.decode)
        chosen[call] = _chosen[(choice, *call)]
    return chosen


def describe_choices(chosen: dict[Call, str]) -> str:
    """"attention=cpp (decode: torch), ffn=cpp, ..." for a start-up line: each op's backend (for its
    first kind of call), and the kinds of call (with dropout, decode) that run on another one."""
    first: dict[str, str] = {}
    others: dict[str, list[str]] = {}
    for call, name in chosen.items():
        if first.setdefault(call.op, name) != name:
            kind = "decode" if call.decode else "with dropout" if call.dropout else DTYPE_NAMES.get(call.dtype)
            others.setdefault(call.op, []).append(f"{kind}: {name}")
    return ", ".join(f"{op}={name}" + (f" ({'; '.join(others[op])})" if op in others else "")
                     for op, name in first.items())


def record_self_check_failure(op: str, device_type: str, backend: str, error: str) -> None:
    """The device self-check found `backend`'s `op` wrong here: `auto` passes over it from now on,
    and an explicit choice of it raises BackendError with `error`."""
    _self_check_failures[(op, device_type, backend)] = error
    _resolved.clear()
    _chosen.clear()


def clear_self_check_failures() -> None:
    """Forget every self-check verdict (tests; a new check)."""
    _self_check_failures.clear()
    _resolved.clear()
    _chosen.clear()

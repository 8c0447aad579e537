"""The `Backend` record every backend module exports.

A backend is a named set of op implementations plus a way to tell whether it can run here.
The registry (engine/ops/registry.py) loads backend modules lazily and never imports one
that is not asked for, so a missing Triton or an unbuilt extension costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# The ops every backend may implement, in the order the docs list them.
OP_NAMES = ("attention", "ffn", "layer_norm", "cross_entropy", "linear_cross_entropy")


@dataclass(frozen=True)
class Backend:
    """One backend: its name, the devices it runs on and its op implementations.

    name:         the name users pass to `--backend`.
    devices:      device types ("cpu", "cuda") whose tensors this backend accepts.
    ops:          op name -> implementation with the signature of the public function in
                  engine.ops (minus the `backend` keyword).
    availability: returns (True, "") when the backend can run in this process, or
                  (False, reason) where the reason says what is missing, e.g. "no CUDA GPU".
    dropout_ops:  the ops whose dropout_p > 0 it implements. When dropout is asked for, `auto`
                  passes over a backend without it; an explicit choice raises a clear error.
    """

    name: str
    devices: frozenset[str]
    ops: dict[str, Callable] = field(default_factory=dict)
    availability: Callable[[], tuple[bool, str]] = lambda: (True, "")
    dropout_ops: frozenset[str] = frozenset({"attention", "ffn"})

    def __post_init__(self) -> None:
        unknown = set(self.ops) - set(OP_NAMES)
        if unknown:
            raise ValueError(f"backend {self.name!r} defines unknown ops {sorted(unknown)}; known: {OP_NAMES}")

"""The `Backend` record every backend module exports, and the `Call` a registry lookup is keyed by.

A backend is a named set of op implementations, a way to tell whether it can run here, and the
capabilities it declares: which dtypes it computes in, which attention head dimensions it
supports, whether its attention serves KV-cache decoding (fewer queries than keys) and in which
ops it implements dropout. The registry (engine/ops/registry.py) is the only code that reads
these fields: it loads backend modules lazily and never imports one that is not asked for, so a
missing Triton or an unbuilt extension costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

# The ops every backend may implement, in the order the docs list them.
OP_NAMES = ("attention", "ffn", "layer_norm", "cross_entropy", "linear_cross_entropy")

# Every floating-point dtype an op may be called with; the kernels take the three training dtypes.
ALL_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
TRAINING_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
# The one dtype table: short names as flags, messages and result rows spell them, in the order they are
# listed; DTYPES is the training dtypes by name (--dtype fp32/fp16/bf16 of every command).
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items() if dtype in TRAINING_DTYPES}


class Call(NamedTuple):
    """What one op call asks of a backend: the registry's cache key (with the backend choice).

    dtype:    the dtype the op computes in (the autocast dtype under autocast, else the input's);
              None leaves it unchecked (a query about the op in general).
    dropout:  dropout_p > 0.
    head_dim: attention's D (last dim of q); None for the other ops.
    decode:   attention with fewer queries than keys (T_q != T_k: a step over a KV cache).
    """

    op: str
    device_type: str
    dtype: torch.dtype | None
    dropout: bool = False
    head_dim: int | None = None
    decode: bool = False


@dataclass(frozen=True)
class Backend:
    """One backend: its name, the devices it runs on, its op implementations and capabilities.

    name:         the name users pass to `--backend`.
    devices:      device types ("cpu", "cuda") whose tensors this backend accepts.
    ops:          op name -> implementation with the signature of the public function in
                  engine.ops (minus the `backend` keyword).
    availability: returns (True, "") when the backend can run in this process, or
                  (False, reason) where the reason says what is missing, e.g. "no CUDA GPU".
    dropout_ops:  the ops whose dropout_p > 0 it implements.
    dtypes:       the dtypes its ops compute in (every op).
    head_dims:    the attention head dimensions D it supports; None means any.
    decode:       whether its attention takes T_q != T_k (causal=False), as KV-cache decoding does.
    When a call needs a capability a backend lacks, `auto` passes over it; an explicit choice
    raises a clear error naming what is missing and what would run the call.
    """

    name: str
    devices: frozenset[str]
    ops: dict[str, Callable] = field(default_factory=dict)
    availability: Callable[[], tuple[bool, str]] = lambda: (True, "")
    dropout_ops: frozenset[str] = frozenset({"attention", "ffn"})
    dtypes: frozenset[torch.dtype] = ALL_DTYPES
    head_dims: frozenset[int] | None = None
    decode: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.ops) - set(OP_NAMES)
        if unknown:
            raise ValueError(f"backend {self.name!r} defines unknown ops {sorted(unknown)}; known: {OP_NAMES}")

"""engine.ops: the functional API between the model and the kernels.

Every hot op is one function with a `backend=None` keyword. `None` means the process-wide
choice (`set_backend`, the `--backend` flag, default `auto`); see engine/ops/registry.py for how
a name becomes an implementation. The model calls these functions and nothing below them.
"""
from __future__ import annotations

import torch

from engine.ops.registry import (
    BACKEND_CHOICES,
    BackendError,
    available_backends,
    check_model_support,
    describe_choices,
    get_backend,
    resolve,
    resolve_name,
    set_backend,
)

__all__ = [
    "BACKEND_CHOICES",
    "BackendError",
    "attention",
    "available_backends",
    "check_model_support",
    "cross_entropy",
    "describe_choices",
    "ffn",
    "get_backend",
    "layer_norm",
    "linear_cross_entropy",
    "resolve",
    "resolve_name",
    "set_backend",
]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype an op's matmuls run in: the autocast dtype under autocast (fp64 stays fp64), else t's."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type) and t.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: float | None = None, dropout_p: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention, softmax(Q K^T * scale) V.

    q, k, v: (B, H, T, D), same dtype and device. Returns (B, H, T, D).
    causal:    query i sees keys 0..i only.
    scale:     multiplies the scores; default 1/sqrt(D).
    dropout_p: dropout on the attention weights (pass 0.0 in evaluation).

    KV-cache decoding passes fewer queries than keys (q (B, H, T_q, D), k and v (B, H, T_k, D),
    causal=False). Decoding, like the head dimension D and dropout, is a capability the registry
    checks: `auto` picks a backend that has it, an explicit backend without it is an error.
    """
    decode = q.shape[-2] != k.shape[-2]
    if decode and causal:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[-2]} and {k.shape[-2]}")
    implementation = resolve("attention", q.device.type, backend, dropout_p > 0, dtype=_compute_dtype(q),
                             head_dim=q.shape[-1], decode=decode)
    return implementation(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p)


def ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
        residual: torch.Tensor, *, activation: str = "gelu", dropout_p: float = 0.0,
        backend: str | None = None) -> torch.Tensor:
    """The transformer MLP with its residual: residual + dropout(act(x @ w1^T + b1) @ w2^T + b2).

    x, residual: (..., d_model); w1: (d_ff, d_model); b1: (d_ff,) or None;
    w2: (d_model, d_ff); b2: (d_model,) or None (nn.Linear layout). Returns (..., d_model).
    activation: "gelu" (exact, erf) or "gelu_tanh" (GPT-2's tanh approximation).
    """
    return resolve("ffn", x.device.type, backend, dropout_p > 0, dtype=_compute_dtype(x))(
        x, w1, b1, w2, b2, residual, activation=activation, dropout_p=dropout_p
    )


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5, *,
               backend: str | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension; x (..., C), weight (C,), bias (C,) or None."""
    return resolve("layer_norm", x.device.type, backend, dtype=x.dtype)(x, weight, bias, eps)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -1,
                  backend: str | None = None) -> torch.Tensor:
    """Mean cross-entropy over rows whose target is not ignore_index; logits (N, V), targets (N,)."""
    implementation = resolve("cross_entropy", logits.device.type, backend, dtype=logits.dtype)
    return implementation(logits, targets, ignore_index=ignore_index)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -1, backend: str | None = None) -> torch.Tensor:
    """cross_entropy(x @ weight^T, targets), the LM head fused with its loss.

    x: (N, d_model); weight: (V, d_model); targets: (N,). Backends may avoid materializing
    the (N, V) logits; the result equals the unfused computation.
    """
    implementation = resolve("linear_cross_entropy", x.device.type, backend, dtype=_compute_dtype(x))
    return implementation(x, weight, targets, ignore_index=ignore_index)

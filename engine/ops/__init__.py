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
    "cross_entropy",
    "ffn",
    "get_backend",
    "layer_norm",
    "linear_cross_entropy",
    "resolve",
    "resolve_name",
    "set_backend",
]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: float | None = None, dropout_p: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention, softmax(Q K^T * scale) V.

    q, k, v: (B, H, T, D), same dtype and device. Returns (B, H, T, D).
    causal:    query i sees keys 0..i only.
    scale:     multiplies the scores; default 1/sqrt(D).
    dropout_p: dropout on the attention weights (pass 0.0 in evaluation).

    KV-cache decoding passes fewer queries than keys (q (B, H, T_q, D), k and v (B, H, T_k, D),
    causal=False). The fused kernels cover the training case T_q = T_k only, so such calls run on
    the `torch` backend (PyTorch's SDPA), whatever backend is chosen.
    """
    if q.shape[-2] != k.shape[-2]:
        if causal:
            raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[-2]} and {k.shape[-2]}")
        backend = "torch"
    implementation = resolve("attention", q.device.type, backend, dropout=dropout_p > 0)
    return implementation(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p)


def ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
        residual: torch.Tensor, *, activation: str = "gelu", dropout_p: float = 0.0,
        backend: str | None = None) -> torch.Tensor:
    """The transformer MLP with its residual: residual + dropout(act(x @ w1^T + b1) @ w2^T + b2).

    x, residual: (..., d_model); w1: (d_ff, d_model); b1: (d_ff,) or None;
    w2: (d_model, d_ff); b2: (d_model,) or None (nn.Linear layout). Returns (..., d_model).
    activation: "gelu" (exact, erf) or "gelu_tanh" (GPT-2's tanh approximation).
    """
    return resolve("ffn", x.device.type, backend, dropout=dropout_p > 0)(
        x, w1, b1, w2, b2, residual, activation=activation, dropout_p=dropout_p
    )


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5, *,
               backend: str | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension; x (..., C), weight (C,), bias (C,) or None."""
    return resolve("layer_norm", x.device.type, backend)(x, weight, bias, eps)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -1,
                  backend: str | None = None) -> torch.Tensor:
    """Mean cross-entropy over rows whose target is not ignore_index; logits (N, V), targets (N,)."""
    return resolve("cross_entropy", logits.device.type, backend)(logits, targets, ignore_index=ignore_index)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -1, backend: str | None = None) -> torch.Tensor:
    """cross_entropy(x @ weight^T, targets), the LM head fused with its loss.

    x: (N, d_model); weight: (V, d_model); targets: (N,). Backends may avoid materializing
    the (N, V) logits; the result equals the unfused computation.
    """
    return resolve("linear_cross_entropy", x.device.type, backend)(x, weight, targets, ignore_index=ignore_index)

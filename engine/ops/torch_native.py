"""The `torch` backend: PyTorch's own built-ins, the baseline a user would otherwise pick.

Attention is `F.scaled_dot_product_attention` (FlashAttention / memory-efficient kernels on
GPUs, a fused kernel on CPUs); the rest are F.linear, F.gelu, F.layer_norm and F.cross_entropy.
"""
from __future__ import annotations

import torch.nn.functional as F

from engine.ops.backend import Backend

_GELU_APPROXIMATION = {"gelu": "none", "gelu_tanh": "tanh"}


def attention(q, k, v, *, causal=True, scale=None, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)


def ffn(x, w1, b1, w2, b2, residual, *, activation="gelu", dropout_p=0.0):
    if activation not in _GELU_APPROXIMATION:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_GELU_APPROXIMATION)}")
    hidden = F.gelu(F.linear(x, w1, b1), approximate=_GELU_APPROXIMATION[activation])
    out = F.linear(hidden, w2, b2)
    if dropout_p > 0.0:
        out = F.dropout(out, p=dropout_p, training=True)
    return residual + out


def layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def cross_entropy(logits, targets, *, ignore_index=-1):
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def linear_cross_entropy(x, weight, targets, *, ignore_index=-1):
    return cross_entropy(F.linear(x, weight), targets, ignore_index=ignore_index)


BACKEND = Backend(
    name="torch",
    devices=frozenset({"cpu", "cuda"}),
    ops={
        "attention": attention,
        "ffn": ffn,
        "layer_norm": layer_norm,
        "cross_entropy": cross_entropy,
        "linear_cross_entropy": linear_cross_entropy,
    },
)

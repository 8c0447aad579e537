"""The `reference` backend: every op written out in plain PyTorch, for clarity, not speed.

This is the ground truth all other backends are tested against, and the teaching text:
attention materializes the full (T x T) score matrix, applies an explicit causal mask,
a softmax and dropout, exactly as the equations read. Autograd provides the backward.

Precision: inputs may be fp32, fp16 or bf16. Matmuls run in the input dtype (accumulating in
fp32 inside PyTorch's kernels); softmax, LayerNorm statistics and the log-softmax of the loss
are computed in fp32 and the results cast back, as the precision contract asks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.ops.backend import Backend


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast fp16/bf16 to fp32 for statistics; fp32 and fp64 stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def activation_fn(pre_activation: torch.Tensor, activation: str) -> torch.Tensor:
    """GELU in one of its two common forms.

    gelu:      x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))              (exact)
    gelu_tanh: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))      (GPT-2's approximation)
    """
    x = pre_activation
    if activation == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    raise ValueError(f"unknown activation {activation!r}; expected 'gelu' or 'gelu_tanh'")


def attention(q, k, v, *, causal=True, scale=None, dropout_p=0.0):
    """softmax(Q K^T * scale + mask) V with q, k, v of shape (B, H, T, D)."""
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    if causal:
        # Query i may look at keys 0..i: mask everything strictly above the diagonal.
        future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=q.device), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(_at_least_fp32(scores), dim=-1).to(q.dtype)  # (B, H, T, T), rows sum to 1
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return weights @ v  # (B, H, T, D)


def ffn(x, w1, b1, w2, b2, residual, *, activation="gelu", dropout_p=0.0):
    """residual + dropout(act(x @ w1^T + b1) @ w2^T + b2); weights in nn.Linear layout (out, in)."""
    pre_activation = x @ w1.t()  # (..., d_ff)
    if b1 is not None:
        pre_activation = pre_activation + b1
    hidden = activation_fn(pre_activation, activation)
    out = hidden @ w2.t()  # (..., d_model)
    if b2 is not None:
        out = out + b2
    if dropout_p > 0.0:
        out = F.dropout(out, p=dropout_p, training=True)
    return residual + out


def layer_norm(x, weight, bias, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension, statistics in fp32."""
    x32 = _at_least_fp32(x)
    mean = x32.mean(dim=-1, keepdim=True)
    var = ((x32 - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as LayerNorm defines it
    normalized = (x32 - mean) / torch.sqrt(var + eps)
    out = normalized * _at_least_fp32(weight)
    if bias is not None:
        out = out + _at_least_fp32(bias)
    return out.to(x.dtype)


def cross_entropy(logits, targets, *, ignore_index=-1):
    """Mean over non-ignored rows of -log softmax(logits)[target]; logits (N, V), targets (N,)."""
    log_probs = torch.log_softmax(_at_least_fp32(logits), dim=-1)  # (N, V)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    picked = log_probs.gather(1, safe_targets.unsqueeze(1)).squeeze(1)  # (N,)
    losses = torch.where(keep, -picked, torch.zeros_like(picked))
    return losses.sum() / keep.sum()


def linear_cross_entropy(x, weight, targets, *, ignore_index=-1):
    """cross_entropy(x @ weight^T, targets): the LM head and the loss; x (N, d), weight (V, d)."""
    return cross_entropy(x @ weight.t(), targets, ignore_index=ignore_index)


BACKEND = Backend(
    name="reference",
    devices=frozenset({"cpu", "cuda"}),
    ops={
        "attention": attention,
        "ffn": ffn,
        "layer_norm": layer_norm,
        "cross_entropy": cross_entropy,
        "linear_cross_entropy": linear_cross_entropy,
    },
)

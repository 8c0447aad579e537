"""The triton backend's attention: kernels/attention.py registered with torch.library.

Two custom ops, `engine_triton::attention_forward` (returns O and the fp32 log-sum-exp the backward
needs) and `engine_triton::attention_backward` (dQ, dK, dV), each with a fake implementation
(shapes only, for torch.compile and meta tensors); the forward op's autograd formula calls the
backward op. Custom ops are opaque to torch.compile, so `torch.compile(fullgraph=True)` traces a
model that uses them without graph breaks (on a GPU, and on the CPU under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math

import torch

from engine.kernels.attention import attention_backward, attention_forward
from engine.ops.triton.autocast import cast_for_autocast


@torch.library.custom_op("engine_triton::attention_forward", mutates_args=())
def attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, lse): O (B, H, T_q, D) in q's dtype, lse (B, H, T_q) fp32 = log sum_j exp(scale * q_i . k_j)."""
    return attention_forward(q, k, v, causal, scale)


@attention_forward_op.register_fake
def _(q, k, v, causal, scale):
    B, H, T_q, D = q.shape
    return q.new_empty((B, H, T_q, D)), q.new_empty((B, H, T_q), dtype=torch.float32)


@torch.library.custom_op("engine_triton::attention_backward", mutates_args=())
def attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) with the shapes and dtype of q, k and v."""
    return attention_backward(grad_out, q, k, v, out, lse, causal, scale)


@attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(Q K^T * scale [+ causal mask]) V with fused Triton kernels.

    q (B, H, T_q, D), k and v (B, H, T_k, D); T_q == T_k when causal (query i sees keys 0..i);
    T_q != T_k (a decode step over cached keys) with causal=False. Returns (B, H, T_q, D) in the
    inputs' dtype. D must be 16, 32, 64 or 128; dtypes fp32, fp16 or bf16; scale defaults to
    1/sqrt(D). Under autocast the inputs are cast to the autocast dtype first. Attention dropout
    is not implemented: dropout_p > 0 raises ValueError; the kernel's launcher checks the rest.
    """
    if dropout_p != 0.0:
        raise ValueError(
            f"the triton attention kernel does not implement attention dropout (got dropout_p={dropout_p}); "
            "train with dropout 0 or choose the 'torch' or 'reference' backend"
        )
    q, k, v = cast_for_autocast(q.device.type, q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = attention_forward_op(q, k, v, bool(causal), scale)
    return out

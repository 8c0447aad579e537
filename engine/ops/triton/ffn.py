"""The fused FFN with residual (kernels/ffn.py) as torch.library custom ops with autograd.

`engine_triton::ffn_forward` returns (y, pre): the output and the pre-activation the backward needs
(empty when no gradient will be asked for); `engine_triton::ffn_backward` returns the gradients of
x, W1, b1, W2 and b2 (the residual's gradient is the output's gradient itself). Both have fake
(shape-only) implementations, so torch.compile(fullgraph=True) traces through them.

Under autocast the public `ffn` casts x, the weights and the biases to the autocast dtype first
(as F.linear would); the residual keeps its dtype and y takes the promoted dtype of the two.
"""
from __future__ import annotations

import torch

from engine.kernels import ffn as kernel
from engine.ops.triton.autocast import cast_for_autocast

_SEED_LIMIT = 2**31 - 1


@torch.library.custom_op("engine_triton::ffn_forward", mutates_args=())
def ffn_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None, residual: torch.Tensor, activation: str, dropout_p: float,
                seed: torch.Tensor | None, store_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel.ffn_forward(x, w1, b1, w2, b2, residual, activation, dropout_p, seed, store_pre)


@ffn_forward.register_fake
def _ffn_forward_fake(x, w1, b1, w2, b2, residual, activation, dropout_p, seed, store_pre):
    M, C = x.shape
    y = x.new_empty((M, C), dtype=torch.promote_types(residual.dtype, x.dtype))
    pre = x.new_empty((M, w1.shape[0]) if store_pre else (0,))
    return y, pre


@torch.library.custom_op("engine_triton::ffn_backward", mutates_args=())
def ffn_backward(grad_y: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor,
                 activation: str, dropout_p: float, seed: torch.Tensor | None, has_b1: bool,
                 has_b2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel.ffn_backward(grad_y, x, w1, w2, pre, activation, dropout_p, seed, has_b1, has_b2)


@ffn_backward.register_fake
def _ffn_backward_fake(grad_y, x, w1, w2, pre, activation, dropout_p, seed, has_b1, has_b2):
    # Contiguous, as the kernels return them whatever the inputs' strides (empty_like would copy a view's).
    F, C = w1.shape
    return (x.new_empty(x.shape), x.new_empty(w1.shape), x.new_empty((F,) if has_b1 else (0,)),
            x.new_empty(w2.shape), x.new_empty((C,) if has_b2 else (0,)))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, activation, dropout_p, seed, store_pre = inputs
    _, pre = output
    ctx.save_for_backward(x, w1, w2, pre, seed)
    ctx.activation, ctx.dropout_p = activation, dropout_p
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    ctx.residual_dtype = residual.dtype


def _backward(ctx, grad_y, grad_pre):
    x, w1, w2, pre, seed = ctx.saved_tensors
    grad_residual = grad_y.to(ctx.residual_dtype) if ctx.needs_input_grad[5] else None
    if not any(ctx.needs_input_grad[:5]):
        return None, None, None, None, None, grad_residual, None, None, None, None
    dx, dw1, db1, dw2, db2 = ffn_backward(grad_y, x, w1, w2, pre, ctx.activation, ctx.dropout_p, seed,
                                          ctx.has_b1, ctx.has_b2)
    return (dx, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None, grad_residual,
            None, None, None, None)


ffn_forward.register_autograd(_backward, setup_context=_setup_context)


def ffn(x, w1, b1, w2, b2, residual, *, activation="gelu", dropout_p=0.0):
    """residual + dropout(act(x @ w1^T + b1) @ w2^T + b2) on the fused Triton kernels.

    x, residual: (..., d_model); w1 (d_ff, d_model); w2 (d_model, d_ff); b1, b2 or None.
    activation: "gelu" (erf) or "gelu_tanh". dropout_p: dropout on the MLP's output (mask from a
    fresh seed drawn from torch's generator on x's device).
    """
    # The launcher checks the rest; x and residual must match before both are flattened to (rows, d_model).
    if x.shape != residual.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but residual has {tuple(residual.shape)}; they must match")
    x, w1, b1, w2, b2 = cast_for_autocast(x.device.type, x, w1, b1, w2, b2)
    d_model = x.shape[-1]
    seed = torch.randint(0, _SEED_LIMIT, (1,), device=x.device) if dropout_p > 0.0 else None
    store_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    y, _ = ffn_forward(x.reshape(-1, d_model), w1, b1, w2, b2, residual.reshape(-1, d_model), activation,
                       float(dropout_p), seed, store_pre)
    return y.view(residual.shape)

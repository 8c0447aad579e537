"""LayerNorm (kernels/layer_norm.py) as torch.library custom ops with autograd.

`engine_triton::layer_norm_forward` returns (y, mean, rstd), the fp32 row statistics being saved
for `engine_triton::layer_norm_backward`, which returns (dx, dweight, dbias). Both have fake
(shape-only) implementations for torch.compile. No autocast handling: like the reference, the
output keeps x's dtype.
"""
from __future__ import annotations

import torch

from engine.kernels import layer_norm as kernel


@torch.library.custom_op("engine_triton::layer_norm_forward", mutates_args=())
def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel.layer_norm_forward(x, weight, bias, eps)


@layer_norm_forward.register_fake
def _layer_norm_forward_fake(x, weight, bias, eps):
    N = x.shape[0]
    stats = x.new_empty((N,), dtype=torch.float32)
    return x.new_empty(x.shape), stats, x.new_empty((N,), dtype=torch.float32)


@torch.library.custom_op("engine_triton::layer_norm_backward", mutates_args=())
def layer_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel.layer_norm_backward(grad_y, x, weight, mean, rstd, has_bias)


@layer_norm_backward.register_fake
def _layer_norm_backward_fake(grad_y, x, weight, mean, rstd, has_bias):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape if has_bias else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = layer_norm_backward(grad_y, x, weight, mean, rstd, ctx.has_bias)
    return dx, dweight, dbias if ctx.has_bias else None, None


layer_norm_forward.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last dimension of x (..., C) with weight (C,) and bias (C,) or None."""
    C = x.shape[-1]
    y, _, _ = layer_norm_forward(x.reshape(-1, C), weight, bias, float(eps))
    return y.view(x.shape)

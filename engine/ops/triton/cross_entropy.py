"""Cross-entropy and the fused linear cross-entropy (kernels/cross_entropy.py) as torch.library
custom ops with autograd.

cross_entropy: `engine_triton::cross_entropy_forward` returns (loss, lse); its backward
`engine_triton::cross_entropy_backward` writes the logits' gradient into a new tensor (the logits
belong to the caller, so they are never overwritten).

linear_cross_entropy: `engine_triton::linear_cross_entropy` returns (loss, dx, dweight, divisor),
the gradients (of the summed row losses, times a power of two) being computed in the forward, chunk
by chunk, while each chunk's logits exist (dweight in fp32); the backward multiplies them by the
upstream gradient / divisor in fp32 and rounds once, so an fp16 LM head keeps its small gradients
(kernels/cross_entropy.py explains the scale). The public function asks for the gradients
only when autograd will need them, so evaluation under torch.no_grad() computes the loss alone.
Under autocast, x and weight are cast to the autocast dtype first (as F.linear would).
"""
from __future__ import annotations

import torch

from engine.kernels import cross_entropy as kernel
from engine.ops.triton.autocast import cast_for_autocast


@torch.library.custom_op("engine_triton::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel.cross_entropy_forward(logits, targets, ignore_index)


@cross_entropy_forward.register_fake
def _cross_entropy_forward_fake(logits, targets, ignore_index):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((logits.shape[0],), dtype=torch.float32)


@torch.library.custom_op("engine_triton::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                           ignore_index: int) -> torch.Tensor:
    return kernel.cross_entropy_backward(grad_loss, logits, targets, lse, ignore_index)


@cross_entropy_backward.register_fake
def _cross_entropy_backward_fake(grad_loss, logits, targets, lse, ignore_index):
    return logits.new_empty(logits.shape)


def _cross_entropy_setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    _, lse = output
    ctx.save_for_backward(logits, targets, lse)
    ctx.ignore_index = ignore_index


def _cross_entropy_backward(ctx, grad_loss, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return cross_entropy_backward(grad_loss, logits, targets, lse, ctx.ignore_index), None, None


cross_entropy_forward.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup_context)


@torch.library.custom_op("engine_triton::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_forward(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                 grad_x: bool, grad_weight: bool
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel.linear_cross_entropy_forward(x, weight, targets, ignore_index, grad_x, grad_weight)


@linear_cross_entropy_forward.register_fake
def _linear_cross_entropy_fake(x, weight, targets, ignore_index, grad_x, grad_weight):
    return (x.new_empty((), dtype=torch.float32), x.new_empty(x.shape if grad_x else (0,)),
            weight.new_empty(weight.shape if grad_weight else (0,), dtype=torch.float32),
            x.new_empty((), dtype=torch.float32))


def _linear_setup_context(ctx, inputs, output):
    x, weight, targets, ignore_index, grad_x, grad_weight = inputs
    _, dx, dweight, divisor = output
    ctx.save_for_backward(dx, dweight, divisor)
    ctx.mark_non_differentiable(divisor)
    ctx.grad_x, ctx.grad_weight = grad_x, grad_weight
    ctx.dtypes = x.dtype, weight.dtype


def _linear_backward(ctx, grad_loss, grad_dx, grad_dweight, grad_divisor):
    dx, dweight, divisor = ctx.saved_tensors
    if (ctx.needs_input_grad[0] and not ctx.grad_x) or (ctx.needs_input_grad[1] and not ctx.grad_weight):
        raise RuntimeError("linear_cross_entropy: a gradient is needed that the forward did not compute "
                           "(call it through engine.ops.linear_cross_entropy, which asks for what autograd needs)")
    scale = grad_loss.to(torch.float32) / divisor  # fp32; grad_loss carries GradScaler's scale, if any
    grad_x = (dx.to(torch.float32) * scale).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    grad_weight = (dweight * scale).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return grad_x, grad_weight, None, None, None, None


linear_cross_entropy_forward.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def cross_entropy(logits, targets, *, ignore_index=-1):
    """Mean cross-entropy over rows whose target is not ignore_index; logits (N, V), targets (N,)."""
    loss, _ = cross_entropy_forward(logits, targets, int(ignore_index))
    return loss


def linear_cross_entropy(x, weight, targets, *, ignore_index=-1):
    """cross_entropy(x @ weight^T, targets) without the (N, V) logits; x (N, d), weight (V, d)."""
    x, weight = cast_for_autocast(x.device.type, x, weight)
    grad_enabled = torch.is_grad_enabled()
    loss, _, _, _ = linear_cross_entropy_forward(x, weight, targets, int(ignore_index),
                                              grad_enabled and x.requires_grad, grad_enabled and weight.requires_grad)
    return loss

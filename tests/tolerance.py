"""The precision contract as test helpers (ARCHITECTURE.md, "Precision contract").

A kernel's error against an fp64 computation may be at most 2x the error of the `reference`
backend run in the same (low) precision, plus a small tolerance. The tolerance is scaled by the
largest magnitude of the exact result (about one rounding step of the dtype at that magnitude),
so a gradient summed over many rows is not held to an absolute bound meant for values near 1.
"""
from __future__ import annotations

import torch

from engine import ops

# Slack added to the 2x-reference bound, per dtype, times (1 + max |exact|).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, name: str) -> str:
    """Where and by how much two tensors differ, for assertion messages."""
    difference = (actual.double() - expected.double()).abs()
    worst = torch.unravel_index(difference.argmax(), difference.shape)
    index = tuple(int(i) for i in worst)
    return (f"{name}: max |error| {difference.max().item():.3e} at {index} "
            f"(got {actual[index].item():.6g}, expected {expected[index].item():.6g}); "
            f"mean |error| {difference.mean().item():.3e}, shape {tuple(actual.shape)}, dtype {actual.dtype}")


def assert_within_reference_error(actual: torch.Tensor, reference_low: torch.Tensor, exact: torch.Tensor,
                                  name: str, atol: float | None = None) -> None:
    """max|actual - exact| <= 2 * max|reference_low - exact| + atol * (1 + max|exact|)."""
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    atol = ATOL[actual.dtype] if atol is None else atol
    bound = 2 * max_error(reference_low, exact) + atol * (1 + exact.abs().max().item())
    error = max_error(actual, exact)
    assert error <= bound, f"{describe_mismatch(actual, exact, name)}; bound {bound:.3e} (2x reference + scaled atol)"


def _gradients(outputs, inputs, seed_grad):
    return torch.autograd.grad(outputs, inputs, seed_grad, allow_unused=True)


def compare_with_reference(fn_name, make_inputs, dtype, backend, device="cpu", kwargs=None):
    """Run `reference` in fp64 and in dtype and `backend` in dtype on the same inputs; check the output
    and the gradient of every floating-point input by the precision contract's 2x rule."""
    kwargs = kwargs or {}
    base = make_inputs()

    def converted(to_dtype):
        return [t.detach().to(device=device, dtype=to_dtype).requires_grad_() if t is not None and t.is_floating_point()
                else (t.to(device) if t is not None else None) for t in base]

    exact_in, reference_in, backend_in = converted(torch.float64), converted(dtype), converted(dtype)
    exact = getattr(ops, fn_name)(*exact_in, backend="reference", **kwargs)
    low_reference = getattr(ops, fn_name)(*reference_in, backend="reference", **kwargs)
    actual = getattr(ops, fn_name)(*backend_in, backend=backend, **kwargs)
    assert actual.dtype == low_reference.dtype, f"{fn_name}: dtype {actual.dtype} != reference's {low_reference.dtype}"
    assert_within_reference_error(actual, low_reference, exact, f"{fn_name} output")
    seed = torch.randn_like(exact) if exact.dim() else torch.ones_like(exact)
    differentiable = [i for i, t in enumerate(base) if t is not None and t.is_floating_point()]
    exact_grads = _gradients(exact, [exact_in[i] for i in differentiable], seed)
    reference_grads = _gradients(low_reference, [reference_in[i] for i in differentiable], seed.to(low_reference.dtype))
    actual_grads = _gradients(actual, [backend_in[i] for i in differentiable], seed.to(actual.dtype))
    for position, e, r, a in zip(differentiable, exact_grads, reference_grads, actual_grads):
        assert a is not None, f"{fn_name}: no gradient for input {position}"
        assert a.dtype == r.dtype, f"{fn_name}: grad of input {position} has dtype {a.dtype}, expected {r.dtype}"
        assert_within_reference_error(a, r, e, f"{fn_name} grad of input {position}")

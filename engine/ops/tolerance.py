"""The precision contract's rule (ARCHITECTURE.md, "Precision contract"), for the tests and the device check.

A kernel's error against an fp64 computation may be at most 2x the error of the `reference`
backend run in the same (low) precision, plus a small tolerance. The tolerance is scaled by the
largest magnitude of the exact result (about one rounding step of the dtype at that magnitude),
so a gradient summed over many rows is not held to an absolute bound meant for values near 1.

`compare_with_reference` runs an op's forward and the gradient of every floating-point input on
one backend and judges each against the rule; tests/tolerance.py asserts on its verdicts and
engine/check.py reports them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

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


@dataclass(frozen=True)
class Verdict:
    """One tensor (an output or a gradient) judged by the rule.

    error:   max |actual - exact|.
    bound:   2 * max |reference_low - exact| + atol * (1 + max |exact|).
    problem: empty when the tensor passes; else why not (shape, dtype, non-finite, the mismatch).
    """

    name: str
    error: float
    bound: float
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem

    @property
    def ratio(self) -> float:
        """How much of the allowed error is used: <= 1 passes."""
        return self.error / self.bound if self.bound > 0 else float("inf")


def judge(actual: torch.Tensor, reference_low: torch.Tensor, exact: torch.Tensor, name: str,
          atol: float | None = None) -> Verdict:
    """max|actual - exact| <= 2 * max|reference_low - exact| + atol * (1 + max|exact|); atol by actual's dtype."""
    if actual.shape != exact.shape:
        return Verdict(name, float("inf"), 0.0, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}")
    atol = ATOL[actual.dtype] if atol is None else atol
    bound = 2 * max_error(reference_low, exact) + atol * (1 + exact.abs().max().item())
    if not torch.isfinite(actual).all():
        return Verdict(name, float("nan"), bound, f"{name}: non-finite values")
    error = max_error(actual, exact)
    if error <= bound:
        return Verdict(name, error, bound)
    return Verdict(name, error, bound,
                   f"{describe_mismatch(actual, exact, name)}; bound {bound:.3e} (2x reference + scaled atol)")


def compare_with_reference(fn_name: str, make_inputs: Callable[[], list], dtype: torch.dtype, backend: str,
                           device="cpu", kwargs: dict | None = None, *, input_dtype: torch.dtype | None = None,
                           input_dtypes: dict[int, torch.dtype] | None = None, autocast: bool = False,
                           loss_gradient: float = 1.0) -> list[Verdict]:
    """Run `reference` in fp64 and in the low precision and `backend` in it, on the same inputs; judge the
    output and the gradient of every floating-point input by the 2x rule.

    make_inputs:   returns the op's positional tensors (None allowed, e.g. a missing bias).
    dtype:         the precision under test. The floating-point inputs are cast to input_dtype (default
                   dtype); autocast=True runs both low-precision runs under torch.autocast(dtype), as the
                   trainer runs the model (fp32 weights and activations, matmuls in dtype). The rule's
                   slack is then dtype's even where the results come back in fp32.
    input_dtypes:  {position: dtype} for inputs that differ from input_dtype in the low-precision runs,
                   e.g. an fp32 residual stream beside fp16 x, or fp32 LayerNorm parameters.
    loss_gradient: the upstream gradient of a 0-dim output (a loss); other outputs get a random one.
                   A value other than 1 also checks that the backward multiplies by it.
    """
    from engine import ops

    kwargs = kwargs or {}
    input_dtype = input_dtype or dtype
    base = make_inputs()
    low_dtypes = [(input_dtypes or {}).get(position, input_dtype) for position in range(len(base))]
    device_type = torch.device(device).type

    def converted(dtypes):
        return [t.detach().to(device=device, dtype=to_dtype).requires_grad_() if t is not None and t.is_floating_point()
                else (t.to(device) if t is not None else None) for t, to_dtype in zip(base, dtypes)]

    def low_precision():
        return torch.autocast(device_type, dtype=dtype) if autocast else contextlib.nullcontext()

    exact_in = converted([torch.float64] * len(base))
    reference_in, backend_in = converted(low_dtypes), converted(low_dtypes)
    exact = getattr(ops, fn_name)(*exact_in, backend="reference", **kwargs)
    with low_precision():
        low_reference = getattr(ops, fn_name)(*reference_in, backend="reference", **kwargs)
        actual = getattr(ops, fn_name)(*backend_in, backend=backend, **kwargs)
    atol = ATOL[dtype] if autocast else None  # None: the slack of each result's own dtype
    if actual.dtype != low_reference.dtype:
        return [Verdict(f"{fn_name} output", float("inf"), 0.0,
                        f"{fn_name}: dtype {actual.dtype} != reference's {low_reference.dtype}")]
    verdicts = [judge(actual, low_reference, exact, f"{fn_name} output", atol)]
    seed = torch.randn_like(exact) if exact.dim() else torch.full_like(exact, loss_gradient)
    differentiable = [i for i, t in enumerate(base) if t is not None and t.is_floating_point()]

    def gradients(output, inputs):
        with low_precision():
            return torch.autograd.grad(output, [inputs[i] for i in differentiable], seed.to(output.dtype),
                                       allow_unused=True)

    exact_grads = torch.autograd.grad(exact, [exact_in[i] for i in differentiable], seed, allow_unused=True)
    reference_grads = gradients(low_reference, reference_in)
    actual_grads = gradients(actual, backend_in)
    return verdicts + [_judge_gradient(fn_name, position, a, r, e, atol)
                       for position, e, r, a in zip(differentiable, exact_grads, reference_grads, actual_grads)]


def _judge_gradient(fn_name: str, position: int, actual: torch.Tensor | None, reference_low: torch.Tensor,
                    exact: torch.Tensor, atol: float | None) -> Verdict:
    """One input's gradient by the rule, once the backend has given one in the reference's dtype."""
    name = f"{fn_name} grad of input {position}"
    if actual is None:
        return Verdict(name, float("inf"), 0.0, f"{fn_name}: no gradient for input {position}")
    if actual.dtype != reference_low.dtype:
        return Verdict(name, float("inf"), 0.0,
                       f"{fn_name}: grad of input {position} has dtype {actual.dtype}, expected {reference_low.dtype}")
    return judge(actual, reference_low, exact, name, atol)

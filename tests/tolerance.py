"""The precision contract as test assertions: engine/ops/tolerance.py holds the rule (error against
fp64 at most 2x the `reference` backend's error in the same precision, plus a scaled atol), shared
with the device check (engine/check.py); these helpers turn its verdicts into assertion failures."""
from __future__ import annotations

import torch

from engine.ops import tolerance
from engine.ops.tolerance import ATOL, describe_mismatch

__all__ = ["ATOL", "assert_within_reference_error", "compare_with_reference", "describe_mismatch"]


def assert_within_reference_error(actual: torch.Tensor, reference_low: torch.Tensor, exact: torch.Tensor,
                                  name: str, atol: float | None = None) -> None:
    """max|actual - exact| <= 2 * max|reference_low - exact| + atol * (1 + max|exact|)."""
    verdict = tolerance.judge(actual, reference_low, exact, name, atol)
    assert verdict.ok, verdict.problem


def compare_with_reference(fn_name, make_inputs, dtype, backend, device="cpu", kwargs=None, **options):
    """Run `reference` in fp64 and in dtype and `backend` in dtype on the same inputs; assert the output
    and the gradient of every floating-point input pass the precision contract's 2x rule. options: those
    of engine.ops.tolerance.compare_with_reference (input_dtypes, loss_gradient, ...)."""
    for verdict in tolerance.compare_with_reference(fn_name, make_inputs, dtype, backend, device, kwargs, **options):
        assert verdict.ok, verdict.problem

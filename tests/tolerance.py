"""The precision contract as test helpers (ARCHITECTURE.md, "Precision contract").

A kernel's error against an fp64 computation may be at most 2x the error of the `reference`
backend run in the same (low) precision, plus a small tolerance. The tolerance is scaled by the
largest magnitude of the exact result (about one rounding step of the dtype at that magnitude),
so a gradient summed over many rows is not held to an absolute bound meant for values near 1.
"""
from __future__ import annotations

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


def assert_within_reference_error(actual: torch.Tensor, reference_low: torch.Tensor, exact: torch.Tensor,
                                  name: str, atol: float | None = None) -> None:
    """max|actual - exact| <= 2 * max|reference_low - exact| + atol * (1 + max|exact|)."""
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    atol = ATOL[actual.dtype] if atol is None else atol
    bound = 2 * max_error(reference_low, exact) + atol * (1 + exact.abs().max().item())
    error = max_error(actual, exact)
    assert error <= bound, f"{describe_mismatch(actual, exact, name)}; bound {bound:.3e} (2x reference + scaled atol)"

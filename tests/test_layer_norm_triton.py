"""The triton backend's LayerNorm against `reference` run in the same dtype and in fp64 (the precision
contract's 2x rule): output, dx, dweight and dbias for odd row counts and hidden sizes, no bias,
strided and batched input, weights in another dtype, wide rows, bad input. bf16 needs a GPU."""
from __future__ import annotations

import pytest
import torch

import engine.ops.triton.layer_norm  # noqa: F401  (registers torch.ops.engine_triton.layer_norm_*)
from engine import ops
from engine.kernels.layer_norm import MAX_HIDDEN
from tests.tolerance import compare_with_reference

def make_inputs(shape, bias):
    """x with a non-zero mean and spread, and weight / bias away from 1 / 0 so both gradients matter."""
    hidden = shape[-1]
    return [torch.randn(shape) * 3 + 1, 1 + 0.5 * torch.randn(hidden), torch.randn(hidden) if bias else None]


def check_layer_norm(inputs, dtype, param_dtype=None, device="cpu", eps=1e-5):
    """Triton and reference in dtype (weight and bias in param_dtype), reference in fp64, by the 2x rule:
    the output and the gradient of every input."""
    compare_with_reference("layer_norm", lambda: inputs, dtype, "triton", device, {"eps": eps},
                           input_dtypes={1: param_dtype, 2: param_dtype} if param_dtype else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 129])
@pytest.mark.parametrize("hidden,bias", [(96, True), (200, False)])
def test_layer_norm_matches_reference(rows, hidden, bias, dtype):
    check_layer_norm(make_inputs((rows, hidden), bias), dtype)


@pytest.mark.parametrize("hidden", [8192, 5000])
def test_layer_norm_wide_rows(hidden):
    check_layer_norm(make_inputs((3, hidden), True), torch.float32)


def test_layer_norm_batched_input():
    check_layer_norm(make_inputs((2, 33, 64), True), torch.float16)


def test_layer_norm_fp16_input_with_fp32_parameters():
    check_layer_norm(make_inputs((9, 96), True), torch.float16, param_dtype=torch.float32)


def test_layer_norm_strided_rows_and_large_eps():
    """A column slice of a wider tensor (row stride 150, hidden 100), and an eps that matters."""
    x, weight, bias = make_inputs((7, 150), True)
    inputs = [x[:, 25:125], weight[:100], bias[:100]]
    assert inputs[0].stride() == (150, 1)
    check_layer_norm(inputs, torch.float32, eps=0.5)


def test_layer_norm_constant_rows_are_finite():
    """A row with zero variance normalizes to the bias, with finite gradients."""
    x = torch.full((4, 96), 3.0).requires_grad_()
    weight, bias = torch.randn(96).requires_grad_(), torch.randn(96).requires_grad_()
    out = ops.layer_norm(x, weight, bias, backend="triton")
    torch.testing.assert_close(out, bias.detach().expand(4, 96))
    grads = torch.autograd.grad(out, (x, weight, bias), torch.randn(4, 96))
    assert all(torch.isfinite(g).all() for g in grads)


def test_layer_norm_rejects_bad_input():
    weight = torch.ones(MAX_HIDDEN + 1)
    with pytest.raises(ValueError, match=f"hidden size {MAX_HIDDEN + 1} is outside the supported range"):
        ops.layer_norm(torch.randn(2, MAX_HIDDEN + 1), weight, None, backend="triton")
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        ops.layer_norm(torch.randn(2, 16), torch.ones(15), None, backend="triton")
    with pytest.raises(ValueError, match="bias has dtype torch.float16, weight has torch.float32"):
        ops.layer_norm(torch.randn(2, 16), torch.ones(16), torch.zeros(16, dtype=torch.float16), backend="triton")


def test_layer_norm_ops_pass_opcheck():
    x, weight, bias = (t.requires_grad_() for t in make_inputs((5, 40), True))
    torch.library.opcheck(torch.ops.engine_triton.layer_norm_forward, (x, weight, bias, 1e-5))
    torch.library.opcheck(torch.ops.engine_triton.layer_norm_forward, (x, weight, None, 1e-5))
    _, mean, rstd = torch.ops.engine_triton.layer_norm_forward(x, weight, bias, 1e-5)
    torch.library.opcheck(torch.ops.engine_triton.layer_norm_backward,
                          (torch.randn(5, 40), x.detach(), weight.detach(), mean.detach(), rstd.detach(), True))


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("shape,bias", [((1, 96), True), ((129, 200), False), ((8192, 768), True), ((64, 8192), True)])
def test_layer_norm_bf16_on_gpu(shape, bias):
    check_layer_norm(make_inputs(shape, bias), torch.bfloat16, device="cuda")


@pytest.mark.gpu
def test_layer_norm_many_rows_on_gpu():
    """More row blocks than backward programs, so each program walks several of them."""
    check_layer_norm(make_inputs((50_000, 384), True), torch.float16, device="cuda")
    check_layer_norm(make_inputs((8192, 768), True), torch.float32, device="cuda")

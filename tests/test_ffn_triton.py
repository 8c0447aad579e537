"""The triton backend's fused FFN with residual against `reference` run in the same dtype and in fp64
(the precision contract's 2x rule), output and every gradient; dropout, autocast, bad input and
torch.compile tracing. Runs on the CPU through Triton's interpreter; bf16 and the GPT-2 size need a GPU."""
from __future__ import annotations

import pytest
import torch

import engine.ops.triton.ffn  # noqa: F401  (registers torch.ops.engine_triton.ffn_*)
from engine import ops
from engine.ops import reference
from tests.tolerance import assert_within_reference_error, compare_with_reference

INPUT_NAMES = ("x", "w1", "b1", "w2", "b2", "residual")


def make_inputs(rows, d_model, d_ff, bias, leading=()):
    """x, w1, b1, w2, b2, residual with weights scaled like a trained layer (outputs of order 1)."""
    return [torch.randn(*leading, rows, d_model), torch.randn(d_ff, d_model) / d_model**0.5,
            torch.randn(d_ff) * 0.5 if bias else None, torch.randn(d_model, d_ff) / d_ff**0.5,
            torch.randn(d_model) * 0.5 if bias else None, torch.randn(*leading, rows, d_model)]


def converted(inputs, dtype, residual_dtype=None):
    out = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in inputs]
    if residual_dtype is not None:
        out[5] = inputs[5].detach().to(residual_dtype).requires_grad_()
    return out


def check_ffn(inputs, dtype, activation, residual_dtype=None, device="cpu"):
    """Triton and reference in dtype (the residual in residual_dtype), reference in fp64, by the 2x rule:
    the output and the gradient of every input."""
    compare_with_reference("ffn", lambda: inputs, dtype, "triton", device, {"activation": activation},
                           input_dtypes={5: residual_dtype} if residual_dtype else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("rows,d_model,d_ff,bias", [(1, 96, 200, True), (7, 200, 96, False), (129, 96, 200, True)])
def test_ffn_matches_reference(rows, d_model, d_ff, bias, activation, dtype):
    check_ffn(make_inputs(rows, d_model, d_ff, bias), dtype, activation)


def test_ffn_batched_input_and_one_bias():
    """x of shape (B, T, C) as the model passes it; b1 present, b2 absent."""
    inputs = make_inputs(5, 64, 256, True, leading=(2,))
    inputs[4] = None
    check_ffn(inputs, torch.float32, "gelu")


def test_ffn_residual_in_another_dtype():
    """fp16 matmuls with an fp32 residual stream (what autocast produces): y and its residual gradient are fp32."""
    check_ffn(make_inputs(7, 96, 200, True), torch.float16, "gelu_tanh", residual_dtype=torch.float32)


def test_ffn_under_autocast_casts_like_linear():
    inputs = make_inputs(7, 32, 64, True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = ops.ffn(*inputs, backend="triton")
    cast = [t.half() for t in inputs[:5]]
    expected = ops.ffn(*cast, inputs[5], backend="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_ffn_without_grad_matches_and_skips_the_saved_activation():
    inputs = make_inputs(7, 32, 64, True)
    with torch.no_grad():
        out = ops.ffn(*inputs, backend="triton")
    expected = ops.ffn(*inputs, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    _, pre = torch.ops.engine_triton.ffn_forward(inputs[0], *inputs[1:], "gelu", 0.0, None, False)
    assert pre.numel() == 0


def test_ffn_with_only_the_residual_trainable_passes_its_gradient_through():
    x, w1, b1, w2, b2, residual = make_inputs(7, 32, 64, True)
    residual.requires_grad_()
    out = ops.ffn(x, w1, b1, w2, b2, residual, backend="triton")
    grad_out = torch.randn_like(out)
    (grad_residual,) = torch.autograd.grad(out, (residual,), grad_out)
    assert torch.equal(grad_residual, grad_out)


def test_ffn_dropout_mask_scaling_and_gradients():
    """The kept outputs are scaled by 1/(1-p), about p of them are dropped, and the backward uses
    the forward's mask: gradients equal fp64 math with that mask."""
    p = 0.3
    inputs = make_inputs(129, 96, 200, True)
    triton_in = converted(inputs, torch.float32)
    out = ops.ffn(*triton_in, dropout_p=p, backend="triton")
    delta = (out - triton_in[5]).detach()
    kept = delta != 0
    assert abs(1 - kept.double().mean().item() - p) < 0.03

    exact_in = converted(inputs, torch.float64)
    mlp = reference.ffn(*exact_in[:5], torch.zeros_like(exact_in[5]))
    exact = exact_in[5] + mlp * kept / (1 - p)
    assert_within_reference_error(out, exact.float(), exact, "ffn output with dropout")
    grad_out = torch.randn_like(exact)
    exact_grads = torch.autograd.grad(exact, exact_in, grad_out)
    triton_grads = torch.autograd.grad(out, triton_in, grad_out.float())
    for name, e, t in zip(INPUT_NAMES, exact_grads, triton_grads):
        assert_within_reference_error(t, e.float(), e, f"ffn grad of {name} with dropout")


def test_ffn_dropout_follows_torch_seed():
    inputs = make_inputs(7, 32, 64, True)
    torch.manual_seed(5)
    first = ops.ffn(*inputs, dropout_p=0.5, backend="triton")
    second = ops.ffn(*inputs, dropout_p=0.5, backend="triton")
    torch.manual_seed(5)
    again = ops.ffn(*inputs, dropout_p=0.5, backend="triton")
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("kwargs,message", [
    ({"activation": "relu"}, "unknown activation 'relu'"),
    ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
])
def test_ffn_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.ffn(*make_inputs(3, 16, 32, True), backend="triton", **kwargs)


def test_ffn_rejects_mismatched_shapes_and_dtypes():
    x, w1, b1, w2, b2, residual = make_inputs(3, 16, 32, True)
    with pytest.raises(ValueError, match=r"w2 has shape \(16, 31\), expected \(16, 32\)"):
        ops.ffn(x, w1, b1, w2[:, :31], b2, residual, backend="triton")
    with pytest.raises(ValueError, match="w1 has dtype torch.float16, x has torch.float32"):
        ops.ffn(x, w1.half(), b1, w2, b2, residual, backend="triton")
    with pytest.raises(ValueError, match=r"x has shape \(3, 16\) but residual has \(2, 16\)"):
        ops.ffn(x, w1, b1, w2, b2, residual[:2], backend="triton")


def test_ffn_ops_pass_opcheck():
    x, w1, b1, w2, b2, residual = (t.requires_grad_() for t in make_inputs(5, 32, 64, True))
    torch.library.opcheck(torch.ops.engine_triton.ffn_forward, (x, w1, b1, w2, b2, residual, "gelu", 0.0, None, True))
    _, pre = torch.ops.engine_triton.ffn_forward(x, w1, b1, w2, b2, residual, "gelu", 0.0, None, True)
    torch.library.opcheck(torch.ops.engine_triton.ffn_backward,
                          (torch.randn(5, 32), x.detach(), w1.detach(), w2.detach(), pre.detach(), "gelu", 0.0,
                           None, True, True))


def test_ffn_backward_repeats_bitwise():
    # On a GPU this is the check that db1 takes no atomics (the interpreter runs programs in order, so
    # here it only shows the partial-sum reduction is deterministic; the pre-flight checks the PTX).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = 300 if device == "cuda" else 130  # several row tiles of partial sums
    x, w1, b1, w2, b2, residual = (t.to(device) for t in make_inputs(rows, 32, 64, True))
    y, pre = torch.ops.engine_triton.ffn_forward(x, w1, b1, w2, b2, residual, "gelu", 0.0, None, True)
    dy = torch.randn_like(y)
    first = torch.ops.engine_triton.ffn_backward(dy, x, w1, w2, pre, "gelu", 0.0, None, True, True)
    for _ in range(3):
        again = torch.ops.engine_triton.ffn_backward(dy, x, w1, w2, pre, "gelu", 0.0, None, True, True)
        for name, a, b in zip(("dx", "dw1", "db1", "dw2", "db2"), first, again):
            assert torch.equal(a, b), name


def test_ffn_backward_fake_has_the_real_outputs_contiguous_strides():
    # Transposed views of x and the weights: the kernels take any strides, and every gradient comes
    # back contiguous; a fake built with empty_like would keep the views' strides, which Inductor checks.
    x, w1, w2 = torch.randn(32, 5).t(), torch.randn(32, 64).t(), torch.randn(64, 32).t()
    _, pre = torch.ops.engine_triton.ffn_forward(x, w1, None, w2, None, torch.randn(5, 32), "gelu", 0.0, None, True)
    args = (torch.randn(5, 32), x, w1, w2, pre, "gelu", 0.0, None, False, False)
    real = torch.ops.engine_triton.ffn_backward(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = torch.ops.engine_triton.ffn_backward(*fake_args)
    for name, r, f in zip(("dx", "dw1", "db1", "dw2", "db2"), real, fake):
        assert r.is_contiguous(), name
        assert (f.shape, f.stride(), f.dtype) == (r.shape, r.stride(), r.dtype), name
    torch.library.opcheck(torch.ops.engine_triton.ffn_backward, args)


def test_triton_ops_trace_with_torch_compile_fullgraph():
    """LayerNorm -> FFN -> fused LM head loss, compiled with fullgraph=True (aot_eager: dynamo and
    AOTAutograd trace the custom ops and their backward without inductor's C++ build), forward and backward."""
    torch._dynamo.reset()
    x, w1, b1, w2, b2, _ = make_inputs(6, 32, 64, True)
    ln_w, ln_b, head = torch.randn(32), torch.randn(32), torch.randn(65, 32) * 0.2
    params = [t.requires_grad_() for t in (x, w1, b1, w2, b2, ln_w, ln_b, head)]
    targets = torch.randint(0, 65, (6,))
    targets[0] = -1

    def step(x, w1, b1, w2, b2, ln_w, ln_b, head):
        h = ops.ffn(ops.layer_norm(x, ln_w, ln_b, backend="triton"), w1, b1, w2, b2, x, backend="triton")
        return ops.linear_cross_entropy(h, head, targets, backend="triton")

    # Eager first: it also fills the registry's cache, whose first lookup takes a lock dynamo cannot trace.
    expected = step(*params)
    expected_grads = torch.autograd.grad(expected, params)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*params)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("rows,d_model,d_ff,bias", [(7, 96, 200, True), (129, 200, 96, False), (8192, 768, 3072, True)])
def test_ffn_bf16_on_gpu(rows, d_model, d_ff, bias, activation):
    check_ffn(make_inputs(rows, d_model, d_ff, bias), torch.bfloat16, activation, device="cuda")


@pytest.mark.gpu
def test_ffn_fp16_and_fp32_on_gpu():
    check_ffn(make_inputs(1000, 256, 1024, True), torch.float16, "gelu", device="cuda")
    check_ffn(make_inputs(1000, 256, 1024, True), torch.float32, "gelu_tanh", device="cuda")

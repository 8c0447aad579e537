"""The triton backend's fused attention (kernels/attention.py) against `reference` and fp64.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), which
is slow and computes bf16 tl.dot wrongly: the CPU cases are a sampled set covering every T in
{1, 7, 64, 129, 300}, every head dim in {16, 32, 64, 128} and both fp32 and fp16, with B and H of 1
and more. The `gpu`-marked tests add bf16, long sequences, bitwise repeatability (races) and the
linear-in-T memory check (the budgeted ones on the target bf16 causal D = 128 kind, the `slow`
ones on the rest). Every case checks the output and the gradients of q, k and v with the
precision contract's rule (tests/tolerance.py): error against fp64 at most 2x the error of the
reference backend in the same dtype, plus a small tolerance.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from engine import ops
from engine.ops.triton.attention import attention_backward_op, attention_forward_op
from tests.tolerance import compare_with_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton 3.6's interpreter turns loop bounds derived from tl.program_id into Python ints through a
# numpy conversion that numpy 2.x deprecates (one warning per loop); the kernels are not at fault.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.usefixtures("single_thread"),
]


def make_inputs(B, H, T_q, D, T_k=None, device=DEVICE):
    """fp32 q (B, H, T_q, D), k and v (B, H, T_k, D), and an output gradient, from the test's seed."""
    T_k = T_q if T_k is None else T_k
    q = torch.randn(B, H, T_q, D, device=device)
    k = torch.randn(B, H, T_k, D, device=device)
    v = torch.randn(B, H, T_k, D, device=device)
    grad_out = torch.randn(B, H, T_q, D, device=device)
    return q, k, v, grad_out


def run(backend, q, k, v, grad_out, dtype, causal=True, scale=None):
    """Output and (dq, dk, dv) of one backend, with the inputs converted to dtype."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = ops.attention(q, k, v, causal=causal, scale=scale, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    return out, grads


def check_against_reference(B, H, T_q, D, dtype, causal=True, T_k=None, scale=None):
    """The output and dq, dk, dv of the triton backend in dtype, by the 2x rule."""
    compare_with_reference("attention", lambda: list(make_inputs(B, H, T_q, D, T_k)[:3]), dtype, "triton", DEVICE,
                           {"causal": causal, "scale": scale})


# (B, H, T, D): every T and every D in both dtypes, B and H of 1 and more.
CPU_CASES = [
    (1, 1, 1, 16, torch.float32),
    (2, 3, 7, 32, torch.float32),
    (1, 2, 64, 64, torch.float32),
    (2, 1, 129, 128, torch.float32),
    (1, 2, 300, 16, torch.float32),
    (1, 1, 1, 128, torch.float16),
    (2, 2, 7, 64, torch.float16),
    (1, 2, 64, 16, torch.float16),
    (2, 1, 129, 32, torch.float16),
    (1, 1, 300, 128, torch.float16),
]


@pytest.mark.parametrize("B,H,T,D,dtype", CPU_CASES)
def test_causal_attention_matches_reference(B, H, T, D, dtype):
    check_against_reference(B, H, T, D, dtype, causal=True)


@pytest.mark.parametrize("B,H,T,D,dtype", [(2, 2, 129, 64, torch.float32), (1, 2, 300, 32, torch.float16)])
def test_non_causal_attention_matches_reference(B, H, T, D, dtype):
    check_against_reference(B, H, T, D, dtype, causal=False)


@pytest.mark.parametrize("T_q,T_k,D,dtype", [(1, 77, 32, torch.float32), (5, 130, 64, torch.float16),
                                             (100, 3, 16, torch.float32)])
def test_different_query_and_key_lengths(T_q, T_k, D, dtype):
    # A decode step over a KV cache: one new query against every cached key, no mask.
    check_against_reference(2, 2, T_q, D, dtype, causal=False, T_k=T_k)
    assert_decode_runs_triton(2, 2, T_q, T_k, D, dtype)


def assert_decode_runs_triton(B, H, T_q, T_k, D, dtype):
    """ops.attention(backend="triton") with T_q != T_k gives the Triton kernel's bits (it once ran SDPA)."""
    q, k, v, _ = (t.to(dtype) for t in make_inputs(B, H, T_q, D, T_k))
    kernel_out, _ = attention_forward_op(q, k, v, False, 1 / math.sqrt(D))
    assert torch.equal(ops.attention(q, k, v, causal=False, backend="triton"), kernel_out)


def test_non_causal_backward_ignores_the_ragged_last_key_block_when_lse_is_very_negative():
    # Scores near -20 everywhere give lse about -15.7 < -11: a key row past T_k (loaded as zeros,
    # score 0) would have P = exp(15.7) = 7e6, which overflows fp16 in dS and times its zero K row
    # makes NaN in every valid row of dQ unless P is masked there. T = 70 leaves a ragged block.
    D, T_q, T_k = 16, 70, 70
    q = torch.full((1, 1, T_q, D), 2.0) + 0.1 * torch.randn(1, 1, T_q, D)
    k = torch.full((1, 1, T_k, D), -2.5) + 0.1 * torch.randn(1, 1, T_k, D)  # q . k / 4 = -20
    v = torch.randn(1, 1, T_k, D)
    compare_with_reference("attention", lambda: [q, k, v], torch.float16, "triton", kwargs={"causal": False})


def test_explicit_scale():
    check_against_reference(1, 2, 65, 32, torch.float32, scale=0.5)


def test_lse_is_the_log_sum_exp_of_the_scores():
    q, k, v, _ = make_inputs(1, 2, 70, 32)
    scale = 1 / math.sqrt(32)
    _, lse = attention_forward_op(q, k, v, True, scale)
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    scores = scores.masked_fill(torch.ones(70, 70, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 70)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), rtol=0, atol=1e-5)


def test_non_contiguous_inputs_give_the_same_result():
    B, H, T, D = 2, 2, 70, 32
    q, k, v, grad_out = make_inputs(B, H, T, D)
    contiguous_out, contiguous_grads = run("triton", q, k, v, grad_out, torch.float32)
    # The model's layout: (B, T, H, D) viewed as (B, H, T, D); and a view whose last dim is strided.
    views = [
        [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)],
        [t.transpose(-2, -1).contiguous().transpose(-2, -1) for t in (q, k, v)],
    ]
    for q_view, k_view, v_view in views:
        assert not q_view.is_contiguous()
        out, grads = run("triton", q_view, k_view, v_view, grad_out.transpose(1, 2).contiguous().transpose(1, 2),
                         torch.float32)
        assert torch.equal(out, contiguous_out)
        for grad, expected in zip(grads, contiguous_grads):
            assert torch.equal(grad, expected)


def test_repeated_runs_are_bitwise_identical():
    q, k, v, grad_out = make_inputs(2, 2, 129, 32)
    first_out, first_grads = run("triton", q, k, v, grad_out, torch.float16)
    second_out, second_grads = run("triton", q, k, v, grad_out, torch.float16)
    assert torch.equal(first_out, second_out)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))


@pytest.mark.parametrize("D", [8, 48, 96, 256])
def test_unsupported_head_dim_is_a_clear_error(D):
    q = torch.randn(1, 1, 4, D, device=DEVICE)
    with pytest.raises(ValueError, match=rf"head dimension D={D} .*supported: \(16, 32, 64, 128\)"):
        ops.attention(q, q, q, backend="triton")


def test_attention_dropout_is_refused():
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"backend 'triton' does not implement dropout in 'attention'"):
        ops.attention(q, q, q, dropout_p=0.1, backend="triton")  # the registry refuses first
    from engine.ops.triton.attention import attention as triton_attention

    with pytest.raises(ValueError, match=r"does not implement attention dropout \(got dropout_p=0.1\)"):
        triton_attention(q, q, q, dropout_p=0.1)  # and so does the kernel's wrapper


def test_bad_inputs_are_clear_errors():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="supported: fp32, fp16, bf16"):
        ops.attention(q.double(), q.double(), q.double(), backend="triton")
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        ops.attention(q[:, :, :3], q, q, backend="triton")
    with pytest.raises(ValueError, match="do not match"):
        ops.attention(q, q[:, :1], q[:, :1], causal=False, backend="triton")
    with pytest.raises(ValueError, match="same dtype"):
        ops.attention(q, q.half(), q, backend="triton")
    with pytest.raises(ValueError, match=r"must have shape \(B, H, T, D\)"):
        ops.attention(q[0], q[0], q[0], backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's bf16 refusal applies without a GPU")
def test_bf16_is_refused_under_the_interpreter():
    q = torch.randn(1, 1, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 attention is not supported under TRITON_INTERPRET=1"):
        ops.attention(q, q, q, backend="triton")


# Compiling every kernel and autotune candidate for sm_90 and sm_80 is tests/test_preflight.py's job.


def test_custom_ops_pass_opcheck():
    q, k, v, grad_out = make_inputs(1, 2, 20, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(attention_forward_op, (q, k, v, True, 0.25))
    out, lse = attention_forward_op(q.detach(), k.detach(), v.detach(), True, 0.25)
    torch.library.opcheck(attention_backward_op, (grad_out, q.detach(), k.detach(), v.detach(), out, lse, True, 0.25))


def test_torch_compile_fullgraph_traces_the_op():
    torch._dynamo.reset()
    q, k, v, grad_out = make_inputs(1, 2, 33, 16)

    def attend(q, k, v):
        return ops.attention(q, k, v, backend="triton") * 2.0

    # Eager first: it also loads the backend, an import Dynamo would refuse to trace. Inductor (the
    # default) then traces the custom ops through their fake and autograd registrations and
    # generates code around them (about 10 s cold on a 2-core CPU).
    eager_out, eager_grads = run("triton", q, k, v, grad_out, torch.float32)
    compiled = torch.compile(attend, fullgraph=True)
    q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
    out = compiled(q2, k2, v2)
    grads = torch.autograd.grad(out, (q2, k2, v2), grad_out)
    torch.testing.assert_close(out, eager_out * 2.0, rtol=0, atol=0)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected * 2.0, rtol=0, atol=0)


def test_autocast_casts_the_inputs():
    q, k, v, _ = make_inputs(1, 2, 16, 16)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = ops.attention(q, k, v, backend="triton")
    assert out.dtype == torch.float16
    expected = ops.attention(q.half(), k.half(), v.half(), backend="triton")
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------- GPU only

# The first call per (D, dtype, causal) compiles and times every autotuning candidate (about ten
# kernels): the budgeted GPU check (bench/gpu_check.sh) has room for one such set. The unmarked GPU
# tests therefore stay on the target kind, bf16 causal D = 128 (one set, then cached); the `slow`
# ones add the other head dims, dtypes, the non-causal mask and decode lengths, a set each.


def check_repeats_bitwise(B, H, T, D, dtype, causal):
    q, k, v, grad_out = make_inputs(B, H, T, D)
    first_out, first_grads = run("triton", q, k, v, grad_out, dtype, causal)
    second_out, second_grads = run("triton", q, k, v, grad_out, dtype, causal)
    assert torch.equal(first_out, second_out), "forward differs between two identical runs (race?)"
    for name, a, b in zip(("dq", "dk", "dv"), first_grads, second_grads):
        assert torch.equal(a, b), f"{name} differs between two identical runs (race?)"


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,T", [(1, 1, 1), (2, 3, 129), (1, 4, 1000), (1, 2, 4096)])
def test_gpu_bf16_causal_d128_matches_reference_and_repeats_bitwise(B, H, T):
    check_against_reference(B, H, T, 128, torch.bfloat16, causal=True)
    check_repeats_bitwise(B, H, T, 128, torch.bfloat16, causal=True)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 16), (2, 3, 7, 32), (2, 4, 64, 64), (2, 2, 300, 64),
                                     (2, 2, 2048, 64), (1, 2, 4096, 16)])
def test_gpu_bf16_causal_small_head_dims(B, H, T, D):
    check_against_reference(B, H, T, D, torch.bfloat16, causal=True)
    check_repeats_bitwise(B, H, T, D, torch.bfloat16, causal=True)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype,causal", [(torch.bfloat16, False), (torch.float16, True), (torch.float32, True)])
@pytest.mark.parametrize("B,H,T,D", [(2, 2, 300, 64), (1, 2, 1000, 128)])
def test_gpu_other_dtypes_and_masks_match_reference_and_repeat_bitwise(B, H, T, D, dtype, causal):
    check_against_reference(B, H, T, D, dtype, causal=causal)
    check_repeats_bitwise(B, H, T, D, dtype, causal)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("T_q,T_k", [(1, 4097), (3, 1000)])
def test_gpu_decode_lengths(T_q, T_k):
    check_against_reference(2, 4, T_q, 128, torch.bfloat16, causal=False, T_k=T_k)
    assert_decode_runs_triton(2, 4, T_q, T_k, 128, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_T():
    # At T = 4096 one head's T x T scores in bf16 take 32 MiB, 32x that head's q. Forward + backward
    # must stay within 8x the size of q: O, dQ, dK and dV take 4x, the fp32 statistics a little more.
    B, H, T, D = 1, 4, 4096, 128
    q, k, v, grad_out = (t.to(torch.bfloat16) for t in make_inputs(B, H, T, D))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    run("triton", q, k, v, grad_out, torch.bfloat16)  # autotune and compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = ops.attention(q, k, v, backend="triton")
    out.backward(grad_out)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    tensor_bytes = q.numel() * q.element_size()
    assert extra <= 8 * tensor_bytes, f"fwd+bwd used {extra / 2**20:.1f} MiB beyond its inputs"


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_fullgraph():
    torch._dynamo.reset()
    q, k, v, grad_out = (t.to(torch.bfloat16) for t in make_inputs(2, 4, 200, 128))

    def attend(q, k, v):
        return ops.attention(q, k, v, backend="triton") * 2.0

    compiled = torch.compile(attend, fullgraph=True)
    eager_out, eager_grads = run("triton", q, k, v, grad_out, torch.bfloat16)
    q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
    out = compiled(q2, k2, v2)
    grads = torch.autograd.grad(out, (q2, k2, v2), grad_out)
    torch.testing.assert_close(out, eager_out * 2.0)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected * 2.0)

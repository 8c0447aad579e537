"""The triton backend's cross-entropy and fused linear cross-entropy against `reference` run in the
same dtype and in fp64 (the precision contract's 2x rule): loss and every gradient, odd row counts,
vocabularies of 65 and 1000, ignore_index present and absent, several chunks, no_grad, autocast, bad
input. bf16 and the GPT-2 vocabulary's memory check need a GPU."""
from __future__ import annotations

import pytest
import torch

import engine.ops.triton.cross_entropy  # noqa: F401  (registers torch.ops.engine_triton.*cross_entropy*)
from engine import ops
from engine.kernels import cross_entropy as kernel
from tests.tolerance import assert_within_reference_error, compare_with_reference


def make_targets(rows, vocab, ignore, ignore_index=-1, device="cpu"):
    targets = torch.randint(0, vocab, (rows,), device=device)
    if ignore:
        targets[::3] = ignore_index
    return targets


def check_against_reference(op, inputs, dtype, device="cpu", **kwargs):
    """op on triton and reference in dtype, reference in fp64, by the 2x rule: the loss and the gradient of
    every float input, for an upstream gradient other than 1."""
    compare_with_reference(op, lambda: inputs, dtype, "triton", device, kwargs, loss_gradient=1.7)


# ----------------------------------------------------------------------------- cross_entropy

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,vocab,ignore", [(1, 65, False), (7, 1000, True), (129, 65, True), (129, 1000, False)])
def test_cross_entropy_matches_reference(rows, vocab, ignore, dtype):
    inputs = [torch.randn(rows, vocab) * 3, make_targets(rows, vocab, ignore)]
    check_against_reference("cross_entropy", inputs, dtype)


def test_cross_entropy_other_ignore_index_and_int32_targets():
    targets = make_targets(20, 65, True, ignore_index=7).to(torch.int32)
    check_against_reference("cross_entropy", [torch.randn(20, 65), targets], torch.float32, ignore_index=7)


def test_cross_entropy_leaves_the_logits_alone_and_reads_strided_rows():
    logits = torch.randn(9, 130)[:, :65].requires_grad_()  # row stride 130
    targets = make_targets(9, 65, True)
    before = logits.detach().clone()
    loss = ops.cross_entropy(logits, targets, backend="triton")
    loss.backward()
    assert torch.equal(logits.detach(), before)
    reference_logits = before.clone().requires_grad_()
    expected = ops.cross_entropy(reference_logits, targets, backend="reference")
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits.grad, reference_logits.grad)


def test_cross_entropy_extreme_logits_stay_finite():
    logits = torch.randn(4, 1000) * 40
    logits[0, 3] = 1e4
    check_against_reference("cross_entropy", [logits, torch.tensor([3, 5, 999, 0])], torch.float32)


def test_cross_entropy_all_ignored_is_nan_like_the_reference():
    logits = torch.randn(3, 65, requires_grad=True)
    targets = torch.full((3,), -1)
    loss = ops.cross_entropy(logits, targets, backend="triton")
    assert torch.isnan(loss) and torch.isnan(ops.cross_entropy(logits, targets, backend="reference"))
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_out_of_range_target_gives_nan():
    loss = ops.cross_entropy(torch.randn(3, 65), torch.tensor([1, 65, 2]), backend="triton")
    assert torch.isnan(loss)


def test_cross_entropy_rejects_bad_input():
    with pytest.raises(ValueError, match=r"targets must have shape \(4,\), got \(3,\)"):
        ops.cross_entropy(torch.randn(4, 10), torch.zeros(3, dtype=torch.long), backend="triton")
    with pytest.raises(ValueError, match="targets must be int64 or int32"):
        ops.cross_entropy(torch.randn(4, 10), torch.zeros(4), backend="triton")
    with pytest.raises(ValueError, match=r"logits must be \(rows, vocab\)"):
        ops.cross_entropy(torch.randn(4), torch.zeros(4, dtype=torch.long), backend="triton")


# ----------------------------------------------------------------------------- linear_cross_entropy

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,d_model,vocab,ignore", [(1, 96, 65, False), (7, 200, 1000, True), (129, 96, 1000, True)])
def test_linear_cross_entropy_matches_reference(rows, d_model, vocab, ignore, dtype):
    inputs = [torch.randn(rows, d_model), torch.randn(vocab, d_model) / d_model**0.5 * 2,
              make_targets(rows, vocab, ignore)]
    check_against_reference("linear_cross_entropy", inputs, dtype)


def test_linear_cross_entropy_in_many_chunks_equals_one_chunk():
    """129 rows in chunks of 32 (the last one ragged) in fp16: the same loss and gradients as in one
    chunk, and within the 2x rule of the reference (dweight sums the chunks in fp32)."""
    x, weight = torch.randn(129, 96).half(), (torch.randn(1000, 96) / 5).half()
    targets = make_targets(129, 1000, True)
    def mean_gradients(loss, dx, dweight, divisor):  # the returned gradients are S * n_valid times the mean's
        return loss, (dx.float() / divisor).half(), (dweight / divisor).half()

    whole = mean_gradients(*kernel.linear_cross_entropy_forward(x, weight, targets, chunk_rows=129))
    chunked = mean_gradients(*kernel.linear_cross_entropy_forward(x, weight, targets, chunk_rows=32))
    for name, a, b in zip(("loss", "dx", "dweight"), whole, chunked):
        torch.testing.assert_close(b, a, msg=name)
    exact_x, exact_w = x.double().requires_grad_(), weight.double().requires_grad_()
    low_x, low_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    exact = ops.linear_cross_entropy(exact_x, exact_w, targets, backend="reference")
    low = ops.linear_cross_entropy(low_x, low_w, targets, backend="reference")
    assert_within_reference_error(chunked[0], low, exact, "chunked loss")
    for name, t, r, e in zip(("dx", "dweight"), chunked[1:], torch.autograd.grad(low, (low_x, low_w)),
                             torch.autograd.grad(exact, (exact_x, exact_w))):
        assert_within_reference_error(t, r, e, f"chunked {name}")


def test_linear_cross_entropy_computes_only_the_gradients_needed():
    x, weight, targets = torch.randn(7, 32), torch.randn(65, 32) * 0.3, make_targets(7, 65, True)
    expected = ops.linear_cross_entropy(x, weight, targets, backend="reference")
    with torch.no_grad():
        loss = ops.linear_cross_entropy(x.requires_grad_(), weight.requires_grad_(), targets, backend="triton")
    torch.testing.assert_close(loss, expected)
    loss, dx, dweight, _ = torch.ops.engine_triton.linear_cross_entropy(x, weight, targets, -1, False, False)
    assert dx.numel() == 0 and dweight.numel() == 0

    frozen = weight.detach()  # a frozen LM head: only x gets a gradient
    loss = ops.linear_cross_entropy(x, frozen, targets, backend="triton")
    (grad_x,) = torch.autograd.grad(loss, (x,))
    x_ref = x.detach().requires_grad_()
    (expected_x,) = torch.autograd.grad(ops.linear_cross_entropy(x_ref, frozen, targets, backend="reference"), (x_ref,))
    torch.testing.assert_close(grad_x, expected_x)


def test_linear_cross_entropy_under_autocast_runs_in_the_autocast_dtype():
    x, weight, targets = torch.randn(7, 32), torch.randn(65, 32) * 0.3, make_targets(7, 65, False)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = ops.linear_cross_entropy(x, weight, targets, backend="triton")
    expected = ops.linear_cross_entropy(x.half(), weight.half(), targets, backend="triton")
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_fp16_training_keeps_the_lm_head_gradient_of_unlikely_words():
    """fp16 training (fp32 weights under fp16 autocast, the loss times a GradScaler-like 2^16): the
    fused op's weight gradient matches the unfused path (logits, then cross-entropy) by the 2x rule,
    also on the rows of words no target names. Those rows' gradient is sum_n p_nj x_n / N with p_nj
    about 1e-6 (peaked logits): stored in fp16 at 1/N before the loss scale, p_nj / N flushes to zero."""
    N, d, V, loss_scale = 64, 16, 512, 2.0**16
    targets = torch.randint(0, d, (N,))  # words d.. are never a target
    weight = torch.cat([torch.eye(d), 0.01 * torch.randn(V - d, d)])
    x = 14 * torch.eye(d)[targets] + 0.01 * torch.randn(N, d)  # target logit 14, the others about 0: p about 1e-6

    def lm_head_gradient(backend, dtype, fused):
        w = weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float64):
            inputs = (x.double(), w.double()) if dtype == torch.float64 else (x, w)
            if fused:
                loss = ops.linear_cross_entropy(*inputs, targets, backend=backend)
            else:
                logits = torch.nn.functional.linear(*inputs)
                loss = ops.cross_entropy(logits, targets, backend=backend)
        (loss * loss_scale).backward()
        return (w.grad / loss_scale).double()

    exact = lm_head_gradient("reference", torch.float64, fused=False)
    unfused = lm_head_gradient("reference", torch.float16, fused=False)
    fused = lm_head_gradient("triton", torch.float16, fused=True)
    unlikely = slice(d, V)
    assert exact[unlikely].abs().max() > 0
    assert (fused[unlikely] != 0).any(), "the gradient of words no target names flushed to zero"
    assert_within_reference_error(fused[unlikely], unfused[unlikely], exact[unlikely],
                                  "LM head gradient, untargeted words", atol=1e-3 * exact[unlikely].abs().max().item())
    assert_within_reference_error(fused, unfused, exact, "LM head gradient")


def test_linear_cross_entropy_rejects_bad_input():
    with pytest.raises(ValueError, match=r"x must be \(N, d\) and weight \(V, d\)"):
        ops.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long),
                                 backend="triton")
    with pytest.raises(ValueError, match="x and weight must share a dtype"):
        ops.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8).half(), torch.zeros(4, dtype=torch.long),
                                 backend="triton")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        kernel.linear_cross_entropy_forward(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long),
                                            chunk_rows=0)


def test_default_chunk_rows():
    assert kernel.default_chunk_rows(8192, 50257) == 1024
    assert kernel.default_chunk_rows(100, 50257) == 100
    assert kernel.default_chunk_rows(10, 2**27) == 1


def test_cross_entropy_ops_pass_opcheck():
    logits, targets = torch.randn(5, 65, requires_grad=True), make_targets(5, 65, True)
    torch.library.opcheck(torch.ops.engine_triton.cross_entropy_forward, (logits, targets, -1))
    _, lse = torch.ops.engine_triton.cross_entropy_forward(logits, targets, -1)
    torch.library.opcheck(torch.ops.engine_triton.cross_entropy_backward,
                          (torch.tensor(1.0), logits.detach(), targets, lse.detach(), -1))
    x, weight = torch.randn(5, 16, requires_grad=True), torch.randn(65, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.engine_triton.linear_cross_entropy, (x, weight, targets, -1, True, True))


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("rows,vocab,ignore", [(7, 1000, True), (129, 65, False), (4096, 50257, True)])
def test_cross_entropy_bf16_on_gpu(rows, vocab, ignore):
    inputs = [torch.randn(rows, vocab) * 3, make_targets(rows, vocab, ignore)]
    check_against_reference("cross_entropy", inputs, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rows,d_model,vocab", [(129, 96, 1000), (8192, 768, 50257)])
def test_linear_cross_entropy_bf16_on_gpu(rows, d_model, vocab):
    inputs = [torch.randn(rows, d_model), torch.randn(vocab, d_model) / d_model**0.5 * 2,
              make_targets(rows, vocab, True)]
    check_against_reference("linear_cross_entropy", inputs, torch.bfloat16, device="cuda")


def _peak_loss_memory(backend, x, weight, targets):
    """Peak bytes allocated above the inputs during forward and backward of the loss."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    loss = ops.linear_cross_entropy(x, weight, targets, backend=backend)
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline, loss.detach()


@pytest.mark.gpu
def test_linear_cross_entropy_gpt2_vocab_uses_a_third_of_torch_memory():
    """8192 tokens, d_model 768, vocabulary 50257 in bf16: the fused loss's peak memory (forward and
    backward, gradients included) is at most a third of the `torch` backend's."""
    x = torch.randn(8192, 768, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(50257, 768, device="cuda") * 0.02).to(torch.bfloat16)
    targets = make_targets(8192, 50257, True, device="cuda")
    _peak_loss_memory("triton", x, weight, targets)  # autotuning and compilation outside the measurement
    torch_peak, torch_loss = _peak_loss_memory("torch", x, weight, targets)
    triton_peak, triton_loss = _peak_loss_memory("triton", x, weight, targets)
    torch.testing.assert_close(triton_loss, torch_loss, rtol=1e-2, atol=1e-2)
    assert triton_peak <= torch_peak / 3, f"triton peak {triton_peak / 2**20:.0f} MiB, torch {torch_peak / 2**20:.0f} MiB"

"""The compiled ops of engine._C: the `cpp` backend (CPU kernels) against `reference` and fp64 for every
op and gradient, torch.library.opcheck of every op, torch.compile(fullgraph=True), a convergence run,
each instruction-set variant of the kernels, the input checks; `gpu`-marked tests do the same for the
`cuda` backend. Everything here skips, with the reason, when engine._C is not built."""
from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine import ops
from engine.model import GPT, GPTConfig
from engine.ops import extension
from tests import tolerance
from tests.tolerance import describe_mismatch

MODULE, UNAVAILABLE_REASON = extension.load()
pytestmark = pytest.mark.skipif(MODULE is None, reason=f"engine._C unavailable: {UNAVAILABLE_REASON}")

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PROJECT_ROOT = Path(__file__).resolve().parents[1]


# The 2x-rule comparison against reference and fp64, on the cpp backend unless a test names another.
compare_with_reference = functools.partial(tolerance.compare_with_reference, backend="cpp")


# ------------------------------------------------------------------------ ops vs reference

ATTENTION_SHAPES = [(1, 1, 1, 16), (2, 3, 37, 32), (1, 2, 64, 64), (2, 2, 130, 48), (1, 1, 200, 80)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_matches_reference(shape, causal, dtype):
    compare_with_reference("attention", lambda: [torch.randn(shape) for _ in range(3)], dtype,
                           kwargs={"causal": causal})


def test_attention_reads_transposed_views_without_copies():
    # The model's q, k, v are (B, T, H, D) slices of one projection, viewed as (B, H, T, D).
    qkv = torch.randn(2, 70, 3, 4, 32, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out = ops.attention(q, k, v, backend="cpp")
    (grad,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    contiguous = qkv.detach().clone().requires_grad_()
    q2, k2, v2 = (contiguous[:, :, i].transpose(1, 2).contiguous() for i in range(3))
    out2 = ops.attention(q2, k2, v2, backend="cpp")
    (grad2,) = torch.autograd.grad(out2, contiguous, torch.ones_like(out2))
    assert torch.equal(out, out2)
    assert torch.equal(grad, grad2)


def test_attention_with_explicit_scale_and_large_scores():
    # Scores of size ~40 exercise the running-max rescaling of the online softmax.
    compare_with_reference("attention", lambda: [torch.randn(2, 2, 150, 32) * 3 for _ in range(3)], torch.float32,
                           kwargs={"causal": True, "scale": 0.7})


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape,d_ff,bias", [((1, 16), 64, True), ((7, 96), 200, True), ((2, 5, 24), 40, False)])
def test_ffn_matches_reference(shape, d_ff, bias, activation, dtype):
    d_model = shape[-1]

    def make():
        return [torch.randn(shape), torch.randn(d_ff, d_model) * 0.2, torch.randn(d_ff) if bias else None,
                torch.randn(d_model, d_ff) * 0.2, torch.randn(d_model) if bias else None, torch.randn(shape)]
    compare_with_reference("ffn", make, dtype, kwargs={"activation": activation})


def test_gelu_over_a_wide_range_of_inputs():
    # Pre-activations from -12 to 12 cover both tails of erf and tanh.
    def make():
        return [torch.linspace(-12, 12, 999).reshape(9, 111), torch.eye(111) * 1.0, torch.zeros(111),
                torch.eye(111) * 1.0, None, torch.zeros(9, 111)]
    for activation in ("gelu", "gelu_tanh"):
        compare_with_reference("ffn", make, torch.float32, kwargs={"activation": activation})


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape,bias", [((1, 96), True), ((7, 200), True), ((129, 64), False), ((2, 3, 40), True)])
def test_layer_norm_matches_reference(shape, bias, dtype):
    hidden = shape[-1]
    compare_with_reference("layer_norm", lambda: [torch.randn(shape) * 3 + 1, torch.randn(hidden),
                                                  torch.randn(hidden) if bias else None], dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("rows,vocab,ignore", [(1, 65, False), (7, 1000, True), (129, 65, True)])
def test_cross_entropy_matches_reference(rows, vocab, ignore, dtype):
    def make():
        targets = torch.randint(0, vocab, (rows,))
        if ignore:
            targets[::3] = -100
        return [torch.randn(rows, vocab) * 2, targets]
    compare_with_reference("cross_entropy", make, dtype, kwargs={"ignore_index": -100})


def test_cross_entropy_with_every_row_ignored_is_nan_like_reference():
    logits, targets = torch.randn(3, 5), torch.full((3,), -1)
    assert torch.isnan(ops.cross_entropy(logits, targets, backend="cpp"))
    assert torch.isnan(ops.cross_entropy(logits, targets, backend="reference"))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_linear_cross_entropy_matches_reference(dtype):
    def make():
        targets = torch.randint(0, 65, (9,))
        targets[2] = -1
        return [torch.randn(9, 32), torch.randn(65, 32) * 0.3, targets]
    compare_with_reference("linear_cross_entropy", make, dtype)


def test_fp16_linear_cross_entropy_keeps_small_gradients_under_loss_scaling():
    """GradScaler multiplies the loss by 2^16 so that fp16 gradients of size p_j / N do not flush to zero. The
    extension's LM head computes its gradient in the backward, from the scaled upstream gradient (nothing is
    stored at 1/N in the forward), so the rare tokens' weight rows keep their gradient. Issue 19 item 4 is about
    a fused kernel that stored that gradient in fp16 at 1/N; this is the same check for ours."""
    scale = 2.0 ** 16
    N, d, V = 16, 32, 512
    x = torch.randn(N, d, dtype=torch.float64)
    weight = torch.randn(V, d, dtype=torch.float64) * 2  # logits of size ~10: most p_j / N are below 6e-8
    targets = torch.randint(0, V, (N,))

    def weight_grad(backend, dtype):
        w = weight.to(dtype).requires_grad_()
        loss = ops.linear_cross_entropy(x.to(dtype), w, targets, backend=backend)
        (grad,) = torch.autograd.grad(loss * scale, w)
        return grad.double() / scale  # unscaled in fp64, as GradScaler unscales into the fp32 master weights

    exact, low, actual = weight_grad("reference", torch.float64), weight_grad("reference", torch.float16), \
        weight_grad("cpp", torch.float16)
    probabilities = torch.softmax(x @ weight.t(), dim=-1) / N
    assert (probabilities < 6e-8).float().mean() > 0.5, "the test needs gradients that would flush at 1/N in fp16"
    representable = (exact.abs() * scale > 1e-3).any(dim=1)  # rows whose scaled gradient fp16 holds easily
    flushed = (actual == 0).all(dim=1) & representable
    assert representable.sum() > V // 4 and not flushed.any(), f"{int(flushed.sum())} weight rows lost their gradient"
    tolerance.assert_within_reference_error(actual, low, exact, "fp16 LM-head weight gradient",
                                            atol=tolerance.ATOL[torch.float16])


def _ffn_parameters():
    torch.manual_seed(0)
    x, residual = torch.randn(6, 32), torch.randn(6, 32)
    return x, torch.randn(64, 32) * 0.2, torch.randn(64), torch.randn(32, 64) * 0.2, torch.randn(32), residual


class _DropGradient(torch.autograd.Function):
    """Returns `kept`; its backward passes no gradient (None) to `dropped`."""

    @staticmethod
    def forward(ctx, dropped, kept):
        return kept.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def test_an_op_reached_without_a_gradient_passes_none_on():
    """The C++ autograd functions do not materialize absent gradients as zeros (materialize_grads(false)): an
    op whose output gets no gradient passes none to its inputs, and the FFN's backward allocates nothing."""
    x, w1, b1, w2, b2, residual = (t.clone().requires_grad_() for t in _ffn_parameters())
    out = ops.ffn(x, w1, b1, w2, b2, residual, backend="cpp")
    normed = ops.layer_norm(x, torch.ones(32, requires_grad=True), None, backend="cpp")
    kept = torch.randn(3, requires_grad=True)
    _DropGradient.apply(out + normed, kept).sum().backward()
    assert kept.grad is not None
    assert all(t.grad is None for t in (x, w1, b1, w2, b2, residual))


@pytest.mark.parametrize("rows, C", [(0, 8), (4, 0)])
def test_ffn_of_empty_tensors_has_the_shapes_its_fake_declares(rows, C):
    x, w1, w2 = torch.randn(2, rows, C, requires_grad=True), torch.randn(8, C), torch.randn(C, 8)
    out, pre, hidden = torch.ops.engine.ffn_forward(x, w1, None, w2, None, x, False)
    with torch._subclasses.FakeTensorMode() as mode:
        fakes = torch.ops.engine.ffn_forward(*(mode.from_tensor(t) for t in (x, w1)), None, mode.from_tensor(w2),
                                             None, mode.from_tensor(x), False)
    assert [t.shape for t in (out, pre, hidden)] == [t.shape for t in fakes] == [x.shape, (2 * rows, 8), (2 * rows, 8)]
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_column_sums_do_not_depend_on_the_number_of_threads():
    """The LayerNorm weight/bias gradients and the FFN's output-bias gradient are summed in a fixed number of
    row blocks (csrc/cpu/kernels.h), so a run gives the same bits on 1 thread as on several."""
    torch.manual_seed(0)
    rows, C, F = 1000, 48, 96
    x, grad = torch.randn(rows, C), torch.randn(rows, C)
    weight, bias = torch.randn(C), torch.randn(C)
    _, mean, rstd = torch.ops.engine.layer_norm_forward(x, weight, bias, 1e-5)
    w1, w2 = torch.randn(F, C) * 0.1, torch.randn(C, F) * 0.1
    pre = x @ w1.t()
    hidden = torch.nn.functional.gelu(pre)

    def sums():
        _, grad_weight, grad_bias = torch.ops.engine.layer_norm_backward(grad, x, weight, mean, rstd)
        grad_b2 = torch.ops.engine.ffn_backward(grad, x, w1, None, w2, pre, hidden, False)[4]
        return grad_weight, grad_bias, grad_b2

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sums()
        torch.set_num_threads(max(2, threads))
        several = sums()
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("layer_norm grad_weight", "layer_norm grad_bias", "ffn grad_b2"), one, several):
        assert torch.equal(a, b), describe_mismatch(b, a, f"{name} on several threads against one")


def test_ffn_under_bf16_autocast_keeps_bf16_hidden_and_fp32_residual():
    x, residual = torch.randn(6, 32), torch.randn(6, 32)
    w1, b1, w2, b2 = torch.randn(64, 32) * 0.2, torch.randn(64), torch.randn(32, 64) * 0.2, torch.randn(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.ffn(x, w1, b1, w2, b2, residual, backend="cpp")
        expected = ops.ffn(x, w1, b1, w2, b2, residual, backend="reference")
    assert out.dtype == expected.dtype == torch.float32
    assert torch.allclose(out, expected, atol=5e-2), describe_mismatch(out, expected, "ffn under autocast")


def test_ffn_under_autocast_gives_the_same_bits_with_and_without_autograd():
    """Under inference_mode the op skips its autograd node but not its Autocast kernel, which casts to autocast's
    dtype: sampling from a model gives what its training forward gives, in the dtypes the fake declares."""
    args = _ffn_parameters()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            expected = torch.ops.engine.ffn_forward(*args, False)
        with torch.inference_mode():
            actual = torch.ops.engine.ffn_forward(*args, False)
            with torch._subclasses.FakeTensorMode() as mode:
                fake = torch.ops.engine.ffn_forward(*(mode.from_tensor(a) for a in args), False)
    for name, a, e, f in zip(("out", "pre", "hidden"), actual, expected, fake):
        assert a.dtype == e.dtype == f.dtype, f"{name}: {a.dtype}, {e.dtype} without inference_mode, fake {f.dtype}"
        assert torch.equal(a, e), describe_mismatch(a, e, f"ffn {name} under inference_mode")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ffn_backward_takes_a_grad_out_of_any_float_dtype(dtype, grad_dtype, transposed):
    """A bf16/fp16 grad_out next to float32 (or the other 16-bit type's) operands, contiguous or a transposed
    view, gives what its values in float32 give (rounded to x's dtype for the matmuls, summed unrounded for
    the bias)."""
    x, w1, b1, w2, _, _ = (t.to(dtype) for t in _ffn_parameters())
    pre = x @ w1.t()
    hidden = torch.nn.functional.gelu(pre + b1)
    grad = (torch.randn(32, 6).t() if transposed else torch.randn(6, 32)).to(grad_dtype)
    actual = torch.ops.engine.ffn_backward(grad, x, w1, b1, w2, pre, hidden, False)
    expected = torch.ops.engine.ffn_backward(grad.float().contiguous(), x, w1, b1, w2, pre, hidden, False)
    for name, a, e in zip(("x", "w1", "b1", "w2", "b2"), actual, expected):
        assert torch.equal(a, e), describe_mismatch(a, e, f"grad {name} from a {grad_dtype} grad_out")


@pytest.mark.parametrize("forward_under_autocast", [True, False])
def test_ffn_backward_called_under_autocast_gives_the_gradients_of_one_called_outside(forward_under_autocast):
    """The backward computes in the dtypes its forward saved: autocast around backward() does not recast its
    matmuls, a float32 forward's included."""
    grads = []
    for backward_under_autocast in (False, True):
        leaves = [t.clone().requires_grad_() for t in _ffn_parameters()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=forward_under_autocast):
            out = ops.ffn(*leaves, backend="cpp")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_under_autocast):
            out.square().sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for name, outside, inside in zip(("x", "w1", "b1", "w2", "b2", "residual"), *grads):
        assert inside.dtype == outside.dtype and torch.equal(inside, outside), \
            describe_mismatch(inside, outside, f"grad {name} with backward under autocast")


# ------------------------------------------------------------------------------ autocast
# What the trainer runs by default: float32 parameters under torch.autocast, so the matmuls hand the ops
# bf16 (or fp16) activations next to float32 biases and weights. The CPU and CUDA tensors go through the
# same glue (csrc/glue.cpp), so this is the check of the cuda backend's dtype handling too.

def _attention_under_autocast(backend, x, w_qkv):
    B, T, C = x.shape
    qkv = (x @ w_qkv.t()).view(B, T, 3, 2, C // 2)  # (B, T, 3, H, D), low precision under autocast
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views, as in the model
    return ops.attention(q, k, v, backend=backend)


def _layer_norm_under_autocast(backend, x, w_in, weight, bias):
    return ops.layer_norm(x @ w_in.t(), weight, bias, backend=backend)  # a low-precision x, float32 weight


def _cross_entropy_under_autocast(backend, x, w_head, targets):
    return ops.cross_entropy(x @ w_head.t(), targets, backend=backend)  # low-precision logits


# op -> (inputs: float32 leaves and targets, run(backend, *inputs))
AUTOCAST_CASES = {
    "attention": (lambda: [torch.randn(2, 37, 32), torch.randn(96, 32) * 0.3], _attention_under_autocast),
    "ffn": (lambda: [torch.randn(2, 5, 24), torch.randn(64, 24) * 0.2, torch.randn(64), torch.randn(24, 64) * 0.2,
                     torch.randn(24), torch.randn(2, 5, 24)],
            lambda backend, *inputs: ops.ffn(*inputs, activation="gelu_tanh", backend=backend)),
    "layer_norm": (lambda: [torch.randn(7, 40), torch.randn(40, 40) * 0.3, torch.randn(40), torch.randn(40)],
                   _layer_norm_under_autocast),
    "layer_norm-fp32-x": (lambda: [torch.randn(7, 40) * 2, torch.randn(40), torch.randn(40)],
                          lambda backend, *inputs: ops.layer_norm(*inputs, backend=backend)),
    "cross_entropy": (lambda: [torch.randn(9, 32), torch.randn(65, 32) * 0.3, torch.randint(0, 65, (9,))],
                      _cross_entropy_under_autocast),
    "linear_cross_entropy": (lambda: [torch.randn(9, 32), torch.randn(65, 32) * 0.3, torch.randint(0, 65, (9,))],
                             lambda backend, *inputs: ops.linear_cross_entropy(*inputs, backend=backend)),
}


def _check_under_autocast(case, dtype, backend, device):
    """backend under autocast against fp64 (no autocast), within 2x the error of `reference` under the same
    autocast; the output has reference's dtype and every float32 parameter gets a float32 gradient."""
    make_inputs, run = AUTOCAST_CASES[case]
    base = make_inputs()

    def leaves(to_dtype):
        return [t.detach().to(device=device, dtype=to_dtype).requires_grad_() if t.is_floating_point()
                else t.to(device) for t in base]

    def output_and_grads(inputs, backend, autocast):
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            out = run(backend, *inputs)
        seed = torch.ones_like(out) if out.dim() == 0 else torch.randn(out.shape, generator=seeds).to(out)
        differentiable = [t for t in inputs if t.is_floating_point()]
        return out, torch.autograd.grad(out, differentiable, seed)

    seeds = torch.Generator().manual_seed(1)
    exact, exact_grads = output_and_grads(leaves(torch.float64), "reference", autocast=False)
    seeds.manual_seed(1)
    low, low_grads = output_and_grads(leaves(torch.float32), "reference", autocast=True)
    seeds.manual_seed(1)
    actual, actual_grads = output_and_grads(leaves(torch.float32), backend, autocast=True)
    assert actual.dtype == low.dtype, f"{case}: output dtype {actual.dtype}, reference gives {low.dtype}"
    tolerance.assert_within_reference_error(actual.float(), low.float(), exact, f"{case} output",
                                            atol=tolerance.ATOL[dtype])
    for position, (a, r, e) in enumerate(zip(actual_grads, low_grads, exact_grads)):
        assert a.dtype == torch.float32, f"{case}: gradient of input {position} is {a.dtype}, not float32"
        tolerance.assert_within_reference_error(a, r, e, f"{case} grad of input {position}", atol=tolerance.ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", sorted(AUTOCAST_CASES))
def test_op_under_autocast_matches_reference(case, dtype):
    _check_under_autocast(case, dtype, "cpp", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", sorted(AUTOCAST_CASES))
def test_cuda_op_under_autocast_matches_reference(case, dtype):
    """The trainer's default on a GPU: `--backend cuda` under bf16 autocast (this raised "bias has dtype Float but
    pre has dtype BFloat16" before the glue was shared)."""
    _require_cuda_kernels()
    _check_under_autocast(case, dtype, "cuda", "cuda")


# ------------------------------------------------------------------- instruction-set variants

ISA_CHECK = textwrap.dedent("""
    import torch
    from engine import ops
    from engine.ops import extension
    module, reason = extension.load()
    assert module is not None, reason
    assert module.cpu_isa() == "{isa}", module.cpu_isa()
    torch.manual_seed(0)
    def check(name, actual, expected, tolerance):
        error = (actual - expected).abs().max().item()
        assert error < tolerance, f"{{name}}: max error {{error}} on {isa}"
    q, k, v = (torch.randn(2, 2, 100, 48, dtype=torch.float64, requires_grad=True) for _ in range(3))
    expected = ops.attention(q, k, v, backend="reference")
    grads = torch.autograd.grad(expected, (q, k, v), torch.ones_like(expected))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = ops.attention(q32, k32, v32, backend="cpp")
    check("attention", out.double(), expected, 1e-5)
    for name, g, e in zip("qkv", torch.autograd.grad(out, (q32, k32, v32), torch.ones_like(out)), grads):
        check("grad " + name, g.double(), e, 1e-4)
    x = torch.randn(5, 77) * 3
    for activation in ("gelu", "gelu_tanh"):
        check(activation, ops.ffn(x, torch.eye(77), None, torch.eye(77), None, x * 0, activation=activation, backend="cpp"),
              ops.ffn(x, torch.eye(77), None, torch.eye(77), None, x * 0, activation=activation, backend="reference"), 1e-5)
    weight, bias = torch.randn(77), torch.randn(77)
    check("layer_norm", ops.layer_norm(x, weight, bias, backend="cpp"), ops.layer_norm(x, weight, bias, backend="reference"), 1e-5)
    targets = torch.randint(0, 77, (5,))
    check("cross_entropy", ops.cross_entropy(x, targets, backend="cpp"), ops.cross_entropy(x, targets, backend="reference"), 1e-5)
    print("ok")
""")


def _supported_isas() -> list[str]:
    order = ["base", "avx2", "avx512"]
    return order[: order.index(MODULE.cpu_isa()) + 1] if MODULE is not None else []


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_lower_instruction_set_variants_match_reference(isa):
    """The AVX-512 variant runs everywhere above; each lower variant is forced in a fresh process."""
    if isa not in _supported_isas():
        pytest.skip(f"this CPU runs {MODULE.cpu_isa()}, which does not include {isa}")
    environment = {**os.environ, "ENGINE_CPU_ISA": isa, "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-c", ISA_CHECK.format(isa=isa)], capture_output=True, text=True,
                            env=environment, cwd=PROJECT_ROOT, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_unknown_instruction_set_is_a_clear_error():
    environment = {**os.environ, "ENGINE_CPU_ISA": "sse9", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-c", "import torch, engine._C as C; C.cpu_isa()"], capture_output=True,
                            text=True, env=environment, cwd=PROJECT_ROOT, timeout=120, check=False)
    assert result.returncode != 0
    assert "ENGINE_CPU_ISA must be base, avx2 or avx512, got 'sse9'" in result.stderr


# ------------------------------------------------------------------------------- opcheck

class _Samples:
    """Random sample tensors on one device, in one dtype unless a call says otherwise."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype

    def tensor(self, *shape, grad=False, dtype=None):
        return torch.randn(*shape, device=self.device, dtype=dtype or self.dtype).requires_grad_(grad)

    def strided(self, *shape, grad=False, dtype=None):
        """A non-contiguous view of the given shape: the transpose of a contiguous tensor, or every other
        element of a vector."""
        if len(shape) == 1:
            return self.tensor(2 * shape[0], dtype=dtype)[::2].detach().requires_grad_(grad)
        return (self.tensor(*shape[::-1], dtype=dtype).permute(*reversed(range(len(shape)))).detach()
                .requires_grad_(grad))


def _attention_samples(make: _Samples) -> dict:
    tensor, strided = make.tensor, make.strided
    q, k, v = (tensor(2, 2, 33, 16, grad=True) for _ in range(3))
    transposed = [t.transpose(1, 2) for t in (tensor(2, 33, 2, 16, grad=True) for _ in range(3))]  # as in the model
    out, lse = torch.ops.engine.attention_forward(q.detach(), k.detach(), v.detach(), True, 0.25)
    return {
        "attention_forward-causal": ("attention_forward", (q, k, v, True, 0.25)),
        "attention_forward-full": ("attention_forward", (q, k, v, False, 0.25)),
        "attention_forward-transposed-views": ("attention_forward", (*transposed, True, 0.25)),
        "attention_backward": ("attention_backward",
                               (tensor(2, 2, 33, 16), q.detach(), k.detach(), v.detach(), out, lse, True, 0.25)),
        "attention_backward-strided": ("attention_backward",
                                       (strided(2, 2, 33, 16), *(t.detach() for t in transposed), out, lse, True,
                                        0.25)),
    }


def _epilogue_samples(make: _Samples) -> dict:
    tensor, strided = make.tensor, make.strided
    return {
        "bias_gelu-erf": ("bias_gelu", (tensor(5, 24, grad=True), tensor(24, grad=True), False)),
        "bias_gelu-tanh-no-bias": ("bias_gelu", (tensor(5, 24, grad=True), None, True)),
        "bias_gelu-strided": ("bias_gelu", (strided(5, 24, grad=True), strided(24, grad=True), False)),
        "bias_gelu_backward": ("bias_gelu_backward", (tensor(5, 24), tensor(5, 24), tensor(24), True)),
        "bias_gelu_backward-strided": ("bias_gelu_backward", (strided(5, 24), strided(5, 24), strided(24), False)),
        "bias_residual": ("bias_residual", (tensor(5, 24, grad=True), tensor(24, grad=True), tensor(5, 24, grad=True))),
        "bias_residual-no-bias": ("bias_residual", (tensor(5, 24, grad=True), None, tensor(5, 24, grad=True))),
        "bias_residual-strided": ("bias_residual", (strided(5, 24, grad=True), strided(24, grad=True),
                                                    strided(5, 24, grad=True))),
    }


def _ffn_samples(make: _Samples, low: torch.dtype | None = None, suffix: str = "") -> dict:
    """The whole FFN; with `low`, what its autograd node hands the op under autocast: x, w1 and w2 in low
    precision beside float32 biases, residual and output gradient."""
    tensor, strided = make.tensor, make.strided
    matmul_dtype = low or make.dtype
    x, w1, w2 = (tensor(*shape, grad=low is None, dtype=matmul_dtype) for shape in ((2, 3, 24), (40, 24), (24, 40)))
    b1, b2, residual = tensor(40, grad=low is None), tensor(24, grad=low is None), tensor(2, 3, 24, grad=low is None)
    _, pre, hidden = torch.ops.engine.ffn_forward(x.detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach(),
                                                  residual.detach(), False)
    backward = (tensor(2, 3, 24), x.detach(), w1.detach(), b1.detach(), w2.detach(), pre, hidden, False)
    if low is not None:
        return {f"ffn_forward-autocast-{suffix}": ("ffn_forward", (x, w1, b1, w2, b2, residual, False)),
                f"ffn_backward-autocast-{suffix}": ("ffn_backward", backward)}
    return {
        "ffn_forward": ("ffn_forward", (x, w1, b1, w2, b2, residual, False)),
        "ffn_forward-tanh-no-bias": ("ffn_forward", (x, w1, None, w2, None, residual, True)),
        "ffn_forward-strided": ("ffn_forward", (strided(2, 3, 24, grad=True), strided(40, 24, grad=True),
                                                strided(40, grad=True), strided(24, 40, grad=True),
                                                strided(24, grad=True), strided(2, 3, 24, grad=True), False)),
        "ffn_backward": ("ffn_backward", backward),
        "ffn_backward-strided": ("ffn_backward", (strided(2, 3, 24), *(t.detach() for t in (x, w1, b1, w2)),
                                                  pre.t().contiguous().t(), hidden.t().contiguous().t(), False)),
    }


def _layer_norm_and_cross_entropy_samples(make: _Samples) -> dict:
    tensor, strided = make.tensor, make.strided
    x, weight, bias = tensor(5, 24, grad=True), tensor(24, grad=True), tensor(24, grad=True)
    _, mean, rstd = torch.ops.engine.layer_norm_forward(x.detach(), weight.detach(), bias.detach(), 1e-5)
    logits = tensor(6, 11, grad=True)
    targets = torch.tensor([0, 3, -1, 10, 5, -1], device=make.device)
    _, logits_lse = torch.ops.engine.cross_entropy_forward(logits.detach(), targets, -1)
    grad_loss = torch.tensor(1.5, device=make.device)
    return {
        "layer_norm_forward": ("layer_norm_forward", (x, weight, bias, 1e-5)),
        "layer_norm_forward-no-bias": ("layer_norm_forward", (x, weight, None, 1e-5)),
        "layer_norm_forward-strided": ("layer_norm_forward", (strided(5, 24, grad=True), strided(24, grad=True),
                                                              strided(24, grad=True), 1e-5)),
        "layer_norm_backward": ("layer_norm_backward", (tensor(5, 24), x.detach(), weight.detach(), mean, rstd)),
        "layer_norm_backward-strided": ("layer_norm_backward", (strided(5, 24), x.detach().t().contiguous().t(),
                                                                strided(24), mean, rstd)),
        "cross_entropy_forward": ("cross_entropy_forward", (logits, targets, -1)),
        "cross_entropy_forward-strided": ("cross_entropy_forward", (strided(6, 11, grad=True), targets, -1)),
        "cross_entropy_backward": ("cross_entropy_backward", (grad_loss, logits.detach(), targets, logits_lse, -1)),
        "cross_entropy_backward-strided": ("cross_entropy_backward", (grad_loss, strided(6, 11),
                                                                      torch.stack([targets, targets], 1)[:, 0],
                                                                      logits_lse, -1)),
    }


def _autocast_samples(make: _Samples, low: torch.dtype, suffix: str) -> dict:
    """What the model passes under autocast: low-precision activations, float32 biases and weights."""
    def activation(*shape, grad=False):
        return make.tensor(*shape, grad=grad, dtype=low)

    def parameter(*shape, grad=True):
        return make.tensor(*shape, grad=grad, dtype=torch.float32)

    weight, bias = make.tensor(24), make.tensor(24)
    low_x = activation(5, 24, grad=True)
    _, low_mean, low_rstd = torch.ops.engine.layer_norm_forward(low_x.detach(), weight, bias, 1e-5)
    return {
        f"bias_gelu-autocast-{suffix}": ("bias_gelu", (activation(5, 24, grad=True), parameter(24), False)),
        f"bias_gelu_backward-autocast-{suffix}": ("bias_gelu_backward", (activation(5, 24), activation(5, 24),
                                                                          parameter(24, grad=False), True)),
        f"bias_residual-autocast-{suffix}": ("bias_residual", (activation(5, 24, grad=True), parameter(24),
                                                               parameter(5, 24))),
        f"layer_norm_forward-autocast-{suffix}": ("layer_norm_forward", (low_x, parameter(24), parameter(24), 1e-5)),
        f"layer_norm_backward-autocast-{suffix}": ("layer_norm_backward", (activation(5, 24), low_x.detach(), weight,
                                                                           low_mean, low_rstd)),
    }


def _opcheck_samples(device="cpu", dtype=torch.float32):
    """case id -> (op name, args) for every op, with gradients required where the op has an autograd formula.

    Besides the plain cases: "-strided" cases pass non-contiguous views for every tensor argument (the outputs
    must still be contiguous, as the fakes declare), and "-autocast-bf16" / "-autocast-fp16" cases pass what
    the model passes under autocast, low-precision activations with float32 biases and weights (the outputs
    take the dtypes the fakes declare). The CPU and CUDA kernels share this glue (csrc/glue.cpp), so these
    cases on the CPU cover the checks, promotions and allocations CUDA tensors go through."""
    make = _Samples(device, dtype)
    return {**_attention_samples(make), **_epilogue_samples(make), **_ffn_samples(make),
            **_layer_norm_and_cross_entropy_samples(make),
            **_autocast_samples(make, torch.bfloat16, "bf16"), **_autocast_samples(make, torch.float16, "fp16"),
            **_ffn_samples(make, torch.bfloat16, "bf16"), **_ffn_samples(make, torch.float16, "fp16")}


OPCHECK_CASES = ["attention_forward-causal", "attention_forward-full", "attention_forward-transposed-views",
                 "attention_backward", "attention_backward-strided", "bias_gelu-erf", "bias_gelu-tanh-no-bias",
                 "bias_gelu-strided", "bias_gelu_backward", "bias_gelu_backward-strided", "bias_residual",
                 "bias_residual-no-bias", "bias_residual-strided", "ffn_forward", "ffn_forward-tanh-no-bias",
                 "ffn_forward-strided", "ffn_backward", "ffn_backward-strided",
                 "layer_norm_forward", "layer_norm_forward-no-bias",
                 "layer_norm_forward-strided", "layer_norm_backward", "layer_norm_backward-strided",
                 "cross_entropy_forward", "cross_entropy_forward-strided", "cross_entropy_backward",
                 "cross_entropy_backward-strided",
                 *(f"{op}-autocast-{suffix}" for suffix in ("bf16", "fp16")
                   for op in ("bias_gelu", "bias_gelu_backward", "bias_residual", "ffn_forward", "ffn_backward",
                              "layer_norm_forward", "layer_norm_backward"))]


def test_opcheck_covers_every_op():
    samples = _opcheck_samples()
    assert sorted(samples) == sorted(OPCHECK_CASES)
    schemas = {name for name, _ in samples.values()}
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("engine::")}
    assert schemas == registered


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    name, args = _opcheck_samples()[case]
    torch.library.opcheck(getattr(torch.ops.engine, name).default, args)


def _outputs(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("case", [case for case in OPCHECK_CASES if case.endswith("-strided")])
def test_strided_inputs_give_the_results_of_contiguous_ones(case):
    name, args = _opcheck_samples()[case]
    op = getattr(torch.ops.engine, name).default
    strided = _outputs(op(*args))
    contiguous = _outputs(op(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)))
    for position, (s, c) in enumerate(zip(strided, contiguous)):
        assert torch.equal(s, c), describe_mismatch(s, c, f"{case} output {position}")


def test_every_output_is_contiguous_and_as_the_fake_declares():
    """Whatever the inputs' strides and dtypes, the kernels return contiguous outputs with the fake's dtypes
    (opcheck compares the fake with the real op; this says what both must be, for every case at once)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for case, (name, args) in _opcheck_samples().items():
        op = getattr(torch.ops.engine, name).default
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        for position, (r, f) in enumerate(zip(_outputs(real), _outputs(fake))):
            assert r.is_contiguous() and f.is_contiguous(), f"{case}: output {position} is not contiguous"
            assert (r.dtype, r.shape) == (f.dtype, f.shape), f"{case}: output {position} {r.dtype} {tuple(r.shape)}"\
                f" but the fake declares {f.dtype} {tuple(f.shape)}"


# -------------------------------------------------------------------- compile, convergence

def _tiny_model(seed: int, n_layers: int = 2) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=48, d_model=32, n_heads=2, d_ff=64, n_layers=n_layers, max_seq_len=40))


def test_compile_fullgraph_with_cpp_backend_matches_eager():
    model = _tiny_model(0, n_layers=1)
    idx, targets = torch.randint(0, 48, (2, 40)), torch.randint(0, 48, (2, 40))
    ops.set_backend("cpp")
    try:
        eager_loss = model.loss(idx, targets)  # also fills the registry's cache, which compile then reads
        eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
        torch._dynamo.reset()
        compiled = torch.compile(model.loss, fullgraph=True)
        compiled_loss = compiled(idx, targets)
        compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    finally:
        ops.set_backend("auto")
        torch._dynamo.reset()
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-5), (compiled_loss.item(), eager_loss.item())
    for (name, _), compiled_grad, eager_grad in zip(model.named_parameters(), compiled_grads, eager_grads):
        assert torch.allclose(compiled_grad, eager_grad, atol=1e-5), describe_mismatch(compiled_grad, eager_grad, name)


def _training_losses(backend: str, steps: int = 30) -> list[float]:
    model = _tiny_model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(2)
    # Sequences that count up from a random start: learnable, so the loss falls within 30 steps.
    starts = torch.randint(0, 48, (steps, 4, 1), generator=generator)
    sequences = (starts + torch.arange(41)) % 48  # (steps, 4, 41)
    losses = []
    ops.set_backend(backend)
    try:
        for step in range(steps):
            loss = model.loss(sequences[step, :, :-1], sequences[step, :, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        ops.set_backend("auto")
    return losses


def test_convergence_matches_reference():
    reference_losses = _training_losses("reference")
    cpp_losses = _training_losses("cpp")
    assert cpp_losses[-1] < cpp_losses[0] - 0.5, f"the loss did not fall: {cpp_losses}"
    for step, (c, r) in enumerate(zip(cpp_losses, reference_losses)):
        assert math.isclose(c, r, rel_tol=1e-4), f"step {step}: cpp loss {c} vs reference {r}"


# ---------------------------------------------------------------------- errors, availability

def test_dropout_is_rejected_not_ignored():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"backend 'cpp' does not implement dropout in 'attention'"):
        ops.attention(q, q, q, dropout_p=0.1, backend="cpp")
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"backend 'cpp' does not implement dropout in 'ffn'"):
        ops.ffn(x, torch.randn(16, 8), None, torch.randn(8, 16), None, x, dropout_p=0.2, backend="cpp")
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        ops.ffn(x, torch.randn(16, 8), None, torch.randn(8, 16), None, x, activation="relu", backend="cpp")


@pytest.mark.parametrize("call,message", [
    (lambda: torch.ops.engine.attention_forward(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8),
                                                torch.randn(1, 2, 4, 8), True, 1.0), "k must have q's shape"),
    (lambda: torch.ops.engine.attention_forward(*(torch.randn(1, 2, 4, 8, dtype=torch.float64),) * 3, True, 1.0),
     "q must be float32, float16 or bfloat16, got Double"),
    (lambda: torch.ops.engine.attention_forward(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8),
                                                True, 1.0), r"q must be 4-D \(B, H, T, D\)"),
    (lambda: torch.ops.engine.bias_gelu(torch.randn(3, 8), torch.randn(7), False), r"bias must have shape \(8,\)"),
    (lambda: torch.ops.engine.bias_residual(torch.randn(3, 8), None, torch.randn(3, 9)), "residual must have y's shape"),
    (lambda: torch.ops.engine.layer_norm_forward(torch.randn(3, 8), torch.randn(9), None, 1e-5),
     r"weight must have shape \(8,\)"),
    (lambda: torch.ops.engine.cross_entropy_forward(torch.randn(3, 8), torch.tensor([1, 8, 2]), -1),
     r"targets\[1\] = 8 is out of range for 8 classes"),
    (lambda: torch.ops.engine.cross_entropy_forward(torch.randn(3, 8), torch.tensor([1, 2, 3], dtype=torch.int32), -1),
     "targets must be int64, got Int"),
])
def test_bad_input_names_the_tensor(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_unbuilt_extension_says_why(monkeypatch):
    monkeypatch.setattr(extension.importlib.util, "find_spec", lambda name: None)
    module, reason = extension.load.__wrapped__()
    assert module is None and reason.startswith("not built: engine._C is missing; run `pip install")
    monkeypatch.setattr(extension, "load", lambda: (None, reason))
    assert ops.available_backends()["cpp"] == (False, reason)
    assert ops.available_backends()["cuda"] == (False, reason)


def test_cpp_backend_is_available_and_auto_prefers_it_on_cpu():
    assert ops.available_backends()["cpp"] == (True, "")
    assert ops.resolve_name("attention", "cpu", "auto") == "cpp"
    if not torch.cuda.is_available():
        ok, reason = ops.available_backends()["cuda"]
        assert not ok and reason


# ------------------------------------------------------------------------------ CUDA ops

def _require_cuda_kernels():
    ok, reason = extension.cuda_availability()
    assert ok, f"the cuda backend is unavailable on this GPU machine: {reason}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (2, 3, 77, 64), (1, 2, 300, 128), (2, 2, 129, 32),
                                   pytest.param((1, 4, 1000, 64), marks=pytest.mark.slow)])
def test_cuda_attention_matches_reference(shape, causal, dtype):
    _require_cuda_kernels()
    compare_with_reference("attention", lambda: [torch.randn(shape) for _ in range(3)], dtype, backend="cuda",
                           device="cuda", kwargs={"causal": causal})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape,d_ff,bias", [((7, 96), 200, True), ((2, 65, 128), 512, False)])
def test_cuda_ffn_matches_reference(shape, d_ff, bias, activation, dtype):
    _require_cuda_kernels()
    d_model = shape[-1]

    def make():
        return [torch.randn(shape), torch.randn(d_ff, d_model) * 0.2, torch.randn(d_ff) if bias else None,
                torch.randn(d_model, d_ff) * 0.2, torch.randn(d_model) if bias else None, torch.randn(shape)]
    compare_with_reference("ffn", make, dtype, backend="cuda", device="cuda", kwargs={"activation": activation})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape,bias", [((7, 200), True), ((300, 768), False), ((2, 3, 1030), True)])
def test_cuda_layer_norm_matches_reference(shape, bias, dtype):
    _require_cuda_kernels()
    hidden = shape[-1]
    compare_with_reference("layer_norm", lambda: [torch.randn(shape) * 3 + 1, torch.randn(hidden),
                                                  torch.randn(hidden) if bias else None], dtype, backend="cuda",
                           device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows,vocab", [(7, 1000), (129, 65), (64, 50257)])
def test_cuda_cross_entropy_matches_reference(rows, vocab, dtype):
    _require_cuda_kernels()

    def make():
        targets = torch.randint(0, vocab, (rows,))
        targets[::3] = -1
        return [torch.randn(rows, vocab) * 2, targets]
    compare_with_reference("cross_entropy", make, dtype, backend="cuda", device="cuda")


# The forward ops run in the GPU check's short stage, with the autocast case that used to fail on CUDA
# ("bias has dtype Float but pre has dtype BFloat16"); the rest are marked slow.
CUDA_OPCHECK_QUICK = {"attention_forward-causal", "bias_gelu-erf", "bias_gelu-autocast-bf16", "layer_norm_forward",
                      "cross_entropy_forward"}


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    case if case in CUDA_OPCHECK_QUICK else pytest.param(case, marks=pytest.mark.slow) for case in OPCHECK_CASES
])
def test_cuda_opcheck(case):
    """Every case of the CPU opcheck, strided views and autocast dtypes included, with bf16 as the float type."""
    _require_cuda_kernels()
    name, args = _opcheck_samples(device="cuda", dtype=torch.bfloat16)[case]
    torch.library.opcheck(getattr(torch.ops.engine, name).default, args)

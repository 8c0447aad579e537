"""The CPU kernels compute in fp32 and round a bf16/fp16 result once: for every op, its bf16 and fp16
outputs equal its fp32 outputs on the same (exactly widened) inputs, rounded. The kernels read and write
16-bit tensors in place (csrc/cpu/simd.h), so this pins that no intermediate is rounded, and that the
in-place conversions round as PyTorch's casts do (to nearest, ties to even)."""
import pytest
import torch

from engine.ops import extension

pytestmark = pytest.mark.skipif(extension.load()[0] is None, reason="engine._C is not built")
ops = torch.ops.engine
LOW = [torch.bfloat16, torch.float16]


def low(*shape, dtype, scale=1.0):
    """Random values exactly representable in `dtype`."""
    return (torch.randn(*shape) * scale).to(dtype)


def assert_rounds_once(low_outputs, fp32_outputs):
    for got, exact in zip(low_outputs, fp32_outputs):
        if got.dtype == torch.float32:  # float32 statistics (lse, mean, rstd): computed alike
            assert torch.equal(got, exact)
        else:
            assert torch.equal(got, exact.to(got.dtype)), (got.float() - exact.to(got.dtype).float()).abs().max()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("tanh_approx", [False, True])
def test_bias_gelu_and_its_backward(dtype, tanh_approx):
    torch.manual_seed(0)
    pre, bias, grad = low(37, 70, dtype=dtype, scale=3), low(70, dtype=dtype), low(37, 70, dtype=dtype)
    assert_rounds_once([ops.bias_gelu(pre, bias, tanh_approx)], [ops.bias_gelu(pre.float(), bias.float(), tanh_approx)])
    assert_rounds_once([ops.bias_gelu_backward(grad, pre, bias, tanh_approx)],
                       [ops.bias_gelu_backward(grad.float(), pre.float(), bias.float(), tanh_approx)])


@pytest.mark.parametrize("dtype", LOW)
def test_bias_residual_with_a_16_bit_y_and_float32_residual(dtype):
    torch.manual_seed(1)
    y, bias, residual = low(37, 70, dtype=dtype), torch.randn(70), torch.randn(37, 70)
    out = ops.bias_residual(y, bias, residual)  # autocast's case: the result is float32
    assert out.dtype == torch.float32
    assert torch.equal(out, ops.bias_residual(y.float(), bias, residual))
    same = ops.bias_residual(y, bias.to(dtype), residual.to(dtype))
    assert_rounds_once([same], [ops.bias_residual(y.float(), bias.to(dtype).float(), residual.to(dtype).float())])


@pytest.mark.parametrize("dtype", LOW)
def test_layer_norm_and_its_backward(dtype):
    torch.manual_seed(2)
    x, weight, bias, grad = low(37, 70, dtype=dtype, scale=2), low(70, dtype=dtype), low(70, dtype=dtype), \
        low(37, 70, dtype=dtype)
    y, mean, rstd = ops.layer_norm_forward(x, weight, bias, 1e-5)
    assert_rounds_once([y, mean, rstd], ops.layer_norm_forward(x.float(), weight.float(), bias.float(), 1e-5))
    grad_x, grad_weight, grad_bias = ops.layer_norm_backward(grad, x, weight, mean, rstd)
    exact = ops.layer_norm_backward(grad.float(), x.float(), weight.float(), mean, rstd)
    assert_rounds_once([grad_x, grad_weight, grad_bias], exact)


@pytest.mark.parametrize("dtype", LOW)
def test_cross_entropy_and_its_backward(dtype):
    torch.manual_seed(3)
    logits, targets = low(37, 71, dtype=dtype, scale=3), torch.randint(0, 71, (37,))
    targets[5] = -1
    loss, lse = ops.cross_entropy_forward(logits, targets, -1)
    assert_rounds_once([loss, lse], ops.cross_entropy_forward(logits.float(), targets, -1))
    grad_loss = torch.tensor(1.7)
    assert_rounds_once([ops.cross_entropy_backward(grad_loss, logits, targets, lse, -1)],
                       [ops.cross_entropy_backward(grad_loss, logits.float(), targets, lse, -1)])


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("head_dim", [16, 32, 48])
def test_attention_and_its_backward_on_the_models_strided_views(dtype, head_dim):
    torch.manual_seed(4)
    qkv = low(2, 70, 3, 3, head_dim, dtype=dtype)  # (B, T, 3, H, D): q, k, v are transposed views of it
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    grad = low(2, 3, 70, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    out, lse = ops.attention_forward(q, k, v, True, scale)
    out32, lse32 = ops.attention_forward(q.float(), k.float(), v.float(), True, scale)
    assert_rounds_once([out, lse], [out32, lse32])
    grads = ops.attention_backward(grad, q, k, v, out, lse, True, scale)
    # The backward reads out: the fp32 path is given the same (rounded) out, widened.
    exact = ops.attention_backward(grad.float(), q.float(), k.float(), v.float(), out.float(), lse, True, scale)
    assert_rounds_once(grads, exact)

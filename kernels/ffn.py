"""The transformer MLP with its residual as two Triton matmuls whose epilogues do the elementwise work.

Shapes (nn.Linear layout): x, residual (M, C); W1 (F, C), b1 (F,); W2 (C, F), b2 (C,). M is the
number of tokens, C = d_model, F = d_ff.

Forward, two kernels:
    _linear_gelu_kernel       pre = x @ W1^T + b1, h = gelu(pre)          (bias and GELU in the epilogue)
    _linear_residual_kernel   y = residual + dropout(h @ W2^T + b2)       (bias, dropout, residual add)

What the backward keeps: x, W1, W2 and the pre-activation `pre` (M, F) in the input dtype. `h` is
not kept: the backward recomputes it from `pre` inside the epilogue that loads `pre` anyway, so one
FFN holds one (M, F) activation between forward and backward where eager PyTorch holds two (the
GELU input and output). Both passes compute h = gelu(pre) from the same stored (rounded) pre with
the same fp32 arithmetic, so the recomputed h equals the forward's h bit for bit.

Backward (dy is the gradient of y):
    d_residual = dy
    dout = dy * keep / (1 - p)       the dropout mask regenerated from the seed (dout = dy when p = 0)
    db2  = sum_rows dout
    dh   = dout @ W2                 _linear_gelu_backward_kernel, whose epilogue also computes
    dpre = dh * gelu'(pre)             dpre, h = gelu(pre) and each row tile's column sums of dpre
    db1  = sum_rows dpre               (fp32, one row of partial sums per tile, added up afterwards:
                                       no atomics, so db1 is bitwise repeatable)
    dW2  = dout^T @ h                kernels/matmul.py
    dW1  = dpre^T @ x                kernels/matmul.py
    dx   = dpre @ W1                 kernels/matmul.py

GELU, exact (activation "gelu") and GPT-2's tanh form ("gelu_tanh"), in fp32:
    gelu(u)  = u * Phi(u),  Phi(u) = (1 + erf(u / sqrt(2))) / 2
    gelu'(u) = Phi(u) + u * phi(u),  phi(u) = exp(-u^2 / 2) / sqrt(2 pi)
    gelu_tanh(u)  = u (1 + tanh(z)) / 2 = u * s,  z = k (u + a u^3), k = sqrt(2 / pi), a = 0.044715,
                    s = sigmoid(2 z)  (since (1 + tanh z) / 2 = sigmoid(2 z); the interpreter has no tanh)
    gelu_tanh'(u) = s + u * s (1 - s) * 2 k (1 + 3 a u^2)

Dropout (p > 0) is applied to h @ W2^T + b2 before the residual add, as the reference does. Its mask
comes from Philox (tl.rand) keyed by a seed tensor and the element's index in the (M, C) output, so
the backward regenerates it instead of storing it.

Precision: matmuls accumulate in fp32; fp32 operands use IEEE fp32 products unless
torch.get_float32_matmul_precision() allows TF32. Every epilogue works in fp32 and rounds once when
it stores. Supported dtypes: fp32, fp16, bf16 (x, W1, b1, W2, b2 share one dtype; the residual may
differ, and y takes the promoted dtype of the two, as `residual + out` would). Tensors must have
fewer than 2^31 elements (offsets are 32-bit).

Tuning: on a GPU each kernel is autotuned over kernels/matmul.py's tile shapes (per kind of
operand, 16-bit or fp32), keyed on a power-of-two bucket of M (the token count, which changes with
the batch shape) and on N and K (the model's widths); the choice is kept on disk. Under
TRITON_INTERPRET=1 there is one fixed configuration (the interpreter cannot autotune).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import DTYPES, INT32_LIMIT, autotune, bucket, check_size, dot_precision
from engine.kernels.matmul import CONFIGS, MIN_BLOCK_M, grid, matmul, matmul_tile, operand_kind, tile_ids

ACTIVATIONS = ("gelu", "gelu_tanh")
# Constants read inside @triton.jit functions must be tl.constexpr: a plain module-level float runs
# in the interpreter but fails every real compile ("Cannot access global variable"); the pre-flight
# (tests/test_preflight.py) compiles every kernel for sm_90 and sm_80 to catch that class.
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_TANH_K = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_TANH_A = tl.constexpr(0.044715)


# Autotuning key: the token count M varies (batch shapes, sampling without the cache), the widths do not.
_KEY = ["M_BUCKET", "N", "K"]


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _gelu(u, TANH: tl.constexpr):
    if TANH:
        return u * tl.sigmoid(2.0 * _TANH_K * (u + _TANH_A * u * u * u))
    return u * (0.5 * (1.0 + tl.math.erf(u * _SQRT_HALF)))  # the same rounding as _gelu_and_grad's


@triton.jit
def _gelu_and_grad(u, TANH: tl.constexpr):
    """(gelu(u), gelu'(u)), computing their costly term (erf, or the sigmoid) once: the backward
    epilogue holds several fp32 tiles already (kernels/matmul.py gives the erf one smaller tiles)."""
    if TANH:
        s = tl.sigmoid(2.0 * _TANH_K * (u + _TANH_A * u * u * u))
        return u * s, s + u * s * (1.0 - s) * (2.0 * _TANH_K) * (1.0 + 3.0 * _TANH_A * u * u)
    cdf = 0.5 * (1.0 + tl.math.erf(u * _SQRT_HALF))
    return u * cdf, cdf + u * _INV_SQRT_2PI * tl.exp(-0.5 * u * u)


@autotune(CONFIGS, operand_kind("x_ptr"), _KEY)
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _linear_gelu_kernel(x_ptr, w_ptr, bias_ptr, pre_ptr, h_ptr, M, N, K, M_BUCKET,
                        stride_xm, stride_xk, stride_wn, stride_wk,
                        HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, TANH: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """pre = x @ W^T + bias and h = gelu(pre), both (M, N) contiguous; x (M, K), W (N, K)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = matmul_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn, pid_m, pid_n,
                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    # Round pre to the storage dtype first: the backward recomputes h from the stored pre.
    pre = acc.to(h_ptr.dtype.element_ty)
    offsets = offs_m[:, None] * N + offs_n[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + offsets, pre, mask=mask)
    h = _gelu(pre.to(tl.float32), TANH)
    tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=mask)


@autotune(CONFIGS, operand_kind("h_ptr", heavy_epilogue=lambda constexprs: constexprs["DROPOUT"]), _KEY)
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _linear_residual_kernel(h_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, seed_ptr, dropout_p, M, N, K, M_BUCKET,
                            stride_hm, stride_hk, stride_wn, stride_wk, stride_rm, stride_rn,
                            HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    """y = residual + dropout(h @ W^T + bias), y (M, N) contiguous; h (M, K), W (N, K), residual (M, N)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = matmul_tile(h_ptr, w_ptr, M, N, K, stride_hm, stride_hk, stride_wk, stride_wn, pid_m, pid_n,
                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    offsets = offs_m[:, None] * N + offs_n[None, :]
    if DROPOUT:
        keep = tl.rand(tl.load(seed_ptr), offsets) >= dropout_p
        acc = tl.where(keep, acc / (1.0 - dropout_p), 0.0)
    residual = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
    y = residual.to(tl.float32) + acc
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


# Timing candidates of different BLOCK_M fills different rows of the partial sums: zero them in between.
@autotune(CONFIGS, operand_kind("dout_ptr", heavy_epilogue=lambda constexprs: not constexprs["TANH"]), _KEY,
          reset_to_zero=["db_partial_ptr"])
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _linear_gelu_backward_kernel(dout_ptr, w_ptr, pre_ptr, dpre_ptr, h_ptr, db_partial_ptr, M, N, K, M_BUCKET,
                                 stride_dm, stride_dk, stride_wk, stride_wn,
                                 HAS_BIAS: tl.constexpr, TANH: tl.constexpr, PRECISION: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr):
    """dpre = (dout @ W) * gelu'(pre), h = gelu(pre), db_partial[pid_m] = this row tile's column sums of dpre.

    dout (M, K), W (K, N) (W2 in its nn.Linear layout); pre, dpre, h (M, N) contiguous; db_partial
    (at least cdiv(M, BLOCK_M), N) fp32, zeroed: each element has one writer, so no atomics.
    """
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dh = matmul_tile(dout_ptr, w_ptr, M, N, K, stride_dm, stride_dk, stride_wk, stride_wn, pid_m, pid_n,
                      BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offsets = offs_m[:, None] * N + offs_n[None, :]
    pre = tl.load(pre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    h, gelu_grad = _gelu_and_grad(pre, TANH)
    dpre = dh * gelu_grad
    tl.store(dpre_ptr + offsets, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        # Rows past M loaded as zeros, so their dpre is zero and adds nothing.
        tl.store(db_partial_ptr + pid_m * N + offs_n, tl.sum(dpre, axis=0), mask=offs_n < N)


@triton.jit
def _dropout_backward_kernel(dy_ptr, dout_ptr, seed_ptr, dropout_p, M, N, stride_ym, stride_yn,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dout = dy * keep / (1 - p) with the forward's mask (same seed, same offsets); dout (M, N) contiguous."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offsets = offs_m[:, None] * N + offs_n[None, :]
    dy = tl.load(dy_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, mask=mask, other=0.0)
    keep = tl.rand(tl.load(seed_ptr), offsets) >= dropout_p
    dout = tl.where(keep, dy.to(tl.float32) / (1.0 - dropout_p), 0.0)
    tl.store(dout_ptr + offsets, dout.to(dout_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def _check_ffn_inputs(x, w1, b1, w2, b2, residual, activation, dropout_p) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, d_model), got shape {tuple(x.shape)}")
    M, C = x.shape
    F = w1.shape[0]
    expected = {"w1": (w1, (F, C)), "w2": (w2, (C, F)), "residual": (residual, (M, C))}
    if b1 is not None:
        expected["b1"] = (b1, (F,))
    if b2 is not None:
        expected["b2"] = (b2, (C,))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} for x {tuple(x.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device}, x on {x.device}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; supported: {DTYPES}")
    for name, tensor in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype}, x has {x.dtype}; they must match")
    if residual.dtype not in DTYPES:
        raise ValueError(f"residual has dtype {residual.dtype}; supported: {DTYPES}")
    check_size(x, w1, w2, residual)
    if M * F >= INT32_LIMIT:
        raise ValueError(f"the hidden activation ({M}, {F}) has 2^31 or more elements; the kernels use 32-bit offsets")


def ffn_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None, residual: torch.Tensor, activation: str = "gelu",
                dropout_p: float = 0.0, seed: torch.Tensor | None = None,
                store_pre: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """y = residual + dropout(gelu(x @ w1^T + b1) @ w2^T + b2), and pre = x @ w1^T + b1 for the backward.

    x, residual (M, C); w1 (F, C); w2 (C, F); b1 (F,) or None; b2 (C,) or None. seed: a 1-element
    int64 tensor on x's device, required when dropout_p > 0. Returns y (M, C) in the promoted dtype
    of residual and x, and pre (M, F) in x's dtype (an empty tensor when store_pre is False).
    """
    _check_ffn_inputs(x, w1, b1, w2, b2, residual, activation, dropout_p)
    if dropout_p > 0.0 and seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor")
    M, C = x.shape
    F = w1.shape[0]
    h = torch.empty((M, F), dtype=x.dtype, device=x.device)
    pre = torch.empty((M, F) if store_pre else (0,), dtype=x.dtype, device=x.device)
    y = torch.empty((M, C), dtype=torch.promote_types(residual.dtype, x.dtype), device=x.device)
    if M == 0:
        return y, pre
    precision = dot_precision(x.dtype)
    _linear_gelu_kernel[grid(M, F)](
        x, w1, b1 if b1 is not None else w1, pre if store_pre else h, h, M, F, C, bucket(M),
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1),
        HAS_BIAS=b1 is not None, STORE_PRE=store_pre, TANH=activation == "gelu_tanh", PRECISION=precision,
    )
    _linear_residual_kernel[grid(M, C)](
        h, w2, b2 if b2 is not None else w2, residual, y, seed if seed is not None else y, dropout_p,
        M, C, F, bucket(M),
        h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), residual.stride(0), residual.stride(1),
        HAS_BIAS=b2 is not None, DROPOUT=dropout_p > 0.0, PRECISION=precision,
    )
    return y, pre


def ffn_backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor,
                 activation: str = "gelu", dropout_p: float = 0.0, seed: torch.Tensor | None = None,
                 has_b1: bool = True, has_b2: bool = True) -> tuple[torch.Tensor, ...]:
    """Gradients of ffn_forward's y with respect to x, w1, b1, w2 and b2, given dy (M, C).

    Returns (dx, dw1, db1, dw2, db2) in x's dtype; db1 / db2 are empty tensors when the bias is
    absent. The residual's gradient is dy itself and is not computed here.
    """
    M, C = x.shape
    F = w1.shape[0]
    if tuple(dy.shape) != (M, C):
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected {(M, C)}")
    if tuple(pre.shape) != (M, F):
        raise ValueError(f"pre has shape {tuple(pre.shape)}, expected {(M, F)} (was the forward run with store_pre?)")
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("dropout_p > 0 needs the forward's seed tensor")
        dout = torch.empty((M, C), dtype=x.dtype, device=x.device)
        block_m, block_n = 64, 64
        _dropout_backward_kernel[(triton.cdiv(M, block_m), triton.cdiv(C, block_n))](
            dy, dout, seed, dropout_p, M, C, dy.stride(0), dy.stride(1), BLOCK_M=block_m, BLOCK_N=block_n,
        )
    else:
        dout = dy.to(x.dtype)
    db2 = dout.sum(dim=0, dtype=torch.float32).to(x.dtype) if has_b2 else x.new_empty((0,))
    dpre = torch.empty((M, F), dtype=x.dtype, device=x.device)
    h = torch.empty((M, F), dtype=x.dtype, device=x.device)
    # One row of column sums per row tile of the smallest candidate BLOCK_M (larger tiles fill fewer rows).
    db1_partial = torch.zeros((triton.cdiv(M, MIN_BLOCK_M), F) if has_b1 else (1,), dtype=torch.float32,
                              device=x.device)
    precision = dot_precision(x.dtype)
    if M > 0:
        _linear_gelu_backward_kernel[grid(M, F)](
            dout, w2, pre, dpre, h, db1_partial, M, F, C, bucket(M),
            dout.stride(0), dout.stride(1), w2.stride(0), w2.stride(1),
            HAS_BIAS=has_b1, TANH=activation == "gelu_tanh", PRECISION=precision,
        )
    dw2 = matmul(dout.t(), h)  # (C, F)
    dw1 = matmul(dpre.t(), x)  # (F, C)
    dx = matmul(dpre, w1)  # (M, C)
    db1 = db1_partial.sum(dim=0).to(x.dtype) if has_b1 else x.new_empty((0,))
    return dx, dw1, db1, dw2, db2

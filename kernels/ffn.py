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
    dpre = dh * gelu'(pre)             dpre, h = gelu(pre) and db1 = sum_rows dpre (fp32 atomics,
    db1  = sum_rows dpre               so its summation order, and last bits, vary run to run)
    dW2  = dout^T @ h                _matmul_kernel
    dW1  = dpre^T @ x                _matmul_kernel
    dx   = dpre @ W1                 _matmul_kernel

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

Tuning: on a GPU each kernel is autotuned over a few tile shapes sized for an H100; under
TRITON_INTERPRET=1 there is one fixed configuration (the interpreter cannot autotune).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

ACTIVATIONS = ("gelu", "gelu_tanh")
# Constants read inside @triton.jit functions must be tl.constexpr: a plain module-level float runs
# in the interpreter but fails every real compile ("Cannot access global variable"); the pre-flight
# (tests/test_preflight.py) compiles every kernel for sm_90 and sm_80 to catch that class.
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_TANH_K = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_TANH_A = tl.constexpr(0.044715)


def _matmul_configs() -> list[triton.Config]:
    """Tile shapes to autotune over: (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)."""
    if _INTERPRET:
        # Interpreter cost grows with programs x loop steps, not with block size: big blocks.
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    shapes = [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 64, 3, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 4, 4),  # fits fp32 operands, whose wider tiles run out of shared memory
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _gelu(u, TANH: tl.constexpr):
    if TANH:
        return u * tl.sigmoid(2.0 * _TANH_K * (u + _TANH_A * u * u * u))
    return 0.5 * u * (1.0 + tl.math.erf(u * _SQRT_HALF))


@triton.jit
def _gelu_grad(u, TANH: tl.constexpr):
    if TANH:
        s = tl.sigmoid(2.0 * _TANH_K * (u + _TANH_A * u * u * u))
        return s + u * s * (1.0 - s) * (2.0 * _TANH_K) * (1.0 + 3.0 * _TANH_A * u * u)
    cdf = 0.5 * (1.0 + tl.math.erf(u * _SQRT_HALF))
    return cdf + u * _INV_SQRT_2PI * tl.exp(-0.5 * u * u)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (pid_m, pid_n), visiting GROUP_M row tiles per column sweep
    so that neighbouring programs share operand tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _matmul_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 tile acc = A[rows of pid_m, :] @ B[:, columns of pid_n] for A (M, K) and B (K, N) given by strides.
    Rows and columns past the edges load as zeros."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    in_m = offs_m[:, None] < M
    in_n = offs_n[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=in_m & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & in_n, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.autotune(configs=_matmul_configs(), key=["M", "N", "K"])
@triton.jit
def _linear_gelu_kernel(x_ptr, w_ptr, bias_ptr, pre_ptr, h_ptr, M, N, K,
                        stride_xm, stride_xk, stride_wn, stride_wk,
                        HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, TANH: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """pre = x @ W^T + bias and h = gelu(pre), both (M, N) contiguous; x (M, K), W (N, K)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _matmul_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn, pid_m, pid_n,
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


@triton.autotune(configs=_matmul_configs(), key=["M", "N", "K"])
@triton.jit
def _linear_residual_kernel(h_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, seed_ptr, dropout_p, M, N, K,
                            stride_hm, stride_hk, stride_wn, stride_wk, stride_rm, stride_rn,
                            HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    """y = residual + dropout(h @ W^T + bias), y (M, N) contiguous; h (M, K), W (N, K), residual (M, N)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _matmul_tile(h_ptr, w_ptr, M, N, K, stride_hm, stride_hk, stride_wk, stride_wn, pid_m, pid_n,
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


@triton.autotune(configs=_matmul_configs(), key=["M", "N", "K"], reset_to_zero=["db_ptr"])
@triton.jit
def _linear_gelu_backward_kernel(dout_ptr, w_ptr, pre_ptr, dpre_ptr, h_ptr, db_ptr, M, N, K,
                                 stride_dm, stride_dk, stride_wk, stride_wn,
                                 HAS_BIAS: tl.constexpr, TANH: tl.constexpr, PRECISION: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr):
    """dpre = (dout @ W) * gelu'(pre), h = gelu(pre), db += column sums of dpre.

    dout (M, K), W (K, N) (W2 in its nn.Linear layout); pre, dpre, h (M, N) contiguous; db (N,) fp32, zeroed.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dh = _matmul_tile(dout_ptr, w_ptr, M, N, K, stride_dm, stride_dk, stride_wk, stride_wn, pid_m, pid_n,
                      BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offsets = offs_m[:, None] * N + offs_n[None, :]
    pre = tl.load(pre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dpre = dh * _gelu_grad(pre, TANH)
    tl.store(dpre_ptr + offsets, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + offsets, _gelu(pre, TANH).to(h_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        # Rows past M loaded as zeros, so their dpre is zero and adds nothing.
        tl.atomic_add(db_ptr + offs_n, tl.sum(dpre, axis=0), mask=offs_n < N)


@triton.autotune(configs=_matmul_configs(), key=["M", "N", "K"], restore_value=["c_ptr"])
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A @ B, or C += A @ B when ACCUMULATE (added in fp32 before C's rounding); all by strides."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _matmul_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n,
                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


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

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: for fp32 operands IEEE unless PyTorch's own fp32 matmul setting
    allows TF32; 16-bit operands always take the tensor-core path ("tf32" is the default that leaves it be)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _check_size(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.numel() >= _INT32_LIMIT:
            raise ValueError(f"tensor of shape {tuple(t.shape)} has 2^31 or more elements; the kernels use 32-bit offsets")


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """out = a @ b (or out += a @ b with accumulate=True, summed in fp32 before out's rounding).

    a (M, K) and b (K, N) of one dtype, any strides (transposed views are fine); out (M, N), any
    float dtype and strides, allocated in a's dtype when not given.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul needs a (M, K) and b (K, N); got a {tuple(a.shape)}, b {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _DTYPES:
        raise ValueError(f"matmul needs a and b of one dtype among {_DTYPES}; got {a.dtype} and {b.dtype}")
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        if accumulate:
            raise ValueError("matmul with accumulate=True needs `out`")
        out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if out.shape != (M, N):
        raise ValueError(f"matmul: out has shape {tuple(out.shape)}, expected {(M, N)}")
    _check_size(a, b, out)
    if M == 0 or N == 0:
        return out
    _matmul_kernel[_grid(M, N)](
        a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, PRECISION=_precision(a.dtype),
    )
    return out


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
    if x.dtype not in _DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; supported: {_DTYPES}")
    for name, tensor in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype}, x has {x.dtype}; they must match")
    if residual.dtype not in _DTYPES:
        raise ValueError(f"residual has dtype {residual.dtype}; supported: {_DTYPES}")
    _check_size(x, w1, w2, residual)
    if M * F >= _INT32_LIMIT:
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
    precision = _precision(x.dtype)
    _linear_gelu_kernel[_grid(M, F)](
        x, w1, b1 if b1 is not None else w1, pre if store_pre else h, h, M, F, C,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1),
        HAS_BIAS=b1 is not None, STORE_PRE=store_pre, TANH=activation == "gelu_tanh", PRECISION=precision,
    )
    _linear_residual_kernel[_grid(M, C)](
        h, w2, b2 if b2 is not None else w2, residual, y, seed if seed is not None else y, dropout_p, M, C, F,
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
    db1 = torch.zeros((F if has_b1 else 1,), dtype=torch.float32, device=x.device)
    precision = _precision(x.dtype)
    if M > 0:
        _linear_gelu_backward_kernel[_grid(M, F)](
            dout, w2, pre, dpre, h, db1, M, F, C, dout.stride(0), dout.stride(1), w2.stride(0), w2.stride(1),
            HAS_BIAS=has_b1, TANH=activation == "gelu_tanh", PRECISION=precision,
        )
    dw2 = matmul(dout.t(), h)  # (C, F)
    dw1 = matmul(dpre.t(), x)  # (F, C)
    dx = matmul(dpre, w1)  # (M, C)
    return dx, dw1, db1.to(x.dtype) if has_b1 else x.new_empty((0,)), dw2, db2

"""A general Triton matmul, and the tile loop the FFN's fused kernels build on.

    C = A @ B, or C += A @ B (ACCUMULATE: added in fp32 before C's rounding)

A (M, K), B (K, N) and C (M, N) are given by strides, so transposed views need no copy (the FFN's
weight gradients are dout^T @ h; the fused cross-entropy's is G^T @ x). Products accumulate in
fp32; fp32 operands use IEEE products unless torch.get_float32_matmul_precision() allows TF32.

Programs are ordered in groups of GROUP_M row tiles (`tile_ids`) so that neighbouring programs
share operand tiles in L2. Tensors must have fewer than 2^31 elements (32-bit offsets).

Tuning: on a GPU the tile shape is autotuned among CONFIGS (per kind of operand: 16-bit or fp32),
keyed on power-of-two buckets of M, N and K, with the choice kept on disk (kernels/_common.py).
The candidates were compiled for sm_90 and sm_80 by the pre-flight (tests/test_preflight.py): each
fits both targets' shared memory and keeps its registers (the fused FFN epilogues included); the
larger tiles that did not were dropped (16-bit: 128x256 and 256x128 with 8 warps, 128x128, 128x64 and
64x128 with 4 warps, and 128x128 for the exact GELU's backward and for dropout; fp32: 64x64x32 and
128x64x32).
Under TRITON_INTERPRET=1 there is one configuration with big blocks (the interpreter cannot autotune).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import DTYPES, INTERPRET, autotune, bucket, check_size, dot_precision


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) -> autotune configurations."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


if INTERPRET:
    CONFIGS = {"interpreter": _configs([(128, 128, 128, 1, 4)])}
else:
    CONFIGS = {
        "16-bit": _configs([(128, 128, 64, 3, 8), (64, 128, 64, 3, 8), (128, 64, 64, 3, 8), (64, 64, 64, 4, 4)]),
        # Epilogues that hold several fp32 tiles and run erf (the exact GELU's backward) or Philox
        # (dropout) spill registers with 128 x 128 tiles: 64 x 128 and 128 x 64 over 8 warps keep them.
        "16-bit, heavy epilogue": _configs([(64, 128, 64, 3, 8), (128, 64, 64, 3, 8), (64, 64, 64, 4, 4)]),
        # IEEE fp32 products run without tensor cores and need far more registers: small tiles.
        "fp32": _configs([(64, 128, 32, 3, 8), (32, 64, 32, 4, 4)]),
    }
# The smallest BLOCK_M among the candidates (sizes per-row-tile buffers whatever the choice).
MIN_BLOCK_M = min(config.kwargs["BLOCK_M"] for configs in CONFIGS.values() for config in configs)


def operand_kind(operand: str, heavy_epilogue=lambda constexprs: False):
    """A `kind` for _common.autotune: the candidate list for the dtype of the named pointer argument
    (and for 16-bit operands, whether heavy_epilogue(constexprs) says the epilogue is a heavy one)."""
    def kind(named_args, constexprs):
        if INTERPRET:
            return "interpreter"
        if named_args[operand].dtype == torch.float32:
            return "fp32"
        return "16-bit, heavy epilogue" if heavy_epilogue(constexprs) else "16-bit"
    return kind


def grid(M: int, N: int):
    """One program per (BLOCK_M, BLOCK_N) tile of the (M, N) output, in one grid dimension (tile_ids)."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
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
def matmul_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n,
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


_BUCKETS = ["M_BUCKET", "N_BUCKET", "K_BUCKET"]


@triton.jit(do_not_specialize=_BUCKETS)
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, M_BUCKET, N_BUCKET, K_BUCKET,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A @ B, or C += A @ B when ACCUMULATE (added in fp32 before C's rounding); all by strides.
    The buckets only key the autotuner."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = matmul_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n,
                      BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# Two tuners over one kernel (they share its compiled binaries): timing a candidate that
# accumulates changes C, so that one restores C around every timed call; the plain one, whose
# every call overwrites C, needs no copy.
_matmul = autotune(CONFIGS, operand_kind("a_ptr"), _BUCKETS)(_matmul_kernel)
_matmul_accumulate = autotune(CONFIGS, operand_kind("a_ptr"), _BUCKETS, restore_value=["c_ptr"])(_matmul_kernel)


# ----------------------------------------------------------------------------- launcher

def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """out = a @ b (or out += a @ b with accumulate=True, summed in fp32 before out's rounding).

    a (M, K) and b (K, N) of one dtype, any strides (transposed views are fine); out (M, N), any
    float dtype and strides, allocated in a's dtype when not given.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul needs a (M, K) and b (K, N); got a {tuple(a.shape)}, b {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in DTYPES:
        raise ValueError(f"matmul needs a and b of one dtype among {DTYPES}; got {a.dtype} and {b.dtype}")
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        if accumulate:
            raise ValueError("matmul with accumulate=True needs `out`")
        out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if out.shape != (M, N):
        raise ValueError(f"matmul: out has shape {tuple(out.shape)}, expected {(M, N)}")
    check_size(a, b, out)
    if M == 0 or N == 0:
        return out
    kernel = _matmul_accumulate if accumulate else _matmul
    kernel[grid(M, N)](
        a, b, out, M, N, K, bucket(M), bucket(N), bucket(K),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, PRECISION=dot_precision(a.dtype),
    )
    return out

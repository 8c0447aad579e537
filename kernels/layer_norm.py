"""LayerNorm over the last dimension, forward and backward, with fp32 statistics.

Forward, for each row x of C values (weight w, bias b):
    mean = sum(x) / C,  var = sum((x - mean)^2) / C  (biased, as LayerNorm defines it)
    rstd = 1 / sqrt(var + eps),  xhat = (x - mean) * rstd,  y = xhat * w + b
Each program normalizes a block of rows held whole in registers (one pass over x, two-pass
variance in registers for accuracy); mean and rstd (fp32, one per row) are saved for the backward.

Backward, with g = dy * w (the gradient of xhat):
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     (means over the row's C values)
    dw = sum_rows dy * xhat,  db = sum_rows dy
Each program walks a contiguous range of rows, writes their dx, and keeps running fp32 sums of
dy * xhat and dy; the per-program partial sums are added up afterwards (deterministic, no atomics).

Supported: x (N, C) with any N and any row stride (a non-unit column stride is copied first);
C up to MAX_HIDDEN (16384); fp32, fp16, bf16. weight and bias share a float dtype, which may differ
from x's; bias may be None. Statistics and all arithmetic are fp32; outputs are rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import DTYPES, INTERPRET

MAX_HIDDEN = 16384


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _layer_norm_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, N, C, stride_x, eps,
                               HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / C + eps)
    y = centered * rstd[:, None] * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


# rows_per_program depends on the GPU's SM count and N only bounds loops and masks: not specialized
# (divisibility by 16), so every GPU, and the CPU pre-flight, build the same binary.
@triton.jit(do_not_specialize=["N", "rows_per_program"])
def _layer_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
                                N, C, stride_dy, stride_x, rows_per_program,
                                HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first_row = pid * rows_per_program
    for offset in range(0, rows_per_program, BLOCK_ROWS):
        rows = first_row + offset + tl.arange(0, BLOCK_ROWS)
        row_ok = (rows < N) & (rows < first_row + rows_per_program)
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / C
        mean_g_xhat = tl.sum(g * xhat, axis=1) / C
        dx = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows64 * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_sum += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db_sum += tl.sum(dy, axis=0)
    tl.store(dw_partial_ptr + pid * C + cols, dw_sum, mask=col_ok)
    if HAS_BIAS:
        tl.store(db_partial_ptr + pid * C + cols, db_sum, mask=col_ok)


# ----------------------------------------------------------------------------- launchers

def _blocks(C: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_ROWS, num_warps): a whole row per block, several short rows per program."""
    block_c = triton.next_power_of_2(C)
    # About 4K values per program on a GPU (16K in the interpreter, whose cost is per program).
    block_rows = max(1, min(64, (16384 if INTERPRET else 4096) // block_c))
    num_warps = 4 if block_c * block_rows <= 4096 else 8 if block_c <= 8192 else 16
    return block_c, block_rows, num_warps


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be (rows, hidden), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if not 1 <= C <= MAX_HIDDEN:
        raise ValueError(f"hidden size {C} is outside the supported range 1..{MAX_HIDDEN}")
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}; supported: {DTYPES}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and (tuple(tensor.shape) != (C,) or tensor.device != x.device):
            raise ValueError(f"{name} must have shape ({C},) on {x.device}; got {tuple(tensor.shape)} on {tensor.device}")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"bias has dtype {bias.dtype}, weight has {weight.dtype}; they must match")


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = LayerNorm(x) * weight + bias over the last dimension of x (N, C).

    Returns y (N, C) in x's dtype and the fp32 row statistics mean (N,) and rstd (N,).
    """
    _check_inputs(x, weight, bias)
    x = x if x.stride(1) == 1 else x.contiguous()
    N, C = x.shape
    y = torch.empty((N, C), dtype=x.dtype, device=x.device)
    mean = torch.empty((N,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((N,), dtype=torch.float32, device=x.device)
    if N == 0:
        return y, mean, rstd
    block_c, block_rows, num_warps = _blocks(C)
    _layer_norm_forward_kernel[(triton.cdiv(N, block_rows),)](
        x, weight, bias if bias is not None else weight, y, mean, rstd, N, C, x.stride(0), eps,
        HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps,
    )
    return y, mean, rstd


def _program_count(N: int, block_rows: int, device: torch.device) -> int:
    """Programs for the backward: enough to fill the GPU a few times over, and no more, because
    each one writes a (C,) partial sum that is added up afterwards."""
    blocks = triton.cdiv(N, block_rows)
    if device.type == "cuda":
        return min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(blocks, 4)


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight, dbias) of layer_norm_forward given dy (N, C) and the saved statistics.

    dx has x's dtype, dweight and dbias weight's dtype; dbias is an empty tensor when has_bias is False.
    x and weight are those layer_norm_forward took and checked; only dy is checked here.
    """
    N, C = x.shape
    if tuple(dy.shape) != (N, C):
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected {(N, C)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    dx = torch.empty((N, C), dtype=x.dtype, device=x.device)
    block_c, block_rows, num_warps = _blocks(C)
    programs = max(1, _program_count(N, block_rows, x.device))
    rows_per_program = triton.cdiv(triton.cdiv(N, programs), block_rows) * block_rows
    dw_partial = torch.zeros((programs, C), dtype=torch.float32, device=x.device)
    db_partial = torch.zeros((programs, C) if has_bias else (1,), dtype=torch.float32, device=x.device)
    if N > 0:
        _layer_norm_backward_kernel[(programs,)](
            dy, x, weight, mean, rstd, dx, dw_partial, db_partial, N, C, dy.stride(0), x.stride(0), rows_per_program,
            HAS_BIAS=has_bias, BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps,
        )
    dweight = dw_partial.sum(dim=0).to(weight.dtype)
    dbias = db_partial.sum(dim=0).to(weight.dtype) if has_bias else weight.new_empty((0,))
    return dx, dweight, dbias

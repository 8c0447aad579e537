"""Cross-entropy over a large vocabulary, and the LM head fused with it.

Cross-entropy, per row of logits z (V values) with target t (a program takes one row of a large
vocabulary, or several rows of a small one):
    lse  = log sum_j exp(z_j)          one pass over the vocabulary in blocks, online:
                                       m' = max(m, max(block)), l' = l exp(m - m') + sum exp(block - m')
    loss = lse - z_t                   (0 for rows whose target is ignore_index)
    L    = sum(loss) / n_valid         mean over the non-ignored rows (NaN when every row is ignored,
                                       as in the reference)
Logits are read in their own dtype and converted block by block in registers: no fp32 copy of
the (N, V) matrix exists. The forward saves lse (N,) fp32 for the backward.

Gradient (second pass over the row, needs lse):
    dL/dz_j = (softmax_j - [j == t]) * dL / n_valid,  softmax_j = exp(z_j - lse);  0 for ignored rows.
Where it is written: `cross_entropy` (the standalone op) writes it into a new tensor in its backward,
because the logits belong to the caller, who may still need them (or autograd may have saved them
for the op that produced them): overwriting them is not safe. `linear_cross_entropy` computes the
logits itself, chunk by chunk, so there the kernel overwrites each chunk's logits with their
gradient in place, right after computing the loss.

Fused linear cross-entropy: loss = cross_entropy(x @ W^T, t) for x (N, d), W (V, d), without ever
holding the (N, V) logits. The tokens are processed in chunks of R rows:
    Z_c  = x_c @ W^T                  (R, V) in x's dtype (torch matmul)
    loss rows and G_c = dL/dZ_c       this file's kernel, G_c written over Z_c
    dx_c = G_c @ W                    (torch matmul, written into dx)
    dW  += G_c^T @ x_c                (kernels/matmul.py, accumulating in an fp32 buffer
                                       so that many chunks do not add up bf16 rounding errors)
The gradients are computed in the forward for S times the SUM of the row losses: G_c = S (softmax
- onehot), 0 for ignored rows, with S a power of two (GRAD_SCALE: 1024 for fp16, whose exponent range
is narrow, 1 for bf16 and fp32), written in x's dtype over the logits. dW accumulates in fp32 and
stays fp32. The backward multiplies dx and dW by (upstream gradient) / (S n_valid) in fp32 and rounds
once. Applying the mean's 1/n_valid in the forward instead would push G_c's small entries (p_j / N,
about 2e-9 at GPT-2's vocabulary and 10^4 tokens) below fp16's smallest subnormal (6e-8): stored as
zeros before GradScaler's loss scale (applied to the upstream gradient) could lift them. With S =
1024, p_j down to 6e-8 / 1024 stays representable, and |dx| <= 2 S max|W| stays far from fp16's
65504 for any trained weight. The peak extra memory is one
chunk of logits plus dx and an fp32 dW; R is chosen so that a chunk holds about 2^26 logits
(R = 1024 for GPT-2's vocabulary).

Targets must lie in [0, V) or equal ignore_index. Checking that would need a host sync, so it is
not checked; a row with any other target gets a NaN loss instead of a silently wrong one.
Supported dtypes: logits, x and W in fp32, fp16 or bf16 (x and W alike); targets int64 or int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import DTYPES, INTERPRET
from engine.kernels.matmul import matmul

_CHUNK_LOGITS = 2**26
# S of the module docstring: the fused op's logits gradient is written at this scale, per dtype.
GRAD_SCALE = {torch.float16: 1024.0, torch.bfloat16: 1.0, torch.float32: 1.0}


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _rows_log_sum_exp(row_ptrs, V, BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """log sum_j exp(z_j) for a block of rows, online: a running max m and sum l of exp(z - m) per row."""
    m = tl.full((BLOCK_ROWS,), -float("inf"), tl.float32)
    l = tl.zeros((BLOCK_ROWS,), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptrs[:, None] + offs[None, :], mask=offs[None, :] < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    return m + tl.log(l)


@triton.jit
def _write_rows_grad(row_ptrs, grad_row_ptrs, row_ok, lse, target, scale, V, BLOCK_V: tl.constexpr):
    """grad_j = (exp(z_j - lse) - [j == target]) * scale per row; grad_row_ptrs may equal row_ptrs
    (in place): each block is read before it is overwritten, by the same program."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (offs[None, :] < V)
        z = tl.load(row_ptrs[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        onehot = tl.where(offs[None, :] == target[:, None], 1.0, 0.0)
        grad = (tl.exp(z - lse[:, None]) - onehot) * scale[:, None]
        tl.store(grad_row_ptrs[:, None] + offs[None, :], grad.to(grad_row_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_kernel(logits_ptr, stride_row, targets_ptr, loss_ptr, lse_ptr, N, V, ignore_index, grad_scale,
                          WRITE_GRAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row: lse, loss = lse - z_t (0 if ignored, NaN if t is out of range); with WRITE_GRAD,
    grad_scale times the gradient of the row's loss, (softmax - onehot) (0 if ignored), over its
    logits, in place."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < N
    # Rows past N read row N - 1 again (so every row has finite statistics) and store nothing.
    row_ptrs = logits_ptr + tl.minimum(rows, N - 1).to(tl.int64) * stride_row
    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    lse = _rows_log_sum_exp(row_ptrs, V, BLOCK_ROWS, BLOCK_V)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    target_logit = tl.load(row_ptrs + target, mask=valid & in_range, other=0.0).to(tl.float32)
    loss = tl.where(valid, tl.where(in_range, lse - target_logit, float("nan")), 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if WRITE_GRAD:
        _write_rows_grad(row_ptrs, row_ptrs, row_ok, lse, target, tl.where(valid, grad_scale, 0.0), V, BLOCK_V)


@triton.jit
def _cross_entropy_backward_kernel(logits_ptr, stride_row, grad_ptr, targets_ptr, lse_ptr, grad_loss_ptr,
                                   n_valid_ptr, N, V, ignore_index, BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """grad (N, V) contiguous = (softmax - onehot) * dL / n_valid per row, from the saved lse."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < N
    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(grad_loss_ptr).to(tl.float32) / tl.load(n_valid_ptr).to(tl.float32)
    scale = tl.where(target != ignore_index, scale, 0.0)
    rows64 = rows.to(tl.int64)
    _write_rows_grad(logits_ptr + rows64 * stride_row, grad_ptr + rows64 * V, row_ok, lse, target, scale, V, BLOCK_V)


# ----------------------------------------------------------------------------- launchers

def _blocks(V: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_V, num_warps): blocks of about 4K logits on a GPU (one row of a large
    vocabulary per program, many rows of a small one); 16K in the interpreter, whose cost is per program."""
    budget = 16384 if INTERPRET else 4096
    block_v = min(triton.next_power_of_2(V), budget)
    block_rows = max(1, budget // block_v)
    return block_rows, block_v, 8 if block_rows * block_v >= 4096 else 4


def _check_targets(targets: torch.Tensor, rows: int, device: torch.device) -> None:
    if targets.dim() != 1 or targets.shape[0] != rows:
        raise ValueError(f"targets must have shape ({rows},), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32) or targets.device != device:
        raise ValueError(f"targets must be int64 or int32 on {device}; got {targets.dtype} on {targets.device}")


def _check_logits(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (rows, vocab) with vocab >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in DTYPES:
        raise ValueError(f"logits have dtype {logits.dtype}; supported: {DTYPES}")
    _check_targets(targets, logits.shape[0], logits.device)


def _unit_stride_rows(logits: torch.Tensor) -> torch.Tensor:
    """The kernels take any row stride but need each row contiguous: copy only logits whose rows are not."""
    return logits if logits.stride(1) == 1 else logits.contiguous()


def _count_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of non-ignored rows as a 0-dim int64 tensor on the device (no host sync)."""
    return (targets != ignore_index).sum()


def cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of logits (N, V) against targets (N,); returns (loss (0-dim fp32), lse (N,) fp32)."""
    _check_logits(logits, targets)
    logits = _unit_stride_rows(logits)
    N, V = logits.shape
    losses = torch.empty((N,), dtype=torch.float32, device=logits.device)
    lse = torch.empty((N,), dtype=torch.float32, device=logits.device)
    n_valid = _count_valid(targets, ignore_index)
    if N > 0:
        block_rows, block_v, num_warps = _blocks(V)
        _cross_entropy_kernel[(triton.cdiv(N, block_rows),)](
            logits, logits.stride(0), targets, losses, lse, N, V, ignore_index, 1.0,
            WRITE_GRAD=False, BLOCK_ROWS=block_rows, BLOCK_V=block_v, num_warps=num_warps,
        )
    return losses.sum() / n_valid, lse


def cross_entropy_backward(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                           ignore_index: int = -1) -> torch.Tensor:
    """Gradient of the mean loss with respect to logits (N, V), in a new tensor of logits' dtype.

    logits and targets are those cross_entropy_forward took and checked.
    """
    logits = _unit_stride_rows(logits)
    N, V = logits.shape
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N > 0:
        block_rows, block_v, num_warps = _blocks(V)
        _cross_entropy_backward_kernel[(triton.cdiv(N, block_rows),)](
            logits, logits.stride(0), grad, targets, lse, grad_loss.to(torch.float32), _count_valid(targets, ignore_index),
            N, V, ignore_index, BLOCK_ROWS=block_rows, BLOCK_V=block_v, num_warps=num_warps,
        )
    return grad


def default_chunk_rows(rows: int, vocab: int) -> int:
    """Rows per chunk: the largest power of two whose chunk holds at most 2^26 logits (at least 1)."""
    largest = max(1, _CHUNK_LOGITS // vocab)
    return min(max(rows, 1), 1 << (largest.bit_length() - 1))


def linear_cross_entropy_forward(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int = -1, grad_x: bool = True, grad_weight: bool = True,
                                 chunk_rows: int | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross_entropy(x @ weight^T, targets) without the full (N, V) logits.

    x (N, d) and weight (V, d) of one dtype; targets (N,). Returns (loss, dx, dweight, divisor): the
    0-dim fp32 loss; the gradients of S times the SUM of the row losses with respect to x (N, d, in
    x's dtype) and weight (V, d, fp32); and divisor = S * n_valid (0-dim fp32), so that the mean
    loss's gradients are dx / divisor and dweight / divisor (the module docstring says why they are
    not divided here). A gradient not asked for (grad_x / grad_weight False) is an empty tensor
    and costs nothing. chunk_rows: tokens per chunk (default: default_chunk_rows).
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be (N, d) and weight (V, d); got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in DTYPES:
        raise ValueError(f"x and weight must share a dtype among {DTYPES}; got {x.dtype} and {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    N, d = x.shape
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight must have at least one row (vocab >= 1)")
    _check_targets(targets, N, x.device)
    chunk_rows = default_chunk_rows(N, V) if chunk_rows is None else chunk_rows
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    write_grad = grad_x or grad_weight
    losses = torch.empty((N,), dtype=torch.float32, device=x.device)
    lse = torch.empty((N,), dtype=torch.float32, device=x.device)
    n_valid = _count_valid(targets, ignore_index)
    dx = torch.empty((N, d) if grad_x else (0,), dtype=x.dtype, device=x.device)
    dweight = torch.zeros((V, d) if grad_weight else (0,), dtype=torch.float32, device=x.device)
    block_rows, block_v, num_warps = _blocks(V)
    # The matmuls run in x's dtype whatever autocast says: the caller chose that dtype.
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, N, chunk_rows):
            end = min(start + chunk_rows, N)
            x_chunk = x[start:end]  # (R, d)
            logits = x_chunk @ weight.t()  # (R, V); overwritten by its gradient below
            _cross_entropy_kernel[(triton.cdiv(end - start, block_rows),)](
                logits, logits.stride(0), targets[start:end], losses[start:end], lse[start:end], end - start,
                V, ignore_index, GRAD_SCALE[x.dtype], WRITE_GRAD=write_grad, BLOCK_ROWS=block_rows, BLOCK_V=block_v, num_warps=num_warps,
            )
            if grad_x:
                torch.mm(logits, weight, out=dx[start:end])  # (R, d)
            if grad_weight:
                matmul(logits.t(), x_chunk, out=dweight, accumulate=True)  # (V, d) += (V, R) @ (R, d), fp32
    return losses.sum() / n_valid, dx, dweight, n_valid * GRAD_SCALE[x.dtype]

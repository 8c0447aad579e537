"""Fused scaled dot-product attention in Triton, forward and backward (FlashAttention-2 style).

Algorithm: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(2023), with the online softmax of Milakov & Gimelshein (2018). Notation as in the paper, per
(batch, head), with s = the softmax scale:

    S = s * Q K^T        P = softmax(S) (row-wise)        O = P V        lse_i = log sum_j exp(S_ij)

Forward: one program per block of BLOCK_M query rows. It keeps the running row maximum m, the
running denominator l and an fp32 accumulator, walks over blocks of BLOCK_N keys and rescales the
accumulator whenever the maximum grows, so the T x T matrix S never exists. Under the causal mask
the walk stops at the diagonal: key blocks entirely above it are never loaded. Blocks entirely
below the diagonal skip the mask arithmetic; only the block(s) on it apply it. The program saves
lse (fp32) for the backward. Exponentials run in base 2 (exp2 with the scale folded into
log2(e) * s), which is what the hardware computes natively.

Backward: a small kernel first computes Delta_i = rowsum(dO_i * O_i). Then one kernel recomputes
P block by block from Q, K and the saved lse (no T x T matrix is stored or materialized); its
program j works in two phases:
  - dK and dV of key block j, accumulated over the query blocks at or below the diagonal;
  - dQ of query block j, accumulated over the key blocks at or left of the diagonal.
Under the causal mask the two phases' work is complementary (late key blocks meet few queries,
late query blocks many keys), so every program does about the same work. Each gradient row is
written by exactly one program: no atomics, so results are deterministic (bitwise repeatable).

Supported inputs: q (B, H, T_q, D) and k, v (B, H, T_k, D) with the same dtype and device; any
T_q, T_k >= 1, equal when causal (query i sees keys 0..i); T_q != T_k serves a decode step over a
KV cache (causal=False). D in {16, 32, 64, 128}; fp32, fp16 or bf16; any softmax scale (default
1/sqrt(D), chosen by the caller). Tensors may be non-contiguous views (such as the model's
(B, T, H, D) -> (B, H, T, D) transpose): the kernels take every stride and copy only a tensor whose
last dimension is not unit-stride. Matmul operands stay in the input dtype; every accumulator and
the softmax statistics (m, l, lse, Delta) are fp32. Outputs are contiguous, in the input dtype.

Caveats:
  - No attention dropout: the launchers take no dropout_p, and engine/ops/triton/attention.py raises
    ValueError for dropout_p > 0 (use the `torch` or `reference` backend for a model trained with
    attention dropout).
  - fp32 inputs use exact fp32 products ("ieee") unless torch.get_float32_matmul_precision() allows
    TF32 ("high" or "medium"), mirroring PyTorch's own matmuls.
  - Block sizes are autotuned on a GPU per (D, dtype, causal, power-of-two buckets of T_q and T_k)
    among a few candidates per kind of input, so the first call at a new shape compiles and times
    them (seconds). Under TRITON_INTERPRET=1 (CPU) one fixed configuration is used: the interpreter
    cannot autotune, and it is slow (for tests).
  - bf16 runs on a GPU only: the interpreter's bf16 tl.dot is wrong (PLATFORM.md), so the forward
    launcher refuses bf16 under TRITON_INTERPRET=1.
  - The torch.library registration (autograd, torch.compile support) lives in
    engine/ops/triton/attention.py; this file holds the kernels and their launchers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import DTYPES, INTERPRET, autotune, bucket, dot_precision, launchable

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = DTYPES
LOG2_E = tl.constexpr(1.4426950408889634)  # 1 / ln(2): exp(x) = exp2(x * LOG2_E)
LN_2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN_2


# Candidate block sizes: (rows owned by a program, rows per inner step, num_warps, num_stages), per
# kind of input; the autotuner times them on the GPU. The owned block must be a multiple of the step
# (the causal split into unmasked and diagonal steps relies on it). Every entry is compiled for sm_90
# and sm_80 by the pre-flight (tests/test_preflight.py), which keeps only those that fit shared
# memory and do not spill registers on either; it dropped (forward) 128x64 with 4 warps at D <= 64;
# 128x64, 128x128 and 128x32 at D = 128 (spilling up to 324 bytes on sm_80); (backward) 64x32 with 4
# warps at D <= 64, 128x32 and 128x16 at D = 128. fp32 runs tl.dot without tensor cores (exact "ieee"
# products), which needs far more registers: small tiles, and at D = 128 only 16 x 16 keeps them.
# The interpreter gets one configuration with big blocks: its cost grows with programs x loop steps.
if INTERPRET:
    _FORWARD_BLOCKS = {"interpreter": [(64, 64, 4, 1)]}
    _BACKWARD_BLOCKS = {"interpreter": [(64, 64, 4, 1)]}
else:
    _FORWARD_BLOCKS = {
        "16-bit, D <= 64": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4)],
        "16-bit, D = 128": [(64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 8, 3), (128, 32, 8, 3)],
        "fp32, D <= 64": [(32, 32, 8, 2), (64, 32, 8, 2), (32, 16, 4, 2)],
        "fp32, D = 128": [(16, 16, 4, 2)],
    }
    _BACKWARD_BLOCKS = {
        "16-bit, D <= 64": [(128, 32, 8, 3), (128, 32, 8, 4), (64, 32, 8, 3), (128, 16, 8, 3), (64, 16, 4, 4)],
        "16-bit, D = 128": [(64, 32, 8, 3), (64, 16, 8, 3)],
        "fp32, D <= 64": [(32, 16, 4, 2), (32, 32, 8, 2)],
        "fp32, D = 128": [(16, 16, 4, 2)],
    }
_DELTA_BLOCK_M = 64
# Autotuning is keyed on power-of-two buckets of the lengths (plus D, causal and the dtypes), so
# generation, whose key length grows by one each step, does not re-tune at every length.
_TUNING_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "IS_CAUSAL"]
# Integer arguments Triton would otherwise specialize on (value 1, divisibility by 16), compiling a
# new binary per pattern of lengths; the kernels gain nothing from it (lengths only bound loops and
# masks), and one binary per (D, causal, dtype, configuration) keeps first-call compile time short.
_GENERIC_INTEGERS = ["H", "T_Q", "T_K", "Q_BUCKET", "K_BUCKET"]


def _input_kind(named_args: dict, constexprs: dict) -> str:
    """Which candidate list a launch takes (the `kind` of _common.autotune)."""
    if INTERPRET:
        return "interpreter"
    operands = "fp32" if named_args["Q"].dtype == torch.float32 else "16-bit"
    return f"{operands}, D = 128" if constexprs["HEAD_DIM"] == 128 else f"{operands}, D <= 64"


def _autotune(blocks_by_kind: dict[str, list[tuple[int, int, int, int]]], names: tuple[str, str]):
    """@triton.autotune over every listed (major, minor, warps, stages) block, pruned at launch to the inputs' kind."""
    configs_by_kind = {kind: [triton.Config({names[0]: major, names[1]: minor}, num_warps=warps, num_stages=stages)
                              for major, minor, warps, stages in blocks]
                       for kind, blocks in blocks_by_kind.items()}
    return autotune(configs_by_kind, _input_kind, _TUNING_KEY)


# ----------------------------------------------------------------------------------- kernels

@triton.jit
def _forward_steps(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T_K, qk_scale,
                   MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi): fold each block's scores into (acc, m_i, l_i).

    Scores are in base-2 units (qk_scale = s * log2 e). Per block:
        m_new = max(m, rowmax(S_blk))     P_blk = exp2(S_blk - m_new)     alpha = exp2(m - m_new)
        l = alpha * l + rowsum(P_blk)     acc = alpha * acc + P_blk V_blk
    MASKED applies the bounds mask (keys >= T_K) and, when IS_CAUSAL, the causal mask (key > query).
    Unmasked calls must cover only full, in-bounds blocks at or below the diagonal: they load
    without masks and skip the mask arithmetic.
    """
    offs_n = lo + tl.arange(0, BLOCK_N)
    kT_ptrs = K + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N): K^T
    v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, D)
    k_step = BLOCK_N * stride_kt
    v_step = BLOCK_N * stride_vt
    for _ in range(lo, hi, BLOCK_N):
        if MASKED:
            key_in_bounds = offs_n < T_K
            kT = tl.load(kT_ptrs, mask=key_in_bounds[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=key_in_bounds[:, None], other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = key_in_bounds[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(visible, s, float("-inf"))
            offs_n += BLOCK_N
        # Every row sees key 0 in the first block it processes, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        kT_ptrs += k_step
        v_ptrs += v_step
    return acc, m_i, l_i


@_autotune(_FORWARD_BLOCKS, ("BLOCK_M", "BLOCK_N"))
@triton.jit(do_not_specialize=_GENERIC_INTEGERS)
def _attention_forward_kernel(
    Q, K, V, O, LSE, scale, H, T_Q, T_K, Q_BUCKET, K_BUCKET,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * H, cdiv(T_Q, BLOCK_M)). Writes O (B, H, T_Q, D) and lse (B, H, T_Q), natural log."""
    bh = tl.program_id(0)
    # Causal query blocks further down do more work: launch them first (reverse order) so the
    # short ones fill the tail of the wave.
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    batch = (bh // H).to(tl.int64)
    head = (bh % H).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    O += batch * stride_ob + head * stride_oh
    LSE += bh.to(tl.int64) * T_Q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in_bounds = offs_m < T_Q
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_in_bounds[:, None], other=0.0)
    qk_scale = scale * LOG2_E  # scores in base-2 units for exp2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row maximum
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running unnormalized P V

    if IS_CAUSAL:
        # (T_Q == T_K.) Keys [0, start_m) are visible to every row of this block; [start_m,
        # start_m + BLOCK_M) holds the diagonal; keys beyond it are never loaded.
        acc, m_i, l_i = _forward_steps(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d,
                                       0, start_m, T_K, qk_scale, False, IS_CAUSAL, BLOCK_N, DOT_PRECISION)
        acc, m_i, l_i = _forward_steps(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d,
                                       start_m, tl.minimum(start_m + BLOCK_M, T_K), T_K, qk_scale,
                                       True, IS_CAUSAL, BLOCK_N, DOT_PRECISION)
    else:
        # Full key blocks need no mask; only the last, partial one (if T_K % BLOCK_N != 0) does.
        full_end = (T_K // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _forward_steps(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d,
                                       0, full_end, T_K, qk_scale, False, IS_CAUSAL, BLOCK_N, DOT_PRECISION)
        acc, m_i, l_i = _forward_steps(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d,
                                       full_end, T_K, T_K, qk_scale, True, IS_CAUSAL, BLOCK_N, DOT_PRECISION)

    out = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_in_bounds[:, None])
    # lse = ln(sum_j exp(S_ij)) = ln(2) * (m + log2(l)) with m, l in base-2 units.
    tl.store(LSE + offs_m, (m_i + tl.math.log2(l_i)) * LN_2, mask=row_in_bounds)


@triton.jit(do_not_specialize=["H", "T_Q"])
def _attention_delta_kernel(
    O, DO, DELTA, H, T_Q,
    stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta_i = sum_d dO_id * O_id (fp32), grid (B * H, cdiv(T_Q, BLOCK_M)).

    Delta_i equals sum_j P_ij dP_ij, the term the softmax backward subtracts (see the dK/dV steps):
    sum_j P_ij (dO_i . V_j) = dO_i . (sum_j P_ij V_j) = dO_i . O_i. Computing it from O and dO
    costs O(T D) instead of the O(T^2 D) of the definition.
    """
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in_bounds = offs_m < T_Q
    batch = (bh // H).to(tl.int64)
    head = (bh % H).to(tl.int64)
    O += batch * stride_ob + head * stride_oh
    DO += batch * stride_dob + head * stride_doh
    o = tl.load(O + offs_m[:, None] * stride_ot + offs_d[None, :], mask=row_in_bounds[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_in_bounds[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T_Q + offs_m, delta, mask=row_in_bounds)


@triton.jit
def _backward_dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n, offs_d, lo, hi, T_Q,
                         qk_scale, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate one key block's dK (unscaled) and dV over query blocks [lo, hi).

    Works on transposed tiles (keys along rows) so the owned K, V, dK, dV stay in place:
        S^T  = s K Q^T                  P^T = exp(S^T - lse)       (lse broadcast along columns)
        dV  += P^T dO
        dP^T = V dO^T
        dS^T = P^T * (dP^T - Delta)     (softmax backward: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik))
        dK  += dS^T Q                   (times s, applied once by the caller)
    Query rows >= T_Q load as zeros with lse = Delta = 0: their P^T column is 1 but dO and Q are 0,
    so they add nothing. MASKED applies the causal mask (query >= key) on the diagonal block.
    """
    offs_m = lo + tl.arange(0, BLOCK_M)
    q_ptrs = Q + offs_m[:, None] * stride_qt + offs_d[None, :]  # (BLOCK_M, D)
    do_ptrs = DO + offs_m[:, None] * stride_dot + offs_d[None, :]  # (BLOCK_M, D)
    q_step = BLOCK_M * stride_qt
    do_step = BLOCK_M * stride_dot
    for _ in range(lo, hi, BLOCK_M):
        row_in_bounds = offs_m < T_Q
        q = tl.load(q_ptrs, mask=row_in_bounds[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_in_bounds, other=0.0) * LOG2_E  # base 2
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        do = tl.load(do_ptrs, mask=row_in_bounds[:, None], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(DELTA + offs_m, mask=row_in_bounds, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        offs_m += BLOCK_M
        q_ptrs += q_step
        do_ptrs += do_step
    return dk, dv


@triton.jit
def _backward_dq_steps(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T_K, qk_scale,
                       MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate one query block's dQ (unscaled) over key blocks [lo, hi).

        S  = s Q K^T       P = exp(S - lse)       dP = dO V^T       dS = P * (dP - Delta)
        dQ += dS K         (times s, applied once by the caller)
    Key rows >= T_K (the ragged last block) load as zeros, and their P entries are set to 0: left as
    exp2(0 - lse) they overflow to inf where lse is very negative (fp16 scores, lse below about -11),
    and inf * 0 (their K rows) would be NaN in valid rows. MASKED applies the causal mask
    (key <= query) on the diagonal block.
    """
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BLOCK_N, D)
    v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, D)
    k_step = BLOCK_N * stride_kt
    v_step = BLOCK_N * stride_vt
    for _ in range(lo, hi, BLOCK_N):
        key_in_bounds = offs_n < T_K
        k = tl.load(k_ptrs, mask=key_in_bounds[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=key_in_bounds[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        visible = key_in_bounds[None, :]
        if MASKED:
            visible = visible & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        offs_n += BLOCK_N
        k_ptrs += k_step
        v_ptrs += v_step
    return dq


@_autotune(_BACKWARD_BLOCKS, ("BLOCK_MAJOR", "BLOCK_MINOR"))
@triton.jit(do_not_specialize=_GENERIC_INTEGERS)
def _attention_backward_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, scale, H, T_Q, T_K, Q_BUCKET, K_BUCKET,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_MAJOR: tl.constexpr, BLOCK_MINOR: tl.constexpr,
):
    """Grid (B * H, cdiv(max(T_Q, T_K), BLOCK_MAJOR)). Program j owns key block j and query block j
    (BLOCK_MAJOR rows each): it writes their dK, dV and then their dQ, stepping BLOCK_MINOR rows at
    a time through the other side. Under the causal mask key block j meets the T - j * BLOCK_MAJOR
    later queries and query block j the j * BLOCK_MAJOR earlier keys: every program does about the
    same work.
    """
    bh = tl.program_id(0)
    batch = (bh // H).to(tl.int64)
    head = (bh % H).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DO += batch * stride_dob + head * stride_doh
    DQ += batch * stride_dqb + head * stride_dqh
    DK += batch * stride_dkb + head * stride_dkh
    DV += batch * stride_dvb + head * stride_dvh
    LSE += bh.to(tl.int64) * T_Q
    DELTA += bh.to(tl.int64) * T_Q
    start = tl.program_id(1) * BLOCK_MAJOR
    offs_major = start + tl.arange(0, BLOCK_MAJOR)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = scale * LOG2_E

    if start < T_K:  # dK, dV of keys [start, start + BLOCK_MAJOR)
        key_in_bounds = offs_major < T_K
        k = tl.load(K + offs_major[:, None] * stride_kt + offs_d[None, :], mask=key_in_bounds[:, None], other=0.0)
        v = tl.load(V + offs_major[:, None] * stride_vt + offs_d[None, :], mask=key_in_bounds[:, None], other=0.0)
        dk = tl.zeros([BLOCK_MAJOR, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_MAJOR, HEAD_DIM], dtype=tl.float32)
        if IS_CAUSAL:
            # (T_Q == T_K.) Queries before `start` see none of these keys: never loaded. Queries on
            # the diagonal block need the mask; later queries see every key of the block.
            dk, dv = _backward_dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_major, offs_d,
                                          start, tl.minimum(start + BLOCK_MAJOR, T_Q), T_Q, qk_scale,
                                          True, BLOCK_MINOR, DOT_PRECISION)
            dk, dv = _backward_dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_major, offs_d,
                                          start + BLOCK_MAJOR, T_Q, T_Q, qk_scale, False, BLOCK_MINOR, DOT_PRECISION)
        else:
            dk, dv = _backward_dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_major, offs_d,
                                          0, T_Q, T_Q, qk_scale, False, BLOCK_MINOR, DOT_PRECISION)
        dk *= scale  # dK = s * dS^T Q
        tl.store(DK + offs_major[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=key_in_bounds[:, None])
        tl.store(DV + offs_major[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=key_in_bounds[:, None])

    if start < T_Q:  # dQ of queries [start, start + BLOCK_MAJOR)
        row_in_bounds = offs_major < T_Q
        q = tl.load(Q + offs_major[:, None] * stride_qt + offs_d[None, :], mask=row_in_bounds[:, None], other=0.0)
        do = tl.load(DO + offs_major[:, None] * stride_dot + offs_d[None, :], mask=row_in_bounds[:, None],
                     other=0.0)
        lse = tl.load(LSE + offs_major, mask=row_in_bounds, other=0.0) * LOG2_E  # base 2
        delta = tl.load(DELTA + offs_major, mask=row_in_bounds, other=0.0)
        dq = tl.zeros([BLOCK_MAJOR, HEAD_DIM], dtype=tl.float32)
        if IS_CAUSAL:
            # Keys before `start` need no mask, the diagonal block does, later keys are skipped.
            dq = _backward_dq_steps(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_major, offs_d,
                                    0, start, T_K, qk_scale, False, BLOCK_MINOR, DOT_PRECISION)
            dq = _backward_dq_steps(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_major, offs_d,
                                    start, tl.minimum(start + BLOCK_MAJOR, T_K), T_K, qk_scale,
                                    True, BLOCK_MINOR, DOT_PRECISION)
        else:
            dq = _backward_dq_steps(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_major, offs_d,
                                    0, T_K, T_K, qk_scale, False, BLOCK_MINOR, DOT_PRECISION)
        dq *= scale  # dQ = s * dS K
        tl.store(DQ + offs_major[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=row_in_bounds[:, None])


# ----------------------------------------------------------------------------------- launchers

def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """Raise ValueError for anything the kernels do not support, naming the tensor and what is valid."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, D), got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: fp32, fp16, bf16")
        if t.shape[2] < 1:
            raise ValueError(f"{name} has sequence length {t.shape[2]} (dim 2); it must be >= 1")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q (B, H, T_q, D) and k, v (B, H, T_k, D) do not match: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got T_q={q.shape[2]}, "
                         f"T_k={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dimension D={q.shape[3]} (last dim of q) is not supported; "
                         f"supported: {SUPPORTED_HEAD_DIMS}")
    if not launchable(q.device):
        raise ValueError(f"the triton attention kernels need CUDA tensors (got {q.device}); "
                         "set TRITON_INTERPRET=1 before importing triton to run them on the CPU")
    if INTERPRET and q.dtype == torch.bfloat16:
        raise ValueError("bf16 attention is not supported under TRITON_INTERPRET=1: Triton 3.6's interpreter "
                         "computes bf16 tl.dot wrongly; use fp32 or fp16 on the CPU, bf16 on a GPU")


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any (B, H, T) strides but need contiguous rows: copy only a tensor whose rows are
    not. Offsets within one (batch, head) are int32 in the kernels (batch and head offsets are int64)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    if t.shape[2] * t.stride(2) >= 2**31:
        raise ValueError(f"a (B, H, T, D) tensor with T={t.shape[2]} and row stride {t.stride(2)} spans more than "
                         "2^31 elements per head; pass a contiguous (B, H, T, D) tensor")
    return t


def _lengths(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    """T_Q, T_K and their power-of-two buckets (the autotuning key)."""
    return q.shape[2], k.shape[2], bucket(q.shape[2]), bucket(k.shape[2])


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """O = softmax(scale * Q K^T [causal]) V and lse = log sum exp of the scaled scores, per row.

    q (B, H, T_q, D), k and v (B, H, T_k, D) -> O (B, H, T_q, D) in q's dtype, lse (B, H, T_q) fp32.
    Unsupported inputs raise ValueError (this is where they are checked, once per call).
    """
    _check_inputs(q, k, v, causal)
    q, k, v = (_kernel_layout(t) for t in (q, k, v))
    B, H, T_Q, D = q.shape
    out = torch.empty((B, H, T_Q, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T_Q), dtype=torch.float32, device=q.device)
    _attention_forward_kernel[lambda meta: (B * H, triton.cdiv(T_Q, meta["BLOCK_M"]))](
        q, k, v, out, lse, float(scale), H, *_lengths(q, k),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        HEAD_DIM=D, IS_CAUSAL=bool(causal), DOT_PRECISION=dot_precision(q.dtype),
    )
    return out, lse


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV (shapes of q, k, v; their dtype) from dO, the forward's inputs, its O and its lse.

    q, k, v and causal are those attention_forward took and checked; only dO, O and lse are checked here.
    """
    if grad_out.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dO {tuple(grad_out.shape)} and O {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    if lse.shape != q.shape[:3] or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 of shape {tuple(q.shape[:3])}, got {lse.dtype} {tuple(lse.shape)}")
    do = grad_out.to(q.dtype)  # autograd may hand over a gradient in another dtype
    do, q, k, v, out = (_kernel_layout(t) for t in (do, q, k, v, out))
    lse = lse.contiguous()
    B, H, T_Q, D = q.shape
    precision = dot_precision(q.dtype)

    delta = torch.empty((B, H, T_Q), dtype=torch.float32, device=q.device)
    _attention_delta_kernel[(B * H, triton.cdiv(T_Q, _DELTA_BLOCK_M))](
        out, do, delta, H, T_Q, *out.stride()[:3], *do.stride()[:3], HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M,
    )

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    longest = max(T_Q, k.shape[2])
    _attention_backward_kernel[lambda meta: (B * H, triton.cdiv(longest, meta["BLOCK_MAJOR"]))](
        q, k, v, do, lse, delta, dq, dk, dv, float(scale), H, *_lengths(q, k),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        HEAD_DIM=D, IS_CAUSAL=bool(causal), DOT_PRECISION=precision,
    )
    return dq, dk, dv

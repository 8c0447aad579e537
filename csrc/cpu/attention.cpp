// Causal (or full) scaled dot-product attention on the CPU, forward and backward, flash-style.
//
// Algorithm: FlashAttention-2 (Dao, 2023) on the CPU. Per (batch, head) the queries and keys are
// cut into blocks of kBlock rows; the forward walks the key blocks of each query block keeping a
// running row max m and row sum l of exp (online softmax), rescaling the output accumulator when
// the max grows, and saves lse = m + log(l) per query. The backward recomputes the probabilities
// P = exp(S - lse) tile by tile. No T x T matrix exists: memory is O(T * D) per thread. With
// `causal`, key blocks entirely after a query block are skipped (about half the work).
//
// Layout and blocking: each thread packs its head into fp32 buffers padded to a multiple of
// kBlock rows and kPadD columns (zeros), with K (and V in the backward) also transposed, so every
// matmul is a sum of outer products whose inner loop runs over a contiguous row (gemm_block).
// The per-head working set (T = 1024, D = 64: 1.5 MB in the backward) stays in L2; a 64 x 64
// tile of scores stays in L1. Scores are kept in log2 units (Q is pre-multiplied by
// scale * log2(e)) so the softmax uses exp2.
//
// Parallelism: over batch x heads (at::parallel_for); B * H below the thread count leaves
// threads idle. Inputs: q, k, v (B, H, T, D) contiguous, float32, float16 or bfloat16, all the
// same dtype; fp16/bf16 are converted to fp32 at the boundary (accumulation is fp32 throughout)
// and the results converted back. lse is fp32, (B, H, T), natural log of the scaled scores.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "simd.h"

namespace engine::cpu {
namespace {

constexpr int64_t kBlock = 64;  // query and key block (rows of a score tile)
constexpr int64_t kPadD = 32;   // head dimension padded to a multiple of every tile's kCols
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// C (M x N) = [C +] A (M x K) @ B (K x N). A(i, k) is A[i * a_row + k * a_col] (so A may be a
// transposed view), B and C are row-major with leading dimensions ldb and ldc.
// Requires M % Tile::kRows == 0 and N % Tile::kCols == 0 (the callers' padding guarantees it).
// A kRows x kCols block of C stays in registers while k runs: each step broadcasts one element
// of A per row and multiplies it into one contiguous row segment of B (vectorized over columns).
template <class Tile, bool kAccumulate>
ENGINE_ALWAYS_INLINE void gemm_block(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col,
                                     const float* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int R = Tile::kRows;
  constexpr int W = Tile::kCols;
  for (int64_t i0 = 0; i0 < M; i0 += R) {
    for (int64_t j0 = 0; j0 < N; j0 += W) {
      float acc[R][W];
      for (int r = 0; r < R; ++r) {
        ENGINE_SIMD
        for (int w = 0; w < W; ++w) acc[r][w] = kAccumulate ? C[(i0 + r) * ldc + j0 + w] : 0.0f;
      }
      for (int64_t k = 0; k < K; ++k) {
        const float* b = B + k * ldb + j0;
        for (int r = 0; r < R; ++r) {
          const float a = A[(i0 + r) * a_row + k * a_col];
          ENGINE_SIMD
          for (int w = 0; w < W; ++w) acc[r][w] += a * b[w];
        }
      }
      for (int r = 0; r < R; ++r) {
        ENGINE_SIMD
        for (int w = 0; w < W; ++w) C[(i0 + r) * ldc + j0 + w] = acc[r][w];
      }
    }
  }
}

// dst (rows_padded x cols_padded) = src (rows x cols, row-major) * factor, zero padded.
ENGINE_ALWAYS_INLINE void pack_rows(float* dst, const float* src, int64_t rows, int64_t cols, int64_t rows_padded,
                                    int64_t cols_padded, float factor) {
  for (int64_t i = 0; i < rows_padded; ++i) {
    float* out = dst + i * cols_padded;
    if (i >= rows) {
      std::fill(out, out + cols_padded, 0.0f);
      continue;
    }
    const float* in = src + i * cols;
    ENGINE_SIMD
    for (int64_t c = 0; c < cols; ++c) out[c] = in[c] * factor;
    std::fill(out + cols, out + cols_padded, 0.0f);
  }
}

// Transpose src (rows x cols) * factor block by block: block b (rows b*kBlock ..) becomes a (cols_padded x
// kBlock) matrix at dst + b * cols_padded * kBlock, zero padded. Transposing the whole (cols x T)
// instead would put the rows a tile reads T floats apart, which for T a multiple of 1024 all fall
// in the same L1 cache set.
ENGINE_ALWAYS_INLINE void pack_transposed_blocks(float* dst, const float* src, int64_t rows, int64_t cols,
                                                 int64_t rows_padded, int64_t cols_padded, float factor) {
  std::fill(dst, dst + cols_padded * rows_padded, 0.0f);
  for (int64_t i = 0; i < rows; ++i) {
    float* block = dst + (i / kBlock) * cols_padded * kBlock + i % kBlock;
    for (int64_t c = 0; c < cols; ++c) block[c * kBlock] = src[i * cols + c] * factor;
  }
}

// Keys a query row may see: 0 .. visible_keys(i) - 1.
ENGINE_ALWAYS_INLINE int64_t visible_keys(int64_t query, int64_t T, bool causal) {
  return causal ? std::min(query + 1, T) : T;
}

struct HeadShape {
  int64_t T, D;
  int64_t padded_T() const { return round_up(T, kBlock); }
  int64_t padded_D() const { return round_up(D, kPadD); }
};

// ---------------------------------------------------------------------------------- forward

struct ForwardHead {
  HeadShape shape;
  const float* q;  // (T, D) each
  const float* k;
  const float* v;
  float* out;  // (T, D)
  float* lse;  // (T,)
  bool causal;
  float scale;
  float* workspace;  // workspace_floats(shape) floats

  static int64_t workspace_floats(const HeadShape& s) {
    const int64_t Tp = s.padded_T(), Dp = s.padded_D();
    return 3 * Tp * Dp + kBlock * kBlock + kBlock * Dp + 5 * kBlock;
  }
};

// The score tile is computed transposed, St = K Qs^T (keys x queries), so that the softmax
// statistics of the 64 queries are vectors: the row max and row sum become element-wise max and
// add over the tile's rows, with no horizontal reduction and no per-query scalar work.
template <class Tile>
ENGINE_ALWAYS_INLINE void forward_head(const ForwardHead& h) {
  const int64_t T = h.shape.T, D = h.shape.D, Tp = h.shape.padded_T(), Dp = h.shape.padded_D();
  float* Qt = h.workspace;           // (Tp / kBlock) x (Dp, kBlock): Q * scale * log2(e), transposed per block
  float* Kp = Qt + Dp * Tp;          // (Tp, Dp)
  float* Vp = Kp + Tp * Dp;          // (Tp, Dp)
  float* St = Vp + Tp * Dp;          // (kBlock keys, kBlock queries): scores in log2 units, then probabilities
  float* O = St + kBlock * kBlock;   // (kBlock, Dp): unnormalized output of the query block
  float* m = O + kBlock * Dp;        // (kBlock,): running max of each query's scores
  float* l = m + kBlock;             // (kBlock,): running sum of exp2(score - m)
  float* tile_max = l + kBlock;      // (kBlock,): per query, of this tile
  float* tile_sum = tile_max + kBlock;
  float* alpha = tile_sum + kBlock;  // (kBlock,): exp2(m_old - m_new)
  pack_transposed_blocks(Qt, h.q, T, D, Tp, Dp, h.scale * kLog2e);
  pack_rows(Kp, h.k, T, D, Tp, Dp, 1.0f);
  pack_rows(Vp, h.v, T, D, Tp, Dp, 1.0f);

  for (int64_t q0 = 0; q0 < T; q0 += kBlock) {
    std::fill(O, O + kBlock * Dp, 0.0f);
    std::fill(m, m + kBlock, kNegInf);
    std::fill(l, l + kBlock, 0.0f);
    const int64_t key_end = h.causal ? std::min(T, q0 + kBlock) : T;  // causal: later blocks are skipped
    // Tiles reaching past the first query's last visible key (the diagonal, the padding) are masked.
    const int64_t unmasked_end = h.causal ? std::min(q0 + 1, T) : T;
    for (int64_t k0 = 0; k0 < key_end; k0 += kBlock) {
      gemm_block<Tile, false>(kBlock, kBlock, Dp, Kp + k0 * Dp, Dp, 1, Qt + q0 * Dp, kBlock, St, kBlock);
      if (k0 + kBlock > unmasked_end) {
        for (int64_t j = 0; j < kBlock; ++j) {
          float* st = St + j * kBlock;
          ENGINE_SIMD
          for (int64_t i = 0; i < kBlock; ++i) {
            st[i] = k0 + j < visible_keys(q0 + i, T, h.causal) ? st[i] : kNegInf;
          }
        }
      }
      // Online softmax, per query i: m_new = max(m, max_j S_ij); P_ij = exp2(S_ij - m_new);
      // l = l * exp2(m - m_new) + sum_j P_ij; O_i = O_i * exp2(m - m_new) + sum_j P_ij V_j.
      std::fill(tile_max, tile_max + kBlock, kNegInf);
      for (int64_t j = 0; j < kBlock; ++j) {
        const float* st = St + j * kBlock;
        ENGINE_SIMD
        for (int64_t i = 0; i < kBlock; ++i) tile_max[i] = st[i] > tile_max[i] ? st[i] : tile_max[i];
      }
      ENGINE_SIMD
      for (int64_t i = 0; i < kBlock; ++i) {
        const float m_new = m[i] > tile_max[i] ? m[i] : tile_max[i];  // finite: key 0 is visible to all
        alpha[i] = exp2_approx(m[i] - m_new);                         // 0 on the first tile (m = -inf)
        m[i] = m_new;
        tile_sum[i] = 0.0f;
      }
      for (int64_t j = 0; j < kBlock; ++j) {
        float* st = St + j * kBlock;
        ENGINE_SIMD
        for (int64_t i = 0; i < kBlock; ++i) {
          const float p = exp2_approx(st[i] - m[i]);
          st[i] = p;
          tile_sum[i] += p;
        }
      }
      for (int64_t i = 0; i < kBlock; ++i) {
        l[i] = l[i] * alpha[i] + tile_sum[i];
        if (alpha[i] != 1.0f) {
          float* o = O + i * Dp;
          ENGINE_SIMD
          for (int64_t d = 0; d < Dp; ++d) o[d] *= alpha[i];
        }
      }
      gemm_block<Tile, true>(kBlock, Dp, kBlock, St, 1, kBlock, Vp + k0 * Dp, Dp, O, Dp);  // O += P V, P = St^T
    }
    const int64_t rows = std::min(kBlock, T - q0);
    for (int64_t r = 0; r < rows; ++r) {
      const float inverse_l = 1.0f / l[r];
      const float* o = O + r * Dp;
      float* out = h.out + (q0 + r) * D;
      ENGINE_SIMD
      for (int64_t d = 0; d < D; ++d) out[d] = o[d] * inverse_l;
      h.lse[q0 + r] = (m[r] + std::log2(l[r])) * kLn2;  // back to natural-log units
    }
  }
}

ENGINE_ISA_VARIANTS(attention_forward_head, forward_head, ForwardHead)

// --------------------------------------------------------------------------------- backward
//
// With S = scale * Q K^T, P = softmax(S) = exp(S - lse), O = P V and dO the incoming gradient:
//   dV = P^T dO
//   dP = dO V^T
//   dS = P * (dP - Delta),  Delta_i = sum_j P_ij dP_ij = dO_i . O_i
//   dQ = scale * dS K,      dK = scale * dS^T Q
// Here Q is packed as Qs = Q * scale * log2(e), so dK = dS^T Qs * ln(2). Each thread walks the
// key blocks of a head, accumulating dK and dV of the block over the query blocks that see it,
// and dQ of the whole head in a buffer of its own (no atomics, no cross-thread reduction).

struct BackwardHead {
  HeadShape shape;
  const float* grad_out;  // (T, D) each
  const float* q;
  const float* k;
  const float* v;
  const float* out;
  const float* lse;  // (T,)
  float* grad_q;     // (T, D) each
  float* grad_k;
  float* grad_v;
  bool causal;
  float scale;
  float* workspace;  // workspace_floats(shape) floats

  static int64_t workspace_floats(const HeadShape& s) {
    const int64_t Tp = s.padded_T(), Dp = s.padded_D();
    return 6 * Tp * Dp + 2 * Tp + 2 * kBlock * kBlock + 2 * kBlock * Dp;
  }
};

template <class Tile>
ENGINE_ALWAYS_INLINE void backward_head(const BackwardHead& h) {
  const int64_t T = h.shape.T, D = h.shape.D, Tp = h.shape.padded_T(), Dp = h.shape.padded_D();
  float* Qs = h.workspace;          // (Tp, Dp): Q * scale * log2(e)
  float* Kp = Qs + Tp * Dp;         // (Tp, Dp)
  float* Kt = Kp + Tp * Dp;         // (Tp / kBlock) x (Dp, kBlock)
  float* Vt = Kt + Dp * Tp;         // (Tp / kBlock) x (Dp, kBlock)
  float* dO = Vt + Dp * Tp;         // (Tp, Dp)
  float* dQ = dO + Tp * Dp;         // (Tp, Dp): sum over key blocks of dS K
  float* lse2 = dQ + Tp * Dp;       // (Tp,): lse in log2 units
  float* delta = lse2 + Tp;         // (Tp,)
  float* P = delta + Tp;            // (kBlock, kBlock)
  float* dS = P + kBlock * kBlock;  // (kBlock, kBlock): dP, then dS
  float* dK = dS + kBlock * kBlock;  // (kBlock, Dp)
  float* dV = dK + kBlock * Dp;     // (kBlock, Dp)
  pack_rows(Qs, h.q, T, D, Tp, Dp, h.scale * kLog2e);
  pack_rows(Kp, h.k, T, D, Tp, Dp, 1.0f);
  pack_transposed_blocks(Kt, h.k, T, D, Tp, Dp, 1.0f);
  pack_transposed_blocks(Vt, h.v, T, D, Tp, Dp, 1.0f);
  pack_rows(dO, h.grad_out, T, D, Tp, Dp, 1.0f);
  std::fill(dQ, dQ + Tp * Dp, 0.0f);
  // Padded query rows get lse2 = 0 and Delta = 0: their dO rows are zero, so they add nothing.
  for (int64_t i = 0; i < Tp; ++i) {
    float dot = 0.0f;
    if (i < T) {
      const float* o = h.out + i * D;
      const float* g = h.grad_out + i * D;
      ENGINE_SIMD_REDUCE(+, dot)
      for (int64_t d = 0; d < D; ++d) dot += o[d] * g[d];
    }
    delta[i] = dot;
    lse2[i] = i < T ? h.lse[i] * kLog2e : 0.0f;
  }

  for (int64_t k0 = 0; k0 < T; k0 += kBlock) {
    std::fill(dK, dK + kBlock * Dp, 0.0f);
    std::fill(dV, dV + kBlock * Dp, 0.0f);
    for (int64_t q0 = h.causal ? k0 : 0; q0 < T; q0 += kBlock) {  // causal: earlier queries never see k0..
      gemm_block<Tile, false>(kBlock, kBlock, Dp, Qs + q0 * Dp, Dp, 1, Kt + k0 * Dp, kBlock, P, kBlock);  // S (log2)
      for (int64_t r = 0; r < kBlock; ++r) {
        float* p = P + r * kBlock;
        const float row_lse2 = lse2[q0 + r];
        const int64_t valid = visible_keys(q0 + r, T, h.causal) - k0;
        ENGINE_SIMD
        for (int64_t j = 0; j < kBlock; ++j) p[j] = j < valid ? exp2_approx(p[j] - row_lse2) : 0.0f;
      }
      gemm_block<Tile, true>(kBlock, Dp, kBlock, P, 1, kBlock, dO + q0 * Dp, Dp, dV, Dp);  // dV += P^T dO
      gemm_block<Tile, false>(kBlock, kBlock, Dp, dO + q0 * Dp, Dp, 1, Vt + k0 * Dp, kBlock, dS, kBlock);  // dP = dO V^T
      for (int64_t r = 0; r < kBlock; ++r) {
        float* ds = dS + r * kBlock;
        const float* p = P + r * kBlock;
        const float row_delta = delta[q0 + r];
        ENGINE_SIMD
        for (int64_t j = 0; j < kBlock; ++j) ds[j] = p[j] * (ds[j] - row_delta);  // dS = P * (dP - Delta)
      }
      gemm_block<Tile, true>(kBlock, Dp, kBlock, dS, 1, kBlock, Qs + q0 * Dp, Dp, dK, Dp);  // dK += dS^T Qs
      gemm_block<Tile, true>(kBlock, Dp, kBlock, dS, kBlock, 1, Kp + k0 * Dp, Dp, dQ + q0 * Dp, Dp);  // dQ += dS K
    }
    const int64_t rows = std::min(kBlock, T - k0);
    for (int64_t r = 0; r < rows; ++r) {
      float* grad_k = h.grad_k + (k0 + r) * D;
      float* grad_v = h.grad_v + (k0 + r) * D;
      const float* dk = dK + r * Dp;
      const float* dv = dV + r * Dp;
      ENGINE_SIMD
      for (int64_t d = 0; d < D; ++d) {
        grad_k[d] = dk[d] * kLn2;
        grad_v[d] = dv[d];
      }
    }
  }
  for (int64_t i = 0; i < T; ++i) {
    float* grad_q = h.grad_q + i * D;
    const float* dq = dQ + i * Dp;
    ENGINE_SIMD
    for (int64_t d = 0; d < D; ++d) grad_q[d] = dq[d] * h.scale;
  }
}

ENGINE_ISA_VARIANTS(attention_backward_head, backward_head, BackwardHead)

// ------------------------------------------------------------------------------ torch glue

void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
}

void check_head_tensor(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            const char* op) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, T, D), got shape ", q.sizes());
  check_float_dtype(q, op, "q");
  check_head_tensor(q, q, op, "q");
  check_head_tensor(k, q, op, "k");
  check_head_tensor(v, q, op, "v");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool causal, double scale) {
  constexpr const char* op = "engine::attention_forward";
  check_attention_inputs(q, k, v, scale, op);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const at::Tensor q32 = as_float(q), k32 = as_float(k), v32 = as_float(v);
  at::Tensor out = at::empty({B, H, T, D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    const HeadShape shape{T, D};
    const float* q_data = q32.data_ptr<float>();
    const float* k_data = k32.data_ptr<float>();
    const float* v_data = v32.data_ptr<float>();
    float* out_data = out.data_ptr<float>();
    float* lse_data = lse.data_ptr<float>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<float[]> workspace(new float[ForwardHead::workspace_floats(shape)]);  // uninitialized
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t offset = bh * T * D;
        attention_forward_head(ForwardHead{shape, q_data + offset, k_data + offset, v_data + offset,
                                           out_data + offset, lse_data + bh * T, causal, static_cast<float>(scale),
                                           workspace.get()});
      }
    });
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double scale) {
  constexpr const char* op = "engine::attention_backward";
  check_attention_inputs(q, k, v, scale, op);
  check_head_tensor(grad_out, q, op, "grad_out");
  check_head_tensor(out, q, op, "out");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(lse.device().is_cpu(), op, ": lse must be a CPU tensor, got ", lse.device());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, T}), op, ": lse must have shape (B, H, T) = ",
              at::IntArrayRef({B, H, T}), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.is_contiguous(), op, ": lse must be contiguous");
  const at::Tensor grad_out32 = as_float(grad_out), q32 = as_float(q), k32 = as_float(k), v32 = as_float(v),
                   out32 = as_float(out);
  const auto options = q.options().dtype(at::kFloat);
  at::Tensor grad_q = at::empty({B, H, T, D}, options);
  at::Tensor grad_k = at::empty({B, H, T, D}, options);
  at::Tensor grad_v = at::empty({B, H, T, D}, options);
  if (grad_q.numel() > 0) {
    const HeadShape shape{T, D};
    const float* grad_out_data = grad_out32.data_ptr<float>();
    const float* q_data = q32.data_ptr<float>();
    const float* k_data = k32.data_ptr<float>();
    const float* v_data = v32.data_ptr<float>();
    const float* out_data = out32.data_ptr<float>();
    const float* lse_data = lse.data_ptr<float>();
    float* grad_q_data = grad_q.data_ptr<float>();
    float* grad_k_data = grad_k.data_ptr<float>();
    float* grad_v_data = grad_v.data_ptr<float>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<float[]> workspace(new float[BackwardHead::workspace_floats(shape)]);  // uninitialized
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t offset = bh * T * D;
        attention_backward_head(BackwardHead{shape, grad_out_data + offset, q_data + offset, k_data + offset,
                                             v_data + offset, out_data + offset, lse_data + bh * T,
                                             grad_q_data + offset, grad_k_data + offset, grad_v_data + offset,
                                             causal, static_cast<float>(scale), workspace.get()});
      }
    });
  }
  const auto dtype = q.scalar_type();
  return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype)};
}

}  // namespace
}  // namespace engine::cpu

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("attention_forward", &engine::cpu::attention_forward);
  m.impl("attention_backward", &engine::cpu::attention_backward);
}

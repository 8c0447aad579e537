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
// kBlock rows and kPadD columns (zeros), some transposed block by block (Q in the forward, K and
// V in the backward), so every matmul is a sum of outer products whose inner loop runs over a
// contiguous row (gemm_block, vectorized by the compiler, see simd.h). The forward computes its
// score tile transposed (keys x queries) so the softmax statistics are vectors. The per-head
// working set (T = 1024, D = 64: 1.5 MB in the backward) stays in L2; a 64 x 64 tile of scores
// stays in L1. Scores are kept in log2 units (Q is pre-multiplied by scale * log2(e)) so the
// softmax uses exp2. The packing buffers are per thread and kept between calls.
//
// Causal diagonal tiles (query block == key block) skip the register blocks and reduction steps
// the mask zeroes (gemm_block's `causal`), about 40% of their matmul work.
//
// Parallelism: over batch x heads (at::parallel_for); B * H below the thread count leaves
// threads idle. Inputs (checked by csrc/glue.cpp): q, k, v, and in the backward grad_out and out,
// (B, H, T, D) of one dtype, float32, float16 or bfloat16, with any strides (each head is packed,
// so transposed views cost no copy); fp16/bf16 elements are widened to fp32 as they are packed
// (accumulation is fp32 throughout) and the results rounded as they are written into the contiguous
// outputs: no fp32 copy of a whole tensor is made. lse is fp32, (B, H, T),
// natural log of the scaled scores.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace engine::cpu {
namespace {

constexpr int64_t kBlock = 64;  // query and key block (rows of a score tile)
constexpr int64_t kPadD = 16;   // head dimension padded to a multiple of 16 (see gemm_block_dp)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// On a causal diagonal tile (query block == key block), the part of a product that the mask zeroes:
// with r the output row, c the output column and k the reduction index, all local to the tile.
enum class Causal {
  kFull,            // not a diagonal tile: compute everything
  kColumnsFromRow,  // only C[r][c] with c >= r is needed (columns are queries, rows keys)
  kColumnsUpToRow,  // only C[r][c] with c <= r is needed (rows are queries, columns keys)
  kReduceUpToRow,   // A(r, k) = 0 for k > r
  kReduceFromRow,   // A(r, k) = 0 for k < r
};

// C (M x N) = [C +] A (M x K) @ B (K x N). A(i, k) is A[i * a_row + k * a_col] (so A may be a
// transposed view), B and C are row-major with leading dimensions ldb and ldc.
// Requires M % Tile::kRows == 0 and N % Tile::kCols == 0 (the callers' padding guarantees it).
// A kRows x kCols block of C stays in registers while k runs: each step broadcasts one element
// of A per row and multiplies it into one contiguous row segment of B (vectorized over columns).
// `causal` skips the register blocks (kColumns*: left unwritten, the caller masks them) or the
// reduction steps (kReduce*: exactly zero) that a causal diagonal tile does not need.
template <class Tile, bool kAccumulate>
ENGINE_ALWAYS_INLINE void gemm_block(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col,
                                     const float* B, int64_t ldb, float* C, int64_t ldc,
                                     Causal causal = Causal::kFull) {
  constexpr int R = Tile::kRows;
  constexpr int W = Tile::kCols;
  for (int64_t i0 = 0; i0 < M; i0 += R) {
    int64_t j_begin = 0, j_end = N, k_begin = 0, k_end = K;
    switch (causal) {
      case Causal::kFull: break;
      case Causal::kColumnsFromRow: j_begin = i0 / W * W; break;
      case Causal::kColumnsUpToRow: j_end = std::min(N, round_up(i0 + R, W)); break;
      case Causal::kReduceUpToRow: k_end = std::min(K, i0 + R); break;
      case Causal::kReduceFromRow: k_begin = i0; break;
    }
    for (int64_t j0 = j_begin; j0 < j_end; j0 += W) {
      float acc[R][W];
      for (int r = 0; r < R; ++r) {
        ENGINE_SIMD
        for (int w = 0; w < W; ++w) acc[r][w] = kAccumulate ? C[(i0 + r) * ldc + j0 + w] : 0.0f;
      }
      for (int64_t k = k_begin; k < k_end; ++k) {
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

// The register tile of a product whose columns are the padded head dimension Dp: with AVX-512's 32-column
// tile a head dimension of 16 (or 48, 80, ...) would be padded to the next multiple of 32, which for
// D = 16 doubles the work of every product. Such products use a 16-column tile with as many accumulators
// (twice the rows) instead. AVX2's and the baseline's tiles divide 16 already.
template <class Tile>
struct NarrowTile {
  static constexpr int kCols = 16;
  static constexpr int kRows = Tile::kRows * Tile::kCols / kCols;
};

// gemm_block for N = Dp (a multiple of kPadD): the ISA's tile when it divides N, else NarrowTile.
template <class Tile, bool kAccumulate>
ENGINE_ALWAYS_INLINE void gemm_block_dp(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col,
                                        const float* B, int64_t ldb, float* C, int64_t ldc, Causal causal) {
  if (N % Tile::kCols == 0) {
    gemm_block<Tile, kAccumulate>(M, N, K, A, a_row, a_col, B, ldb, C, ldc, causal);
  } else {
    gemm_block<NarrowTile<Tile>, kAccumulate>(M, N, K, A, a_row, a_col, B, ldb, C, ldc, causal);
  }
}

// One head of a (B, H, T, D) tensor of element type E with any strides: element (t, d) is
// data[t * row + d * col].
template <class E>
struct HeadView {
  const E* data;
  int64_t row, col;
  ENGINE_ALWAYS_INLINE const E* row_data(int64_t t) const { return data + t * row; }
};

// dst (rows_padded x cols_padded) = src (rows x cols) * factor, zero padded.
template <class E>
ENGINE_ALWAYS_INLINE void pack_rows(float* dst, const HeadView<E>& src, int64_t rows, int64_t cols,
                                    int64_t rows_padded, int64_t cols_padded, float factor) {
  for (int64_t i = 0; i < rows_padded; ++i) {
    float* out = dst + i * cols_padded;
    if (i >= rows) {
      std::fill(out, out + cols_padded, 0.0f);
      continue;
    }
    const E* in = src.row_data(i);
    if (src.col == 1) {
      ENGINE_SIMD
      for (int64_t c = 0; c < cols; ++c) out[c] = to_float(in[c]) * factor;
    } else {
      for (int64_t c = 0; c < cols; ++c) out[c] = to_float(in[c * src.col]) * factor;
    }
    std::fill(out + cols, out + cols_padded, 0.0f);
  }
}

// Transpose src (rows x cols) * factor block by block: block b (rows b*kBlock ..) becomes a (cols_padded x
// kBlock) matrix at dst + b * cols_padded * kBlock, zero padded. Transposing the whole (cols x T)
// instead would put the rows a tile reads T floats apart, which for T a multiple of 1024 all fall
// in the same L1 cache set. Each block is first packed row by row into `scratch` (kBlock x cols_padded
// floats, in L1): contiguous, vectorized reads of the source, which has any strides and may be bf16/fp16
// (a gather of 16-bit elements would be scalar), then transposed from there.
template <class E>
ENGINE_ALWAYS_INLINE void pack_transposed_blocks(float* dst, const HeadView<E>& src, int64_t rows, int64_t cols,
                                                 int64_t rows_padded, int64_t cols_padded, float factor,
                                                 float* scratch) {
  for (int64_t i0 = 0; i0 < rows_padded; i0 += kBlock) {
    float* block = dst + i0 * cols_padded;  // (cols_padded, kBlock)
    const int64_t valid_rows = std::min(kBlock, rows - i0);
    pack_rows(scratch, HeadView<E>{src.row_data(i0), src.row, src.col}, valid_rows, cols, valid_rows, cols_padded,
              factor);
    for (int64_t c = 0; c < cols; ++c) {
      float* out = block + c * kBlock;  // written contiguously, read with the row stride
      const float* in = scratch + c;
      ENGINE_SIMD  // a gather of rows: 16 at a time instead of one scalar load each
      for (int64_t i = 0; i < valid_rows; ++i) out[i] = in[i * cols_padded];
      std::fill(out + valid_rows, out + kBlock, 0.0f);
    }
    std::fill(block + cols * kBlock, block + cols_padded * kBlock, 0.0f);
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

// Rows of a head as a matmul operand: the head itself when it already has the packed layout (float32,
// contiguous rows of exactly padded_D() floats, T a multiple of kBlock), else a packed copy in `buffer`.
struct Rows {
  const float* data;
  int64_t row;  // row stride, in floats
  ENGINE_ALWAYS_INLINE const float* row_data(int64_t t) const { return data + t * row; }
};

template <class E>
ENGINE_ALWAYS_INLINE Rows rows_or_pack(float* buffer, const HeadView<E>& src, const HeadShape& s) {
  const int64_t Tp = s.padded_T(), Dp = s.padded_D();
  if constexpr (std::is_same_v<E, float>) {
    if (src.col == 1 && src.row == Dp && s.T == Tp && s.D == Dp) return Rows{src.data, Dp};
  }
  pack_rows(buffer, src, s.T, s.D, Tp, Dp, 1.0f);
  return Rows{buffer, Dp};
}

// ---------------------------------------------------------------------------------- forward

template <class E>
struct ForwardHead {
  HeadShape shape;
  HeadView<E> q, k, v;
  E* out;      // (T, D) contiguous
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
template <class Tile, class E>
ENGINE_ALWAYS_INLINE void forward_head(const ForwardHead<E>& h) {
  const int64_t T = h.shape.T, D = h.shape.D, Tp = h.shape.padded_T(), Dp = h.shape.padded_D();
  float* Qt = h.workspace;           // (Tp / kBlock) x (Dp, kBlock): Q * scale * log2(e), transposed per block
  float* Kp = Qt + Dp * Tp;          // (Tp, Dp), if K needs packing
  float* Vp = Kp + Tp * Dp;          // (Tp, Dp), if V needs packing
  float* St = Vp + Tp * Dp;          // (kBlock keys, kBlock queries): scores in log2 units, then probabilities
  float* O = St + kBlock * kBlock;   // (kBlock, Dp): unnormalized output of the query block
  float* m = O + kBlock * Dp;        // (kBlock,): running max of each query's scores
  float* l = m + kBlock;             // (kBlock,): running sum of exp2(score - m)
  float* tile_max = l + kBlock;      // (kBlock,): per query, of this tile
  float* tile_sum = tile_max + kBlock;
  float* alpha = tile_sum + kBlock;  // (kBlock,): exp2(m_old - m_new)
  pack_transposed_blocks(Qt, h.q, T, D, Tp, Dp, h.scale * kLog2e, O);  // O is free until the loop
  const Rows K = rows_or_pack(Kp, h.k, h.shape), V = rows_or_pack(Vp, h.v, h.shape);

  for (int64_t q0 = 0; q0 < T; q0 += kBlock) {
    std::fill(O, O + kBlock * Dp, 0.0f);
    std::fill(m, m + kBlock, kNegInf);
    std::fill(l, l + kBlock, 0.0f);
    const int64_t key_end = h.causal ? std::min(T, q0 + kBlock) : T;  // causal: later blocks are skipped
    // Tiles reaching past the first query's last visible key (the diagonal, the padding) are masked.
    const int64_t unmasked_end = h.causal ? std::min(q0 + 1, T) : T;
    for (int64_t k0 = 0; k0 < key_end; k0 += kBlock) {
      const bool diagonal = h.causal && k0 == q0;
      gemm_block<Tile, false>(kBlock, kBlock, Dp, K.row_data(k0), K.row, 1, Qt + q0 * Dp, kBlock, St, kBlock,
                              diagonal ? Causal::kColumnsFromRow : Causal::kFull);  // St = K Qs^T
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
      gemm_block_dp<Tile, true>(kBlock, Dp, kBlock, St, 1, kBlock, V.row_data(k0), V.row, O, Dp,
                             diagonal ? Causal::kReduceUpToRow : Causal::kFull);  // O += P V, P = St^T
    }
    const int64_t rows = std::min(kBlock, T - q0);
    for (int64_t r = 0; r < rows; ++r) {
      const float inverse_l = 1.0f / l[r];
      const float* o = O + r * Dp;
      E* out = h.out + (q0 + r) * D;
      ENGINE_SIMD
      for (int64_t d = 0; d < D; ++d) out[d] = from_float<E>(o[d] * inverse_l);
      h.lse[q0 + r] = (m[r] + std::log2(l[r])) * kLn2;  // back to natural-log units
    }
  }
}

ENGINE_ISA_VARIANTS_PER_ELEMENT(attention_forward_head, forward_head, ForwardHead)

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

template <class E>
struct BackwardHead {
  HeadShape shape;
  HeadView<E> grad_out, q, k, v, out;
  const float* lse;  // (T,)
  E* grad_q;         // (T, D) contiguous, each
  E* grad_k;
  E* grad_v;
  bool causal;
  float scale;
  float* workspace;  // workspace_floats(shape) floats

  static int64_t workspace_floats(const HeadShape& s) {
    const int64_t Tp = s.padded_T(), Dp = s.padded_D();
    return 6 * Tp * Dp + 2 * Tp + 2 * kBlock * kBlock + 2 * kBlock * Dp;
  }
};

template <class Tile, class E>
ENGINE_ALWAYS_INLINE void backward_head(const BackwardHead<E>& h) {
  const int64_t T = h.shape.T, D = h.shape.D, Tp = h.shape.padded_T(), Dp = h.shape.padded_D();
  float* Qs = h.workspace;           // (Tp, Dp): Q * scale * log2(e)
  float* Kp = Qs + Tp * Dp;          // (Tp, Dp), if K needs packing
  float* Kt = Kp + Tp * Dp;          // (Tp / kBlock) x (Dp, kBlock)
  float* Vt = Kt + Dp * Tp;          // (Tp / kBlock) x (Dp, kBlock)
  float* dOp = Vt + Dp * Tp;         // (Tp, Dp), if dO needs packing
  float* dQ = dOp + Tp * Dp;         // (Tp, Dp): sum over key blocks of dS K
  float* lse2 = dQ + Tp * Dp;        // (Tp,): lse in log2 units
  float* delta = lse2 + Tp;          // (Tp,)
  float* P = delta + Tp;             // (kBlock, kBlock)
  float* dS = P + kBlock * kBlock;   // (kBlock, kBlock): dP, then dS
  float* dK = dS + kBlock * kBlock;  // (kBlock, Dp)
  float* dV = dK + kBlock * Dp;      // (kBlock, Dp)
  pack_rows(Qs, h.q, T, D, Tp, Dp, h.scale * kLog2e);
  const Rows K = rows_or_pack(Kp, h.k, h.shape);
  pack_transposed_blocks(Kt, h.k, T, D, Tp, Dp, 1.0f, dK);  // dK is free until the loop
  pack_transposed_blocks(Vt, h.v, T, D, Tp, Dp, 1.0f, dK);
  const Rows dO = rows_or_pack(dOp, h.grad_out, h.shape);
  // Padded query rows get lse2 = 0 and Delta = 0: their dO rows are zero, so they add nothing.
  // O is read as contiguous rows (packed into dQ, zeroed after, if need be) so that Delta's dot
  // products vectorize as sums of partial sums, whatever out's strides.
  const Rows O = rows_or_pack(dQ, h.out, h.shape);
  for (int64_t i = 0; i < Tp; ++i) {
    const float* o = O.row_data(i);
    const float* g = dO.row_data(i);
    delta[i] = sum_terms(Dp, [&](int64_t d) ENGINE_INLINE_LAMBDA { return o[d] * g[d]; });
    lse2[i] = i < T ? h.lse[i] * kLog2e : 0.0f;
  }
  std::fill(dQ, dQ + Tp * Dp, 0.0f);

  for (int64_t k0 = 0; k0 < T; k0 += kBlock) {
    std::fill(dK, dK + kBlock * Dp, 0.0f);
    std::fill(dV, dV + kBlock * Dp, 0.0f);
    for (int64_t q0 = h.causal ? k0 : 0; q0 < T; q0 += kBlock) {  // causal: earlier queries never see k0..
      const bool diagonal = h.causal && q0 == k0;
      gemm_block<Tile, false>(kBlock, kBlock, Dp, Qs + q0 * Dp, Dp, 1, Kt + k0 * Dp, kBlock, P, kBlock,
                              diagonal ? Causal::kColumnsUpToRow : Causal::kFull);  // S (log2 units)
      for (int64_t r = 0; r < kBlock; ++r) {
        float* p = P + r * kBlock;
        const float row_lse2 = lse2[q0 + r];
        const int64_t valid = visible_keys(q0 + r, T, h.causal) - k0;
        ENGINE_SIMD
        for (int64_t j = 0; j < kBlock; ++j) p[j] = j < valid ? exp2_approx(p[j] - row_lse2) : 0.0f;
      }
      gemm_block_dp<Tile, true>(kBlock, Dp, kBlock, P, 1, kBlock, dO.row_data(q0), dO.row, dV, Dp,
                             diagonal ? Causal::kReduceFromRow : Causal::kFull);  // dV += P^T dO
      gemm_block<Tile, false>(kBlock, kBlock, Dp, dO.row_data(q0), dO.row, 1, Vt + k0 * Dp, kBlock, dS, kBlock,
                              diagonal ? Causal::kColumnsUpToRow : Causal::kFull);  // dP = dO V^T
      for (int64_t r = 0; r < kBlock; ++r) {
        float* ds = dS + r * kBlock;
        const float* p = P + r * kBlock;
        const float row_delta = delta[q0 + r];
        const int64_t valid = visible_keys(q0 + r, T, h.causal) - k0;  // dP is not computed beyond
        ENGINE_SIMD
        for (int64_t j = 0; j < kBlock; ++j) ds[j] = j < valid ? p[j] * (ds[j] - row_delta) : 0.0f;
      }
      gemm_block_dp<Tile, true>(kBlock, Dp, kBlock, dS, 1, kBlock, Qs + q0 * Dp, Dp, dK, Dp,
                             diagonal ? Causal::kReduceFromRow : Causal::kFull);  // dK += dS^T Qs
      gemm_block_dp<Tile, true>(kBlock, Dp, kBlock, dS, kBlock, 1, K.row_data(k0), K.row, dQ + q0 * Dp, Dp,
                             diagonal ? Causal::kReduceUpToRow : Causal::kFull);  // dQ += dS K
    }
    const int64_t rows = std::min(kBlock, T - k0);
    for (int64_t r = 0; r < rows; ++r) {
      E* grad_k = h.grad_k + (k0 + r) * D;
      E* grad_v = h.grad_v + (k0 + r) * D;
      const float* dk = dK + r * Dp;
      const float* dv = dV + r * Dp;
      ENGINE_SIMD
      for (int64_t d = 0; d < D; ++d) {
        grad_k[d] = from_float<E>(dk[d] * kLn2);
        grad_v[d] = from_float<E>(dv[d]);
      }
    }
  }
  for (int64_t i = 0; i < T; ++i) {
    E* grad_q = h.grad_q + i * D;
    const float* dq = dQ + i * Dp;
    ENGINE_SIMD
    for (int64_t d = 0; d < D; ++d) grad_q[d] = from_float<E>(dq[d] * h.scale);
  }
}

ENGINE_ISA_VARIANTS_PER_ELEMENT(attention_backward_head, backward_head, BackwardHead)

// Scratch memory of the calling thread, kept between calls: allocating it per call would page-fault
// fresh memory in every call (about 0.1 ms per MB). Grows to the largest size asked for.
float* thread_workspace(int64_t floats) {
  thread_local std::vector<float> workspace;
  if (static_cast<int64_t>(workspace.size()) < floats) {
    workspace.resize(floats);
  }
  return workspace.data();
}

// Head (b, h) of a (B, H, T, D) tensor of element type E.
template <class E>
HeadView<E> head_view(const at::Tensor& t, int64_t b, int64_t h) {
  return HeadView<E>{t.data_ptr<E>() + b * t.stride(0) + h * t.stride(1), t.stride(2), t.stride(3)};
}

}  // namespace

void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                       const at::Tensor& lse, bool causal, float scale) {
  if (out.numel() == 0) return;
  const int64_t H = q.size(1), T = q.size(2), D = q.size(3);
  const HeadShape shape{T, D};
  float* lse_data = lse.data_ptr<float>();
  with_element_type(q.scalar_type(), [&](auto element) {
    using E = decltype(element);
    E* out_data = out.data_ptr<E>();
    at::parallel_for(0, q.size(0) * H, 1, [&](int64_t begin, int64_t end) {
      float* workspace = thread_workspace(ForwardHead<E>::workspace_floats(shape));
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        attention_forward_head(ForwardHead<E>{shape, head_view<E>(q, b, h), head_view<E>(k, b, h),
                                              head_view<E>(v, b, h), out_data + bh * T * D, lse_data + bh * T,
                                              causal, scale, workspace});
      }
    });
  });
}

void attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_q,
                        const at::Tensor& grad_k, const at::Tensor& grad_v, bool causal, float scale) {
  if (grad_q.numel() == 0) return;
  const int64_t H = q.size(1), T = q.size(2), D = q.size(3);
  const HeadShape shape{T, D};
  const float* lse_data = lse.data_ptr<float>();
  with_element_type(q.scalar_type(), [&](auto element) {
    using E = decltype(element);
    E* grad_q_data = grad_q.data_ptr<E>();
    E* grad_k_data = grad_k.data_ptr<E>();
    E* grad_v_data = grad_v.data_ptr<E>();
    at::parallel_for(0, q.size(0) * H, 1, [&](int64_t begin, int64_t end) {
      float* workspace = thread_workspace(BackwardHead<E>::workspace_floats(shape));
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H, offset = bh * T * D;
        attention_backward_head(BackwardHead<E>{shape, head_view<E>(grad_out, b, h), head_view<E>(q, b, h),
                                                head_view<E>(k, b, h), head_view<E>(v, b, h),
                                                head_view<E>(out, b, h), lse_data + bh * T, grad_q_data + offset,
                                                grad_k_data + offset, grad_v_data + offset, causal, scale,
                                                workspace});
      }
    });
  });
}

}  // namespace engine::cpu

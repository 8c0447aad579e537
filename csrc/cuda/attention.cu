// Attention forward and backward on CUDA, FlashAttention-2 style.
//
// Algorithm (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
// 2023). For one (batch, head) and a tile of queries, the keys and values stream through shared memory
// in tiles; the scores S = Q K^T * scale of a tile live only in registers, so memory is linear in T.
// An online softmax keeps, per query row, the running maximum m of the scores and the running sum l of
// exp(S - m); the output accumulator is rescaled by exp(m_old - m_new) whenever m grows and divided
// by l at the end. The kernels work in base 2 (exp2 of scores pre-multiplied by log2(e)), which is the
// same softmax. The forward saves lse = m + log(l) (natural log, of the scaled scores) in fp32.
//
// Backward, with dO the gradient of the output and P = exp(S - lse) recomputed tile by tile:
//   delta_i = sum_d dO[i,d] * O[i,d]          (= sum_j P[i,j] dP[i,j]; a small preprocessing kernel)
//   dV = P^T dO
//   dP = dO V^T
//   dS = P * (dP - delta)                     (softmax backward, row i uses delta_i)
//   dQ = scale * dS K,   dK = scale * dS^T Q
// It runs as two kernels that each own their output: one per key tile accumulates dK and dV over all
// query tiles, one per query tile accumulates dQ over all key tiles. That recomputes S and dP once more
// than FlashAttention-2's single pass with fp32 atomicAdd into dQ (7 tile matmuls instead of 5), but it
// is deterministic, needs no fp32 dQ workspace to zero and convert, and writes every output once.
//
// fp16 / bf16 (sm_80+): every matmul is mma.sync.m16n8k16 on tensor cores with fp32 accumulation;
// operands come from shared memory through ldmatrix (.trans where the operand is needed transposed),
// tiles arrive with 16-byte cp.async, double-buffered so the next tile loads while this one computes.
// Each warp owns 16 rows. Scores, softmax statistics and the O/dQ/dK/dV accumulators stay fp32; P and
// dS are rounded to the input type just before they feed a tensor-core matmul, as FlashAttention does.
// fp32: the same algorithm with plain FMA (no TF32, so the result keeps fp32 accuracy); 8 lanes share
// a row, each owning every 8th column, and reduce dot products with shuffles.
//
// Supported: q, k, v, out of shape (batch * heads, T, D), contiguous, one dtype, 16-byte aligned; D a
// multiple of 8 up to 128 (zero-padded to 32, 64 or 128 inside the kernels); any T >= 1; causal or not.
// Causal means query i sees keys 0..i. Key tiles entirely in the future of a query tile are never
// loaded, a warp skips the math of a tile entirely in the future of its rows, and masks are applied
// only on tiles that straddle the diagonal or the end of the sequence.
// Shared memory per block is at most 70 KB (kHeadDim 128), within every sm_80+ GPU's opt-in limit.
// Caveats: no dropout. The tensor-core kernels need sm_80 (cp.async, bf16 mma): built for an older
// target they trap, and the glue refuses such devices with a clear error.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "launchers.h"

namespace engine_cuda {
namespace {

using detail::from_float;
using detail::infinity;
using detail::to_float;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ENGINE_HAS_SM80 1
#else
#define ENGINE_HAS_SM80 0
#endif

// =================================================================================================
// Tensor-core building blocks (sm_80+)
//
// mma.sync.m16n8k16 fragments. In a warp, lane = 4 * g + t with g = lane / 4 in 0..7 and
// t = lane % 4. A 16x8 fp32 accumulator C is held by each lane as
//   c[0] = C[g][2t], c[1] = C[g][2t+1], c[2] = C[g+8][2t], c[3] = C[g+8][2t+1].
// A 16x16 A operand is four 32-bit registers of two 16-bit elements (low half = lower column):
//   a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1], a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9].
// A 16x8 B operand (k x n) is two registers: b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g].
// Two accumulators side by side (16 x 16) therefore become an A operand by packing pairs:
//   a = {pack(c_left[0], c_left[1]), pack(c_left[2], c_left[3]), pack(c_right[0], c_right[1]),
//        pack(c_right[2], c_right[3])}
// which is how P and dS go from one matmul's output to the next matmul's input without shared memory.
//
// ldmatrix.x4 loads four 8x8 matrices; lanes 8i..8i+7 give the row addresses of matrix i and every
// lane receives register i = M_i[g][2t..2t+1] (or, with .trans, M_i[2t..2t+1][g]). Two address
// patterns cover every operand here, for a 16x16 block at (row0, col0) of a row-major smem tile:
//   "A pattern": row0 + (lane % 8) + 8 * ((lane / 8) % 2), col0 + 8 * (lane / 16)
//     - without .trans: the A operand of rows row0..+15, k = col0..+15;
//     - with .trans: B operands for two n-tiles when the tile is stored [k][n] (V in P V):
//       r[0], r[1] = b[0], b[1] of columns col0..+7; r[2], r[3] = b[0], b[1] of columns col0+8..+15.
//   "B pattern": row0 + (lane % 8) + 8 * (lane / 16), col0 + 8 * ((lane / 8) % 2)
//     - without .trans: B operands for two n-tiles when the tile is stored [n][k] (K in Q K^T):
//       r[0], r[1] = b[0], b[1] of n = row0..+7; r[2], r[3] = b[0], b[1] of n = row0+8..+15.
// =================================================================================================

template <typename Element>
struct TensorCore;

template <>
struct TensorCore<__half> {
  __device__ __forceinline__ static uint32_t pack(float low, float high) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(low))) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(high))) << 16);
  }
  // d += a * b
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if ENGINE_HAS_SM80
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

template <>
struct TensorCore<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t pack(float low, float high) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(low))) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(high))) << 16);
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if ENGINE_HAS_SM80
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if ENGINE_HAS_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem)));
#else
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#if ENGINE_HAS_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem)));
#else
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#endif
}

// 16-byte global -> shared copy that bypasses the registers; with valid == false nothing is read and
// the 16 bytes are zero-filled (src-size 0), so tiles past the end of the sequence are zeros.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if ENGINE_HAS_SM80
  const int source_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(source_bytes)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if ENGINE_HAS_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's most recent cp.async groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if ENGINE_HAS_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Shared-memory tiles are row-major with kHeadDim + 8 elements per row: the 16 extra bytes shift
// consecutive rows by four banks, so the eight row addresses of every ldmatrix hit distinct banks.
template <int kHeadDim>
constexpr int kSmemStride = kHeadDim + 8;

// Starts the copy of rows [row0, row0 + kRows) of a (seq_len, head_dim) matrix into a shared tile;
// rows at or past seq_len and columns at or past head_dim (the padding up to kHeadDim) become zeros.
template <int kRows, int kHeadDim, int kThreads, typename Element>
__device__ __forceinline__ void copy_tile_async(Element* tile, const Element* matrix, int row0, int seq_len,
                                                int head_dim) {
  static_assert(sizeof(Element) == 2, "tensor-core tiles hold 16-bit elements");
  constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks
  constexpr int kChunks = kRows * kChunksPerRow;
  constexpr int kSteps = (kChunks + kThreads - 1) / kThreads;
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int chunk = static_cast<int>(threadIdx.x) + step * kThreads;
    if (kChunks % kThreads == 0 || chunk < kChunks) {
      const int row = chunk / kChunksPerRow;
      const int column = (chunk % kChunksPerRow) * 8;
      const bool valid = row0 + row < seq_len && column < head_dim;
      const Element* source = valid ? matrix + static_cast<int64_t>(row0 + row) * head_dim + column : matrix;
      cp_async_16(tile + row * kSmemStride<kHeadDim> + column, source, valid);
    }
  }
}

// Stores two adjacent elements (columns column, column + 1; column even) packed in one 32-bit word.
template <typename Element>
__device__ __forceinline__ void store_pair(Element* matrix, int64_t row, int head_dim, int column, float low,
                                           float high) {
  *reinterpret_cast<uint32_t*>(matrix + row * head_dim + column) = TensorCore<Element>::pack(low, high);
}

// =================================================================================================
// Forward, tensor cores
// =================================================================================================

template <int kHeadDim>
struct ForwardTiles {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // queries per block, 16 per warp
  static constexpr int kBlockN = 64;           // keys per tile
  // Two stages of (K tile, V tile). Q is read once, into registers, so it is staged in the space of
  // stage 1 before that stage is first filled: 70 KB at kHeadDim = 128 instead of 104 KB.
  static constexpr int kSmemBytes = 4 * kBlockN * kSmemStride<kHeadDim> * 2;
  static_assert(kBlockM <= 2 * kBlockN, "the Q tile must fit in one (K, V) stage");
};

// Grid: (batch * heads, query tiles). Query tiles run last-first so causal blocks with the most key
// tiles start first and the short ones fill in at the end. kMinBlocks is the blocks per SM the register
// allocation must allow. At kHeadDim = 64 the default build takes 161 registers a thread on sm_90 (138 on
// sm_80; nvcc 13.0), so one 256-thread block runs per SM; kMinBlocks = 2 caps it at 128, for 12 bytes of
// spills (4 on sm_80). The launcher's min_blocks_per_sm picks one, so the GPU check can time both.
template <typename Element, int kHeadDim, int kMinBlocks>
__global__ void __launch_bounds__(ForwardTiles<kHeadDim>::kThreads, kMinBlocks)
    attention_forward_tc_kernel(const Element* __restrict__ q, const Element* __restrict__ k,
                                const Element* __restrict__ v, Element* __restrict__ out, float* __restrict__ lse,
                                int seq_len, int head_dim, bool causal, float scale_log2) {
  using Tiles = ForwardTiles<kHeadDim>;
  using TC = TensorCore<Element>;
  constexpr int kThreads = Tiles::kThreads;
  constexpr int kBlockM = Tiles::kBlockM;
  constexpr int kBlockN = Tiles::kBlockN;
  constexpr int kStride = kSmemStride<kHeadDim>;
  constexpr int kKSteps = kHeadDim / 16;      // k-steps of Q K^T over d
  constexpr int kDTiles = kHeadDim / 8;       // 8-wide column tiles of O
  constexpr int kKeyTiles = kBlockN / 8;      // 8-wide column tiles of S
  constexpr int kKeySteps = kBlockN / 16;     // k-steps of P V over keys

  extern __shared__ __align__(16) unsigned char shared_bytes[];
  // Stage s: K tile at stages + 2 s kBlockN kStride, V tile kBlockN rows after it.
  Element* stages = reinterpret_cast<Element*>(shared_bytes);
  Element* q_tile = stages + 2 * kBlockN * kStride;  // [kBlockM][kStride], over stage 1 until Q is in registers

  const int64_t head = blockIdx.x;
  const int m0 = static_cast<int>(gridDim.y - 1 - blockIdx.y) * kBlockM;
  const int64_t head_offset = head * seq_len * head_dim;
  q += head_offset;
  k += head_offset;
  v += head_offset;
  out += head_offset;
  lse += head * seq_len;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int a_row = (lane % 8) + 8 * ((lane / 8) % 2);
  const int a_col = 8 * (lane / 16);
  const int b_row = (lane % 8) + 8 * (lane / 16);
  const int b_col = 8 * ((lane / 8) % 2);
  const int warp_row0 = m0 + 16 * warp;  // this warp's rows: warp_row0 + g and warp_row0 + g + 8

  const int key_end = causal ? min(seq_len, m0 + kBlockM) : seq_len;
  const int n_tiles = (key_end + kBlockN - 1) / kBlockN;

  copy_tile_async<kBlockM, kHeadDim, kThreads>(q_tile, q, m0, seq_len, head_dim);
  cp_async_commit();
  copy_tile_async<kBlockN, kHeadDim, kThreads>(stages, k, 0, seq_len, head_dim);
  copy_tile_async<kBlockN, kHeadDim, kThreads>(stages + kBlockN * kStride, v, 0, seq_len, head_dim);
  cp_async_commit();

  // Q fragments (A operands of Q K^T) for this warp's 16 rows stay in registers for the whole loop.
  uint32_t q_fragments[kKSteps][4];
  cp_async_wait<1>();  // Q has landed (tile 0 may still be in flight)
  __syncthreads();
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    ldmatrix_x4(q_fragments[ks], q_tile + (16 * warp + a_row) * kStride + 16 * ks + a_col);
  }
  __syncthreads();  // every warp has its Q: the space becomes stage 1

  float o_acc[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) o_acc[dt][0] = o_acc[dt][1] = o_acc[dt][2] = o_acc[dt][3] = 0.0f;
  float row_max[2] = {-infinity(), -infinity()};  // running max of scaled scores (log2 units), rows g, g + 8
  float row_sum[2] = {0.0f, 0.0f};                // this lane's part of the running sum of exp2(s - row_max)

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j % 2;
    if (j + 1 < n_tiles) {
      Element* next = stages + (1 - stage) * 2 * kBlockN * kStride;
      copy_tile_async<kBlockN, kHeadDim, kThreads>(next, k, (j + 1) * kBlockN, seq_len, head_dim);
      copy_tile_async<kBlockN, kHeadDim, kThreads>(next + kBlockN * kStride, v, (j + 1) * kBlockN, seq_len,
                                                   head_dim);
    }
    cp_async_commit();  // possibly empty, so that "all but the newest group" always means tile j
    cp_async_wait<1>();
    __syncthreads();

    const Element* k_tile = stages + stage * 2 * kBlockN * kStride;
    const Element* v_tile = k_tile + kBlockN * kStride;
    const int n0 = j * kBlockN;
    const bool warp_sees_tile = warp_row0 < seq_len && (!causal || n0 <= warp_row0 + 15);

    if (warp_sees_tile) {
      // S = Q K^T for this warp's 16 rows and the tile's kBlockN keys.
      float s[kKeyTiles][4];
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
        for (int pair = 0; pair < kBlockN / 16; ++pair) {
          uint32_t b[4];
          ldmatrix_x4(b, k_tile + (16 * pair + b_row) * kStride + 16 * ks + b_col);
          TC::mma(s[2 * pair], q_fragments[ks], b[0], b[1]);
          TC::mma(s[2 * pair + 1], q_fragments[ks], b[2], b[3]);
        }
      }

      // To log2 units; -inf for keys past the end of the sequence or in the future of the row.
      const bool needs_mask = n0 + kBlockN > seq_len || (causal && n0 + kBlockN - 1 > warp_row0);
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[nt][e] * scale_log2;
          if (needs_mask) {
            const int key = n0 + 8 * nt + 2 * t + (e % 2);
            const int row = warp_row0 + g + 8 * (e / 2);
            if (key >= seq_len || (causal && key > row)) x = -infinity();
          }
          s[nt][e] = x;
        }
      }

      // Online softmax. Lanes 4g..4g+3 share rows g and g + 8: reduce the tile max over them.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = -infinity();
#pragma unroll
        for (int nt = 0; nt < kKeyTiles; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[h], tile_max);
        // A row that has seen only masked keys keeps max -inf; exponentiate against 0 so that
        // exp2(-inf - (-inf)) never appears (its p and correction are then exactly 0).
        const float base = new_max == -infinity() ? 0.0f : new_max;
        const float correction = exp2f(row_max[h] - base);
        row_max[h] = new_max;
        row_sum[h] *= correction;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          o_acc[dt][2 * h] *= correction;
          o_acc[dt][2 * h + 1] *= correction;
        }
#pragma unroll
        for (int nt = 0; nt < kKeyTiles; ++nt) {
          s[nt][2 * h] = exp2f(s[nt][2 * h] - base);
          s[nt][2 * h + 1] = exp2f(s[nt][2 * h + 1] - base);
          row_sum[h] += s[nt][2 * h] + s[nt][2 * h + 1];
        }
      }

      // O += P V: P (now in s) becomes the A operand in registers; V^T fragments via ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kKeySteps; ++kk) {
        const uint32_t p[4] = {TC::pack(s[2 * kk][0], s[2 * kk][1]), TC::pack(s[2 * kk][2], s[2 * kk][3]),
                               TC::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               TC::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int pair = 0; pair < kHeadDim / 16; ++pair) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, v_tile + (16 * kk + a_row) * kStride + 16 * pair + a_col);
          TC::mma(o_acc[2 * pair], p, b[0], b[1]);
          TC::mma(o_acc[2 * pair + 1], p, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // O = acc / l, lse = (m + log2(l)) * ln(2) in natural-log units of the scaled scores.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + g + 8 * h;
    if (row < seq_len) {
      const float inverse_sum = 1.0f / row_sum[h];
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        if (8 * dt < head_dim) {
          store_pair(out, row, head_dim, 8 * dt + 2 * t, o_acc[dt][2 * h] * inverse_sum,
                     o_acc[dt][2 * h + 1] * inverse_sum);
        }
      }
      if (t == 0) lse[row] = (row_max[h] + log2f(row_sum[h])) * kLn2;
    }
  }
}

// =================================================================================================
// Backward, shared by both precisions: delta = rowsum(dO * O), one warp per row
// =================================================================================================

constexpr int kDeltaWarps = 4;

template <typename Element>
__global__ void __launch_bounds__(32 * kDeltaWarps)
    attention_backward_delta_kernel(const Element* __restrict__ grad_out, const Element* __restrict__ out,
                                    float* __restrict__ delta, int64_t rows, int head_dim) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  float sum = 0.0f;
  for (int d = lane; d < head_dim; d += 32) {
    sum += to_float(grad_out[row * head_dim + d]) * to_float(out[row * head_dim + d]);
  }
  sum = detail::warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

// =================================================================================================
// Backward, tensor cores
// =================================================================================================

template <int kHeadDim>
struct BackwardTiles {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockKeys = 16 * kWarps;  // dK/dV kernel: keys per block, 16 per warp
  static constexpr int kBlockRows = 16 * kWarps;  // dQ kernel: queries per block, 16 per warp
  // Streamed tiles are halved at kHeadDim = 128: in the dK/dV kernel 64 queries would need more than
  // 255 registers per thread (dK, dV, S^T, dP^T accumulators), and the dQ kernel stays under 99 KB of
  // shared memory (the sm_86/sm_89 limit).
  static constexpr int kBlockQueries = kHeadDim <= 64 ? 64 : 32;  // dK/dV kernel: queries per streamed tile
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;        // dQ kernel: keys per streamed tile
  // dK/dV: K and V, then two stages of (Q, dO) tiles, then two stages of lse (log2 units) and delta.
  static constexpr int kDkDvSmemBytes =
      (2 * kBlockKeys + 4 * kBlockQueries) * kSmemStride<kHeadDim> * 2 + 4 * kBlockQueries * 4;
  // dQ: Q and dO, then two stages of K, then two stages of V.
  static constexpr int kDqSmemBytes = (2 * kBlockRows + 4 * kBlockN) * kSmemStride<kHeadDim> * 2;
};

// dK and dV for one tile of kBlockKeys keys; warp w owns keys n0 + 16w .. n0 + 16w + 15 and works on
// transposed tiles (rows = its keys, columns = the streamed tile's queries):
//   S^T = K Q^T,  P^T = exp2(S^T * scale * log2(e) - lse * log2(e)),  dV += P^T dO,
//   dP^T = V dO^T,  dS^T = P^T * (dP^T - delta),  dK += dS^T Q,  and finally dK *= scale.
// Grid: (batch * heads, key tiles); key tile 0 has the most causal work and starts first.
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(BackwardTiles<kHeadDim>::kThreads)
    attention_backward_dkdv_tc_kernel(const Element* __restrict__ q, const Element* __restrict__ k,
                                      const Element* __restrict__ v, const Element* __restrict__ grad_out,
                                      const float* __restrict__ lse, const float* __restrict__ delta,
                                      Element* __restrict__ grad_k, Element* __restrict__ grad_v, int seq_len,
                                      int head_dim, bool causal, float scale, float scale_log2) {
  using Tiles = BackwardTiles<kHeadDim>;
  using TC = TensorCore<Element>;
  constexpr int kThreads = Tiles::kThreads;
  constexpr int kBlockKeys = Tiles::kBlockKeys;
  constexpr int kBlockQueries = Tiles::kBlockQueries;
  constexpr int kStride = kSmemStride<kHeadDim>;
  constexpr int kKSteps = kHeadDim / 16;
  constexpr int kDTiles = kHeadDim / 8;
  constexpr int kQueryTiles = kBlockQueries / 8;  // 8-wide column tiles of S^T
  constexpr int kQuerySteps = kBlockQueries / 16;

  extern __shared__ __align__(16) unsigned char shared_bytes[];
  Element* k_tile = reinterpret_cast<Element*>(shared_bytes);  // [kBlockKeys][kStride]
  Element* v_tile = k_tile + kBlockKeys * kStride;               // [kBlockKeys][kStride]
  Element* q_tiles = v_tile + kBlockKeys * kStride;              // [2][kBlockQueries][kStride]
  Element* do_tiles = q_tiles + 2 * kBlockQueries * kStride;     // [2][kBlockQueries][kStride]
  float* lse_tiles = reinterpret_cast<float*>(do_tiles + 2 * kBlockQueries * kStride);  // [2][kBlockQueries]
  float* delta_tiles = lse_tiles + 2 * kBlockQueries;                                   // [2][kBlockQueries]

  const int64_t head = blockIdx.x;
  const int n0 = static_cast<int>(blockIdx.y) * kBlockKeys;
  const int64_t head_offset = head * seq_len * head_dim;
  q += head_offset;
  k += head_offset;
  v += head_offset;
  grad_out += head_offset;
  grad_k += head_offset;
  grad_v += head_offset;
  lse += head * seq_len;
  delta += head * seq_len;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int a_row = (lane % 8) + 8 * ((lane / 8) % 2);
  const int a_col = 8 * (lane / 16);
  const int b_row = (lane % 8) + 8 * (lane / 16);
  const int b_col = 8 * ((lane / 8) % 2);
  const int warp_key0 = n0 + 16 * warp;  // this warp's keys: warp_key0 + g and warp_key0 + g + 8

  // Queries before n0 see none of this block's keys under the causal mask.
  const int first_tile = causal ? n0 / kBlockQueries : 0;
  const int end_tile = (seq_len + kBlockQueries - 1) / kBlockQueries;

  // Fills stage `stage` with query tile `tile`: Q, dO (async) and lse * log2(e), delta (plain loads).
  // Queries past the end get lse = +inf, so their P is exactly 0 (and their Q and dO rows are zeros).
  auto load_query_tile = [&](int tile, int stage) {
    const int m0 = tile * kBlockQueries;
    copy_tile_async<kBlockQueries, kHeadDim, kThreads>(q_tiles + stage * kBlockQueries * kStride, q, m0, seq_len,
                                                       head_dim);
    copy_tile_async<kBlockQueries, kHeadDim, kThreads>(do_tiles + stage * kBlockQueries * kStride, grad_out, m0,
                                                       seq_len, head_dim);
    for (int i = threadIdx.x; i < kBlockQueries; i += kThreads) {
      const int query = m0 + i;
      lse_tiles[stage * kBlockQueries + i] = query < seq_len ? lse[query] * kLog2e : infinity();
      delta_tiles[stage * kBlockQueries + i] = query < seq_len ? delta[query] : 0.0f;
    }
  };

  copy_tile_async<kBlockKeys, kHeadDim, kThreads>(k_tile, k, n0, seq_len, head_dim);
  copy_tile_async<kBlockKeys, kHeadDim, kThreads>(v_tile, v, n0, seq_len, head_dim);
  load_query_tile(first_tile, 0);
  cp_async_commit();

  float dk_acc[kDTiles][4];
  float dv_acc[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[dt][e] = dv_acc[dt][e] = 0.0f;
  }

  for (int tile = first_tile; tile < end_tile; ++tile) {
    const int stage = (tile - first_tile) % 2;
    if (tile + 1 < end_tile) load_query_tile(tile + 1, 1 - stage);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int m0 = tile * kBlockQueries;
    const Element* q_tile = q_tiles + stage * kBlockQueries * kStride;
    const Element* do_tile = do_tiles + stage * kBlockQueries * kStride;
    const float* lse_tile = lse_tiles + stage * kBlockQueries;
    const float* delta_tile = delta_tiles + stage * kBlockQueries;
    const bool warp_sees_tile = warp_key0 < seq_len && (!causal || m0 + kBlockQueries - 1 >= warp_key0);

    if (warp_sees_tile) {
      // S^T = K Q^T: A = this warp's 16 keys, B = Q^T read from the [query][d] tile (B pattern).
      float st[kQueryTiles][4];
#pragma unroll
      for (int nt = 0; nt < kQueryTiles; ++nt) st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, k_tile + (16 * warp + a_row) * kStride + 16 * ks + a_col);
#pragma unroll
        for (int pair = 0; pair < kQuerySteps; ++pair) {
          uint32_t b[4];
          ldmatrix_x4(b, q_tile + (16 * pair + b_row) * kStride + 16 * ks + b_col);
          TC::mma(st[2 * pair], a, b[0], b[1]);
          TC::mma(st[2 * pair + 1], a, b[2], b[3]);
        }
      }

      // P^T[key][query] = exp2(S^T * scale * log2(e) - lse[query] * log2(e)); 0 where key > query.
      const bool needs_mask = causal && m0 < warp_key0 + 15;
#pragma unroll
      for (int nt = 0; nt < kQueryTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int query = 8 * nt + 2 * t + (e % 2);  // within the tile
          float p = exp2f(st[nt][e] * scale_log2 - lse_tile[query]);
          if (needs_mask && warp_key0 + g + 8 * (e / 2) > m0 + query) p = 0.0f;
          st[nt][e] = p;
        }
      }

      // dV += P^T dO: A = P^T from registers, B = dO (k = query, n = d) via ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kQuerySteps; ++kk) {
        const uint32_t p[4] = {TC::pack(st[2 * kk][0], st[2 * kk][1]), TC::pack(st[2 * kk][2], st[2 * kk][3]),
                               TC::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                               TC::pack(st[2 * kk + 1][2], st[2 * kk + 1][3])};
#pragma unroll
        for (int pair = 0; pair < kHeadDim / 16; ++pair) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, do_tile + (16 * kk + a_row) * kStride + 16 * pair + a_col);
          TC::mma(dv_acc[2 * pair], p, b[0], b[1]);
          TC::mma(dv_acc[2 * pair + 1], p, b[2], b[3]);
        }
      }

      // dP^T = V dO^T: A = this warp's 16 rows of V, B = dO^T read from the [query][d] tile (B pattern).
      float dpt[kQueryTiles][4];
#pragma unroll
      for (int nt = 0; nt < kQueryTiles; ++nt) dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, v_tile + (16 * warp + a_row) * kStride + 16 * ks + a_col);
#pragma unroll
        for (int pair = 0; pair < kQuerySteps; ++pair) {
          uint32_t b[4];
          ldmatrix_x4(b, do_tile + (16 * pair + b_row) * kStride + 16 * ks + b_col);
          TC::mma(dpt[2 * pair], a, b[0], b[1]);
          TC::mma(dpt[2 * pair + 1], a, b[2], b[3]);
        }
      }

      // dS^T = P^T * (dP^T - delta[query]), in place of dP^T.
#pragma unroll
      for (int nt = 0; nt < kQueryTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[nt][e] = st[nt][e] * (dpt[nt][e] - delta_tile[8 * nt + 2 * t + (e % 2)]);
      }

      // dK += dS^T Q: A = dS^T from registers, B = Q (k = query, n = d) via ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kQuerySteps; ++kk) {
        const uint32_t ds[4] = {TC::pack(dpt[2 * kk][0], dpt[2 * kk][1]), TC::pack(dpt[2 * kk][2], dpt[2 * kk][3]),
                                TC::pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                TC::pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
        for (int pair = 0; pair < kHeadDim / 16; ++pair) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, q_tile + (16 * kk + a_row) * kStride + 16 * pair + a_col);
          TC::mma(dk_acc[2 * pair], ds, b[0], b[1]);
          TC::mma(dk_acc[2 * pair + 1], ds, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int key = warp_key0 + g + 8 * h;
    if (key < seq_len) {
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        if (8 * dt < head_dim) {
          store_pair(grad_k, key, head_dim, 8 * dt + 2 * t, dk_acc[dt][2 * h] * scale, dk_acc[dt][2 * h + 1] * scale);
          store_pair(grad_v, key, head_dim, 8 * dt + 2 * t, dv_acc[dt][2 * h], dv_acc[dt][2 * h + 1]);
        }
      }
    }
  }
}

// dQ for one tile of kBlockRows queries; warp w owns rows m0 + 16w .. m0 + 16w + 15:
//   S = Q K^T,  P = exp2(S * scale * log2(e) - lse * log2(e)),  dP = dO V^T,
//   dS = P * (dP - delta),  dQ += dS K,  and finally dQ *= scale.
// Grid: (batch * heads, query tiles), last tile first as in the forward.
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(BackwardTiles<kHeadDim>::kThreads)
    attention_backward_dq_tc_kernel(const Element* __restrict__ q, const Element* __restrict__ k,
                                    const Element* __restrict__ v, const Element* __restrict__ grad_out,
                                    const float* __restrict__ lse, const float* __restrict__ delta,
                                    Element* __restrict__ grad_q, int seq_len, int head_dim, bool causal, float scale,
                                    float scale_log2) {
  using Tiles = BackwardTiles<kHeadDim>;
  using TC = TensorCore<Element>;
  constexpr int kThreads = Tiles::kThreads;
  constexpr int kBlockRows = Tiles::kBlockRows;
  constexpr int kBlockN = Tiles::kBlockN;
  constexpr int kStride = kSmemStride<kHeadDim>;
  constexpr int kKSteps = kHeadDim / 16;
  constexpr int kDTiles = kHeadDim / 8;
  constexpr int kKeyTiles = kBlockN / 8;
  constexpr int kKeySteps = kBlockN / 16;

  extern __shared__ __align__(16) unsigned char shared_bytes[];
  Element* q_tile = reinterpret_cast<Element*>(shared_bytes);  // [kBlockRows][kStride]
  Element* do_tile = q_tile + kBlockRows * kStride;              // [kBlockRows][kStride]
  Element* k_tiles = do_tile + kBlockRows * kStride;             // [2][kBlockN][kStride]
  Element* v_tiles = k_tiles + 2 * kBlockN * kStride;            // [2][kBlockN][kStride]

  const int64_t head = blockIdx.x;
  const int m0 = static_cast<int>(gridDim.y - 1 - blockIdx.y) * kBlockRows;
  const int64_t head_offset = head * seq_len * head_dim;
  q += head_offset;
  k += head_offset;
  v += head_offset;
  grad_out += head_offset;
  grad_q += head_offset;
  lse += head * seq_len;
  delta += head * seq_len;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int a_row = (lane % 8) + 8 * ((lane / 8) % 2);
  const int a_col = 8 * (lane / 16);
  const int b_row = (lane % 8) + 8 * (lane / 16);
  const int b_col = 8 * ((lane / 8) % 2);
  const int warp_row0 = m0 + 16 * warp;

  const int key_end = causal ? min(seq_len, m0 + kBlockRows) : seq_len;
  const int n_tiles = (key_end + kBlockN - 1) / kBlockN;

  copy_tile_async<kBlockRows, kHeadDim, kThreads>(q_tile, q, m0, seq_len, head_dim);
  copy_tile_async<kBlockRows, kHeadDim, kThreads>(do_tile, grad_out, m0, seq_len, head_dim);
  copy_tile_async<kBlockN, kHeadDim, kThreads>(k_tiles, k, 0, seq_len, head_dim);
  copy_tile_async<kBlockN, kHeadDim, kThreads>(v_tiles, v, 0, seq_len, head_dim);
  cp_async_commit();

  // This lane's rows g and g + 8: lse in log2 units (+inf past the end, so P = 0) and delta.
  float row_lse[2];
  float row_delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + g + 8 * h;
    row_lse[h] = row < seq_len ? lse[row] * kLog2e : infinity();
    row_delta[h] = row < seq_len ? delta[row] : 0.0f;
  }

  float dq_acc[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) dq_acc[dt][0] = dq_acc[dt][1] = dq_acc[dt][2] = dq_acc[dt][3] = 0.0f;

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j % 2;
    if (j + 1 < n_tiles) {
      copy_tile_async<kBlockN, kHeadDim, kThreads>(k_tiles + (1 - stage) * kBlockN * kStride, k, (j + 1) * kBlockN,
                                                   seq_len, head_dim);
      copy_tile_async<kBlockN, kHeadDim, kThreads>(v_tiles + (1 - stage) * kBlockN * kStride, v, (j + 1) * kBlockN,
                                                   seq_len, head_dim);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const Element* k_tile = k_tiles + stage * kBlockN * kStride;
    const Element* v_tile = v_tiles + stage * kBlockN * kStride;
    const int n0 = j * kBlockN;
    const bool warp_sees_tile = warp_row0 < seq_len && (!causal || n0 <= warp_row0 + 15);

    if (warp_sees_tile) {
      // S = Q K^T and dP = dO V^T for this warp's 16 rows (A pattern) and the tile's keys (B pattern).
      float s[kKeyTiles][4];
      float dp[kKeyTiles][4];
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
      }
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t a_q[4];
        uint32_t a_do[4];
        ldmatrix_x4(a_q, q_tile + (16 * warp + a_row) * kStride + 16 * ks + a_col);
        ldmatrix_x4(a_do, do_tile + (16 * warp + a_row) * kStride + 16 * ks + a_col);
#pragma unroll
        for (int pair = 0; pair < kBlockN / 16; ++pair) {
          uint32_t b[4];
          ldmatrix_x4(b, k_tile + (16 * pair + b_row) * kStride + 16 * ks + b_col);
          TC::mma(s[2 * pair], a_q, b[0], b[1]);
          TC::mma(s[2 * pair + 1], a_q, b[2], b[3]);
          ldmatrix_x4(b, v_tile + (16 * pair + b_row) * kStride + 16 * ks + b_col);
          TC::mma(dp[2 * pair], a_do, b[0], b[1]);
          TC::mma(dp[2 * pair + 1], a_do, b[2], b[3]);
        }
      }

      // P = exp2(S * scale * log2(e) - lse * log2(e)), 0 for keys past the end or in the future;
      // dS = P * (dP - delta), in place of dP.
      const bool needs_mask = n0 + kBlockN > seq_len || (causal && n0 + kBlockN - 1 > warp_row0);
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float p = exp2f(s[nt][e] * scale_log2 - row_lse[e / 2]);
          if (needs_mask) {
            const int key = n0 + 8 * nt + 2 * t + (e % 2);
            const int row = warp_row0 + g + 8 * (e / 2);
            if (key >= seq_len || (causal && key > row)) p = 0.0f;
          }
          dp[nt][e] = p * (dp[nt][e] - row_delta[e / 2]);
        }
      }

      // dQ += dS K: A = dS from registers, B = K (k = key, n = d) via ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kKeySteps; ++kk) {
        const uint32_t ds[4] = {TC::pack(dp[2 * kk][0], dp[2 * kk][1]), TC::pack(dp[2 * kk][2], dp[2 * kk][3]),
                                TC::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                TC::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
        for (int pair = 0; pair < kHeadDim / 16; ++pair) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, k_tile + (16 * kk + a_row) * kStride + 16 * pair + a_col);
          TC::mma(dq_acc[2 * pair], ds, b[0], b[1]);
          TC::mma(dq_acc[2 * pair + 1], ds, b[2], b[3]);
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + g + 8 * h;
    if (row < seq_len) {
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        if (8 * dt < head_dim) {
          store_pair(grad_q, row, head_dim, 8 * dt + 2 * t, dq_acc[dt][2 * h] * scale, dq_acc[dt][2 * h + 1] * scale);
        }
      }
    }
  }
}

// =================================================================================================
// fp32: plain FMA. kLanes consecutive lanes share one row (a query, or a key in the dK/dV kernel);
// lane i of the group owns columns i, i + kLanes, i + 2 kLanes, ... so a group reads kLanes consecutive
// words of a shared row (distinct banks) and the groups of a warp read the same row (a broadcast).
// Dot products over d are lane-group shuffle sums. Blocks of kRows rows stream tiles of kRows rows.
// =================================================================================================

struct Fp32Tiles {
  static constexpr int kLanes = 8;
  static constexpr int kThreads = 256;
  static constexpr int kRows = kThreads / kLanes;  // rows per block and rows per streamed tile
};

// Copies rows [row0, row0 + kRows) of a (seq_len, head_dim) matrix into a [kRows][kHeadDim] shared
// tile, zero-filling rows past seq_len and the columns past head_dim.
template <int kHeadDim>
__device__ __forceinline__ void copy_tile_fp32(float* tile, const float* matrix, int row0, int seq_len,
                                               int head_dim) {
  constexpr int kRows = Fp32Tiles::kRows;
  for (int i = threadIdx.x; i < kRows * kHeadDim; i += Fp32Tiles::kThreads) {
    const int row = i / kHeadDim;
    const int column = i % kHeadDim;
    const bool valid = row0 + row < seq_len && column < head_dim;
    tile[i] = valid ? matrix[static_cast<int64_t>(row0 + row) * head_dim + column] : 0.0f;
  }
}

// This lane's columns of one row of a (seq_len, head_dim) matrix; zeros past the end or past head_dim.
template <int kHeadDim>
__device__ __forceinline__ void load_row_fp32(float (&values)[kHeadDim / Fp32Tiles::kLanes], const float* matrix,
                                              int row, int seq_len, int head_dim, int lane_in_row) {
#pragma unroll
  for (int i = 0; i < kHeadDim / Fp32Tiles::kLanes; ++i) {
    const int column = lane_in_row + Fp32Tiles::kLanes * i;
    values[i] = row < seq_len && column < head_dim ? matrix[static_cast<int64_t>(row) * head_dim + column] : 0.0f;
  }
}

template <int kHeadDim>
__device__ __forceinline__ void store_row_fp32(float* matrix, const float (&values)[kHeadDim / Fp32Tiles::kLanes],
                                               float factor, int row, int head_dim, int lane_in_row) {
#pragma unroll
  for (int i = 0; i < kHeadDim / Fp32Tiles::kLanes; ++i) {
    const int column = lane_in_row + Fp32Tiles::kLanes * i;
    if (column < head_dim) matrix[static_cast<int64_t>(row) * head_dim + column] = values[i] * factor;
  }
}

// sum_d a[d] * tile_row[d] over the lane group (every lane of the group gets the sum).
template <int kHeadDim>
__device__ __forceinline__ float dot_fp32(const float (&a)[kHeadDim / Fp32Tiles::kLanes], const float* tile_row,
                                          int lane_in_row) {
  float partial = 0.0f;
#pragma unroll
  for (int i = 0; i < kHeadDim / Fp32Tiles::kLanes; ++i) partial += a[i] * tile_row[lane_in_row + Fp32Tiles::kLanes * i];
  return detail::lane_group_sum<Fp32Tiles::kLanes>(partial);
}

template <int kHeadDim>
__global__ void __launch_bounds__(Fp32Tiles::kThreads)
    attention_forward_fp32_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                  const float* __restrict__ v, float* __restrict__ out, float* __restrict__ lse,
                                  int seq_len, int head_dim, bool causal, float scale_log2) {
  constexpr int kRows = Fp32Tiles::kRows;
  constexpr int kColumns = kHeadDim / Fp32Tiles::kLanes;
  __shared__ float k_tile[kRows * kHeadDim];
  __shared__ float v_tile[kRows * kHeadDim];

  const int64_t head = blockIdx.x;
  const int m0 = static_cast<int>(gridDim.y - 1 - blockIdx.y) * kRows;
  const int64_t head_offset = head * seq_len * head_dim;
  q += head_offset;
  k += head_offset;
  v += head_offset;
  out += head_offset;
  lse += head * seq_len;
  const int row = m0 + threadIdx.x / Fp32Tiles::kLanes;
  const int lane_in_row = threadIdx.x % Fp32Tiles::kLanes;

  float q_row[kColumns];
  float o_acc[kColumns];
  load_row_fp32<kHeadDim>(q_row, q, row, seq_len, head_dim, lane_in_row);
#pragma unroll
  for (int i = 0; i < kColumns; ++i) o_acc[i] = 0.0f;
  float row_max = -infinity();  // log2 units
  float row_sum = 0.0f;         // every lane of the group holds the whole sum

  const int key_end = causal ? min(seq_len, m0 + kRows) : seq_len;
  for (int n0 = 0; n0 < key_end; n0 += kRows) {
    __syncthreads();  // the previous tile is no longer read
    copy_tile_fp32<kHeadDim>(k_tile, k, n0, seq_len, head_dim);
    copy_tile_fp32<kHeadDim>(v_tile, v, n0, seq_len, head_dim);
    __syncthreads();

    float s[kRows];
    float tile_max = -infinity();
#pragma unroll
    for (int key = 0; key < kRows; ++key) {
      float x = dot_fp32<kHeadDim>(q_row, k_tile + key * kHeadDim, lane_in_row) * scale_log2;
      if (n0 + key >= seq_len || (causal && n0 + key > row)) x = -infinity();
      s[key] = x;
      tile_max = fmaxf(tile_max, x);
    }
    const float new_max = fmaxf(row_max, tile_max);
    const float base = new_max == -infinity() ? 0.0f : new_max;  // see the tensor-core kernel
    const float correction = exp2f(row_max - base);
    row_max = new_max;
    row_sum *= correction;
#pragma unroll
    for (int i = 0; i < kColumns; ++i) o_acc[i] *= correction;
#pragma unroll
    for (int key = 0; key < kRows; ++key) {
      const float p = exp2f(s[key] - base);
      row_sum += p;
#pragma unroll
      for (int i = 0; i < kColumns; ++i) o_acc[i] += p * v_tile[key * kHeadDim + lane_in_row + Fp32Tiles::kLanes * i];
    }
  }

  if (row < seq_len) {
    store_row_fp32<kHeadDim>(out, o_acc, 1.0f / row_sum, row, head_dim, lane_in_row);
    if (lane_in_row == 0) lse[row] = (row_max + log2f(row_sum)) * kLn2;
  }
}

// dK and dV for kRows keys (one per lane group), streaming query tiles; formulas as the tensor-core
// kernel, one query at a time: p = exp2(s * scale * log2(e) - lse * log2(e)), dV += p dO,
// dp = v . dO, ds = p (dp - delta), dK += ds q, dK *= scale at the end.
template <int kHeadDim>
__global__ void __launch_bounds__(Fp32Tiles::kThreads)
    attention_backward_dkdv_fp32_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                        const float* __restrict__ v, const float* __restrict__ grad_out,
                                        const float* __restrict__ lse, const float* __restrict__ delta,
                                        float* __restrict__ grad_k, float* __restrict__ grad_v, int seq_len,
                                        int head_dim, bool causal, float scale, float scale_log2) {
  constexpr int kRows = Fp32Tiles::kRows;
  constexpr int kColumns = kHeadDim / Fp32Tiles::kLanes;
  __shared__ float q_tile[kRows * kHeadDim];
  __shared__ float do_tile[kRows * kHeadDim];
  __shared__ float lse_tile[kRows];  // log2 units, +inf past the end so that p = 0
  __shared__ float delta_tile[kRows];

  const int64_t head = blockIdx.x;
  const int n0 = static_cast<int>(blockIdx.y) * kRows;
  const int64_t head_offset = head * seq_len * head_dim;
  q += head_offset;
  k += head_offset;
  v += head_offset;
  grad_out += head_offset;
  grad_k += head_offset;
  grad_v += head_offset;
  lse += head * seq_len;
  delta += head * seq_len;
  const int key = n0 + threadIdx.x / Fp32Tiles::kLanes;
  const int lane_in_row = threadIdx.x % Fp32Tiles::kLanes;

  float k_row[kColumns];
  float v_row[kColumns];
  float dk_acc[kColumns];
  float dv_acc[kColumns];
  load_row_fp32<kHeadDim>(k_row, k, key, seq_len, head_dim, lane_in_row);
  load_row_fp32<kHeadDim>(v_row, v, key, seq_len, head_dim, lane_in_row);
#pragma unroll
  for (int i = 0; i < kColumns; ++i) dk_acc[i] = dv_acc[i] = 0.0f;

  for (int m0 = causal ? n0 : 0; m0 < seq_len; m0 += kRows) {
    __syncthreads();
    copy_tile_fp32<kHeadDim>(q_tile, q, m0, seq_len, head_dim);
    copy_tile_fp32<kHeadDim>(do_tile, grad_out, m0, seq_len, head_dim);
    if (threadIdx.x < kRows) {
      const int query = m0 + threadIdx.x;
      lse_tile[threadIdx.x] = query < seq_len ? lse[query] * kLog2e : infinity();
      delta_tile[threadIdx.x] = query < seq_len ? delta[query] : 0.0f;
    }
    __syncthreads();

    for (int query = 0; query < kRows; ++query) {
      const float* q_row = q_tile + query * kHeadDim;
      const float* do_row = do_tile + query * kHeadDim;
      float p = exp2f(dot_fp32<kHeadDim>(k_row, q_row, lane_in_row) * scale_log2 - lse_tile[query]);
      if (causal && key > m0 + query) p = 0.0f;
      const float dp = dot_fp32<kHeadDim>(v_row, do_row, lane_in_row);
      const float ds = p * (dp - delta_tile[query]);
#pragma unroll
      for (int i = 0; i < kColumns; ++i) {
        const int column = lane_in_row + Fp32Tiles::kLanes * i;
        dv_acc[i] += p * do_row[column];
        dk_acc[i] += ds * q_row[column];
      }
    }
  }

  if (key < seq_len) {
    store_row_fp32<kHeadDim>(grad_k, dk_acc, scale, key, head_dim, lane_in_row);
    store_row_fp32<kHeadDim>(grad_v, dv_acc, 1.0f, key, head_dim, lane_in_row);
  }
}

// dQ for kRows queries (one per lane group), streaming key tiles: dQ += ds k, dQ *= scale at the end.
template <int kHeadDim>
__global__ void __launch_bounds__(Fp32Tiles::kThreads)
    attention_backward_dq_fp32_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                      const float* __restrict__ v, const float* __restrict__ grad_out,
                                      const float* __restrict__ lse, const float* __restrict__ delta,
                                      float* __restrict__ grad_q, int seq_len, int head_dim, bool causal, float scale,
                                      float scale_log2) {
  constexpr int kRows = Fp32Tiles::kRows;
  constexpr int kColumns = kHeadDim / Fp32Tiles::kLanes;
  __shared__ float k_tile[kRows * kHeadDim];
  __shared__ float v_tile[kRows * kHeadDim];

  const int64_t head = blockIdx.x;
  const int m0 = static_cast<int>(gridDim.y - 1 - blockIdx.y) * kRows;
  const int64_t head_offset = head * seq_len * head_dim;
  q += head_offset;
  k += head_offset;
  v += head_offset;
  grad_out += head_offset;
  grad_q += head_offset;
  lse += head * seq_len;
  delta += head * seq_len;
  const int row = m0 + threadIdx.x / Fp32Tiles::kLanes;
  const int lane_in_row = threadIdx.x % Fp32Tiles::kLanes;

  float q_row[kColumns];
  float do_row[kColumns];
  float dq_acc[kColumns];
  load_row_fp32<kHeadDim>(q_row, q, row, seq_len, head_dim, lane_in_row);
  load_row_fp32<kHeadDim>(do_row, grad_out, row, seq_len, head_dim, lane_in_row);
#pragma unroll
  for (int i = 0; i < kColumns; ++i) dq_acc[i] = 0.0f;
  const float row_lse = row < seq_len ? lse[row] * kLog2e : infinity();
  const float row_delta = row < seq_len ? delta[row] : 0.0f;

  const int key_end = causal ? min(seq_len, m0 + kRows) : seq_len;
  for (int n0 = 0; n0 < key_end; n0 += kRows) {
    __syncthreads();
    copy_tile_fp32<kHeadDim>(k_tile, k, n0, seq_len, head_dim);
    copy_tile_fp32<kHeadDim>(v_tile, v, n0, seq_len, head_dim);
    __syncthreads();

    for (int key = 0; key < kRows; ++key) {
      const float* k_row = k_tile + key * kHeadDim;
      float p = exp2f(dot_fp32<kHeadDim>(q_row, k_row, lane_in_row) * scale_log2 - row_lse);
      if (n0 + key >= seq_len || (causal && n0 + key > row)) p = 0.0f;
      const float ds = p * (dot_fp32<kHeadDim>(do_row, v_tile + key * kHeadDim, lane_in_row) - row_delta);
#pragma unroll
      for (int i = 0; i < kColumns; ++i) dq_acc[i] += ds * k_row[lane_in_row + Fp32Tiles::kLanes * i];
    }
  }

  if (row < seq_len) store_row_fp32<kHeadDim>(grad_q, dq_acc, scale, row, head_dim, lane_in_row);
}

// =================================================================================================
// Host side
// =================================================================================================

template <int kValue>
struct HeadDimTag {
  static constexpr int value = kValue;
};

// Calls fn(HeadDimTag<P>{}) with P the padded head dimension (32, 64 or 128) for head_dim.
template <typename Fn>
cudaError_t dispatch_head_dim(int64_t head_dim, Fn&& fn) {
  if (head_dim <= 32) return fn(HeadDimTag<32>{});
  if (head_dim <= 64) return fn(HeadDimTag<64>{});
  return fn(HeadDimTag<128>{});
}

// Dynamic shared memory above the default 48 KB needs an explicit opt-in per kernel.
template <typename Kernel>
cudaError_t allow_shared_memory(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

bool valid_shape(int64_t batch_heads, int64_t seq_len, int64_t head_dim) {
  return batch_heads <= detail::kMaxGridX && seq_len <= (1LL << 30) && head_dim % 8 == 0 && head_dim >= 8 &&
         head_dim <= kAttentionMaxHeadDim && seq_len * head_dim <= (1LL << 31) - 1 &&
         detail::ceil_div(seq_len, Fp32Tiles::kRows) <= detail::kMaxGridY;
}

}  // namespace
}  // namespace engine_cuda

cudaError_t engine_cuda::attention_forward(DType dtype, const void* q, const void* k, const void* v, void* out,
                                           float* lse, int64_t batch_heads, int64_t seq_len, int64_t head_dim,
                                           bool causal, float scale, int min_blocks_per_sm, cudaStream_t stream) {
  if (!valid_shape(batch_heads, seq_len, head_dim)) return cudaErrorInvalidValue;
  if (min_blocks_per_sm != 1 && min_blocks_per_sm != 2) return cudaErrorInvalidValue;
  if (batch_heads == 0 || seq_len == 0) return cudaSuccess;
  const float scale_log2 = scale * kLog2e;
  const int t = static_cast<int>(seq_len);
  const int d = static_cast<int>(head_dim);
  return detail::dispatch_dtype(dtype, [&](auto element) -> cudaError_t {
    using Element = decltype(element);
    return dispatch_head_dim(head_dim, [&](auto padded) -> cudaError_t {
      constexpr int kHeadDim = decltype(padded)::value;
      if constexpr (sizeof(Element) == 4) {
        const dim3 grid(static_cast<unsigned>(batch_heads),
                        static_cast<unsigned>(detail::ceil_div(seq_len, Fp32Tiles::kRows)));
        attention_forward_fp32_kernel<kHeadDim><<<grid, Fp32Tiles::kThreads, 0, stream>>>(
            static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v),
            static_cast<float*>(out), lse, t, d, causal, scale_log2);
      } else {
        using Tiles = ForwardTiles<kHeadDim>;
        auto kernel = attention_forward_tc_kernel<Element, kHeadDim, 1>;
        if constexpr (kHeadDim == 64) {
          if (min_blocks_per_sm == 2) kernel = attention_forward_tc_kernel<Element, kHeadDim, 2>;
        }
        const cudaError_t status = allow_shared_memory(kernel, Tiles::kSmemBytes);
        if (status != cudaSuccess) return status;
        const dim3 grid(static_cast<unsigned>(batch_heads),
                        static_cast<unsigned>(detail::ceil_div(seq_len, Tiles::kBlockM)));
        kernel<<<grid, Tiles::kThreads, Tiles::kSmemBytes, stream>>>(
            static_cast<const Element*>(q), static_cast<const Element*>(k), static_cast<const Element*>(v),
            static_cast<Element*>(out), lse, t, d, causal, scale_log2);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t engine_cuda::attention_backward(DType dtype, const void* grad_out, const void* q, const void* k,
                                            const void* v, const void* out, const float* lse, void* grad_q,
                                            void* grad_k, void* grad_v, float* delta, int64_t batch_heads,
                                            int64_t seq_len, int64_t head_dim, bool causal, float scale,
                                            cudaStream_t stream) {
  if (!valid_shape(batch_heads, seq_len, head_dim)) return cudaErrorInvalidValue;
  if (batch_heads == 0 || seq_len == 0) return cudaSuccess;
  const float scale_log2 = scale * kLog2e;
  const int t = static_cast<int>(seq_len);
  const int d = static_cast<int>(head_dim);
  return detail::dispatch_dtype(dtype, [&](auto element) -> cudaError_t {
    using Element = decltype(element);
    const int64_t rows = batch_heads * seq_len;
    attention_backward_delta_kernel<Element>
        <<<static_cast<unsigned>(detail::ceil_div(rows, kDeltaWarps)), 32 * kDeltaWarps, 0, stream>>>(
            static_cast<const Element*>(grad_out), static_cast<const Element*>(out), delta, rows, d);
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;

    const auto* q_ = static_cast<const Element*>(q);
    const auto* k_ = static_cast<const Element*>(k);
    const auto* v_ = static_cast<const Element*>(v);
    const auto* grad_out_ = static_cast<const Element*>(grad_out);
    auto* grad_q_ = static_cast<Element*>(grad_q);
    auto* grad_k_ = static_cast<Element*>(grad_k);
    auto* grad_v_ = static_cast<Element*>(grad_v);
    return dispatch_head_dim(head_dim, [&](auto padded) -> cudaError_t {
      constexpr int kHeadDim = decltype(padded)::value;
      if constexpr (sizeof(Element) == 4) {
        const dim3 grid(static_cast<unsigned>(batch_heads),
                        static_cast<unsigned>(detail::ceil_div(seq_len, Fp32Tiles::kRows)));
        attention_backward_dkdv_fp32_kernel<kHeadDim><<<grid, Fp32Tiles::kThreads, 0, stream>>>(
            q_, k_, v_, grad_out_, lse, delta, grad_k_, grad_v_, t, d, causal, scale, scale_log2);
        attention_backward_dq_fp32_kernel<kHeadDim><<<grid, Fp32Tiles::kThreads, 0, stream>>>(
            q_, k_, v_, grad_out_, lse, delta, grad_q_, t, d, causal, scale, scale_log2);
      } else {
        using Tiles = BackwardTiles<kHeadDim>;
        const auto dkdv_kernel = attention_backward_dkdv_tc_kernel<Element, kHeadDim>;
        const auto dq_kernel = attention_backward_dq_tc_kernel<Element, kHeadDim>;
        cudaError_t status = allow_shared_memory(dkdv_kernel, Tiles::kDkDvSmemBytes);
        if (status == cudaSuccess) status = allow_shared_memory(dq_kernel, Tiles::kDqSmemBytes);
        if (status != cudaSuccess) return status;
        const dim3 dkdv_grid(static_cast<unsigned>(batch_heads),
                             static_cast<unsigned>(detail::ceil_div(seq_len, Tiles::kBlockKeys)));
        dkdv_kernel<<<dkdv_grid, Tiles::kThreads, Tiles::kDkDvSmemBytes, stream>>>(
            q_, k_, v_, grad_out_, lse, delta, grad_k_, grad_v_, t, d, causal, scale, scale_log2);
        const dim3 dq_grid(static_cast<unsigned>(batch_heads),
                           static_cast<unsigned>(detail::ceil_div(seq_len, Tiles::kBlockRows)));
        dq_kernel<<<dq_grid, Tiles::kThreads, Tiles::kDqSmemBytes, stream>>>(
            q_, k_, v_, grad_out_, lse, delta, grad_q_, t, d, causal, scale, scale_log2);
      }
      return cudaGetLastError();
    });
  });
}

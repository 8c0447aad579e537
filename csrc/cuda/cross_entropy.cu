// Cross-entropy forward and backward on CUDA, mean over the rows whose target is not ignore_index.
//
// Forward, one block per row of logits x (vocab V), in fp32 whatever the input dtype:
//   lse = log sum_v exp(x_v), by an online log-sum-exp: each thread keeps a running (max m, sum s of
//   exp(x - m)) over its strided share of the row, and pairs merge as
//   m = max(m1, m2), s = s1 exp(m1 - m) + s2 exp(m2 - m)   (warp shuffles, then across warps);
//   row loss = lse - x_target (0 for an ignored row); loss = sum of row losses / count of kept rows,
//   added by one block in a fixed order (deterministic). lse is saved (fp32, (rows,)).
// Backward: with c = grad_loss / count,
//   grad_x_v = c * (exp(x_v - lse) - [v == target])   on kept rows,   0 on ignored rows.
//
// Supported: logits (rows, vocab) contiguous fp32, fp16 or bf16; targets (rows,) int64; vocab >= 1.
// Caveats: no rows kept gives loss 0 / 0 = NaN (as the reference) and zero gradients. A target outside
// [0, vocab) that is not ignore_index cannot raise from the device without a host sync: its row loss is
// NaN, so the mean is NaN, and its gradient row has no -1 term.

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

constexpr int kRowThreads = 256;     // one block per row
constexpr int kReduceThreads = 1024; // one block for the mean over rows
constexpr int kMaxWarps = 32;

// Running log-sum-exp state: the max m seen and the sum s of exp(x - m).
struct LogSumExp {
  float max;
  float sum;
};

__device__ __forceinline__ LogSumExp merge(LogSumExp a, LogSumExp b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -infinity()) return {m, 0.0f};  // both empty (or all -inf): avoid exp(-inf - -inf)
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

// Merges the states of all threads of the block; every thread gets the result.
__device__ LogSumExp block_merge(LogSumExp state) {
  __shared__ LogSumExp warp_states[kMaxWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const LogSumExp other = {__shfl_xor_sync(0xffffffffu, state.max, offset),
                             __shfl_xor_sync(0xffffffffu, state.sum, offset)};
    state = merge(state, other);
  }
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) warp_states[warp] = state;
  __syncthreads();
  LogSumExp total = warp_states[0];
  for (int w = 1; w < warps; ++w) total = merge(total, warp_states[w]);
  return total;
}

// Sums a float and an integer count over the block (fixed order); valid in thread 0.
__device__ void block_sum(float& sum, long long& count) {
  __shared__ float warp_sums[kMaxWarps];
  __shared__ long long warp_counts[kMaxWarps];
  sum = detail::warp_sum(sum);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) count += __shfl_xor_sync(0xffffffffu, count, offset);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    warp_sums[warp] = sum;
    warp_counts[warp] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
      sum += warp_sums[w];
      count += warp_counts[w];
    }
  }
}

template <typename Element>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_rows_kernel(const Element* __restrict__ logits, const int64_t* __restrict__ targets,
                              float* __restrict__ lse, float* __restrict__ row_losses, int64_t vocab,
                              int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const Element* x = logits + row * vocab;
  LogSumExp state = {-infinity(), 0.0f};
  for (int64_t v = threadIdx.x; v < vocab; v += kRowThreads) {
    const float value = to_float(x[v]);
    if (value > state.max) {
      state.sum = state.sum * expf(state.max - value) + 1.0f;
      state.max = value;
    } else if (value != -infinity()) {
      state.sum += expf(value - state.max);
    }
  }
  state = block_merge(state);
  if (threadIdx.x == 0) {
    const float row_lse = state.max + logf(state.sum);
    const int64_t target = targets[row];
    float loss = 0.0f;
    if (target != ignore_index) {
      loss = target >= 0 && target < vocab ? row_lse - to_float(x[target]) : __int_as_float(0x7fc00000);  // NaN
    }
    lse[row] = row_lse;
    row_losses[row] = loss;
  }
}

__global__ void __launch_bounds__(kReduceThreads)
    cross_entropy_mean_kernel(const float* __restrict__ row_losses, const int64_t* __restrict__ targets,
                              float* __restrict__ loss, int64_t rows, int64_t ignore_index) {
  float sum = 0.0f;
  long long count = 0;
  for (int64_t row = threadIdx.x; row < rows; row += kReduceThreads) {
    sum += row_losses[row];
    count += targets[row] != ignore_index;
  }
  block_sum(sum, count);
  if (threadIdx.x == 0) loss[0] = sum / static_cast<float>(count);  // 0 / 0 = NaN when nothing is kept
}

// scale[0] = grad_loss / count of kept rows.
__global__ void __launch_bounds__(kReduceThreads)
    cross_entropy_scale_kernel(const float* __restrict__ grad_loss, const int64_t* __restrict__ targets,
                               float* __restrict__ scale, int64_t rows, int64_t ignore_index) {
  float unused = 0.0f;
  long long count = 0;
  for (int64_t row = threadIdx.x; row < rows; row += kReduceThreads) count += targets[row] != ignore_index;
  block_sum(unused, count);
  if (threadIdx.x == 0) scale[0] = grad_loss[0] / static_cast<float>(count);
}

// grad_x_v = scale * (exp(x_v - lse) - [v == target]) on kept rows, 0 on ignored rows.
template <typename Element>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_backward_kernel(const float* __restrict__ scale, const Element* __restrict__ logits,
                                  const int64_t* __restrict__ targets, const float* __restrict__ lse,
                                  Element* __restrict__ grad_logits, int64_t vocab, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const Element* x = logits + row * vocab;
  Element* grad = grad_logits + row * vocab;
  const int64_t target = targets[row];
  if (target == ignore_index) {
    for (int64_t v = threadIdx.x; v < vocab; v += kRowThreads) grad[v] = from_float<Element>(0.0f);
    return;
  }
  const float c = scale[0];
  const float row_lse = lse[row];
  for (int64_t v = threadIdx.x; v < vocab; v += kRowThreads) {
    const float probability = expf(to_float(x[v]) - row_lse);
    grad[v] = from_float<Element>(c * (probability - (v == target ? 1.0f : 0.0f)));
  }
}

bool valid_shape(int64_t rows, int64_t vocab) { return rows >= 0 && rows <= detail::kMaxGridX && vocab >= 1; }

}  // namespace
}  // namespace engine_cuda

cudaError_t engine_cuda::cross_entropy_forward(DType dtype, const void* logits, const int64_t* targets, float* loss,
                                               float* lse, float* row_losses, int64_t rows, int64_t vocab,
                                               int64_t ignore_index, cudaStream_t stream) {
  if (!valid_shape(rows, vocab)) return cudaErrorInvalidValue;
  return detail::dispatch_dtype(dtype, [&](auto element) -> cudaError_t {
    using Element = decltype(element);
    if (rows > 0) {
      cross_entropy_rows_kernel<Element><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
          static_cast<const Element*>(logits), targets, lse, row_losses, vocab, ignore_index);
    }
    cross_entropy_mean_kernel<<<1, kReduceThreads, 0, stream>>>(row_losses, targets, loss, rows, ignore_index);
    return cudaGetLastError();
  });
}

cudaError_t engine_cuda::cross_entropy_backward(DType dtype, const float* grad_loss, const void* logits,
                                                const int64_t* targets, const float* lse, void* grad_logits,
                                                float* workspace, int64_t rows, int64_t vocab, int64_t ignore_index,
                                                cudaStream_t stream) {
  if (!valid_shape(rows, vocab)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto element) -> cudaError_t {
    using Element = decltype(element);
    cross_entropy_scale_kernel<<<1, kReduceThreads, 0, stream>>>(grad_loss, targets, workspace, rows, ignore_index);
    cross_entropy_backward_kernel<Element><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
        workspace, static_cast<const Element*>(logits), targets, lse, static_cast<Element*>(grad_logits), vocab,
        ignore_index);
    return cudaGetLastError();
  });
}

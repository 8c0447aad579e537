// LayerNorm forward and backward on CUDA over the last dimension of x (rows, columns).
//
// Forward (Ba, Kiros & Hinton, "Layer Normalization", 2016), one warp per row, statistics in fp32:
//   mean = sum_c x / C,  var = sum_c (x - mean)^2 / C  (biased, two passes over the row for accuracy),
//   rstd = 1 / sqrt(var + eps),  xhat = (x - mean) * rstd,  y = xhat * weight + bias.
// mean and rstd are saved (fp32, (rows,)) for the backward.
//
// Backward, with g = grad_y and gw = g * weight, per row (one warp per row):
//   grad_x = rstd * (gw - mean_c(gw) - xhat * mean_c(gw * xhat))
// (differentiate y through xhat, mean and rstd; the two means are the projections removed by the
// normalization). The parameter gradients are sums over rows:
//   grad_weight[c] = sum_rows g * xhat,   grad_bias[c] = sum_rows g
// reduced deterministically in two stages: blocks of 32 columns x a slab of rows write fp32 partial
// sums to a workspace, then one thread per column adds its slabs' partials in a fixed order.
//
// Supported: x, grad_y (rows, columns) contiguous; weight, bias (columns,); one dtype (fp32, fp16 or
// bf16) for all of them; any rows and columns. Caveat: x is read from global memory once per pass
// (three passes forward, two backward), relying on L1/L2 for rows of a few KB as in a transformer.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "launchers.h"

namespace engine_cuda {
namespace {

using detail::from_float;
using detail::to_float;
using detail::warp_sum;

constexpr int kRowsPerBlock = 4;  // one warp per row
constexpr int kRowThreads = 32 * kRowsPerBlock;

// Parameter-gradient reduction: blocks of kReduceColumns x kReduceRowLanes threads, each block
// summing a slab of rows for 32 columns.
constexpr int kReduceColumns = 32;
constexpr int kReduceRowLanes = 8;
constexpr int64_t kMinRowsPerSlab = 64;
constexpr int64_t kMaxSlabs = 256;

int64_t slab_count(int64_t rows) {
  return detail::max_int64(1, detail::min_int64(kMaxSlabs, detail::ceil_div(rows, kMinRowsPerSlab)));
}

template <typename Element>
__global__ void __launch_bounds__(kRowThreads)
    layer_norm_forward_kernel(const Element* __restrict__ x, const Element* __restrict__ weight,
                              const Element* __restrict__ bias, Element* __restrict__ y, float* __restrict__ mean,
                              float* __restrict__ rstd, int64_t rows, int columns, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together; no block-level sync below
  const int lane = threadIdx.x % 32;
  const Element* x_row = x + row * columns;
  Element* y_row = y + row * columns;

  float sum = 0.0f;
  for (int c = lane; c < columns; c += 32) sum += to_float(x_row[c]);
  const float row_mean = warp_sum(sum) / columns;

  float squares = 0.0f;
  for (int c = lane; c < columns; c += 32) {
    const float centered = to_float(x_row[c]) - row_mean;
    squares += centered * centered;
  }
  const float row_rstd = 1.0f / sqrtf(warp_sum(squares) / columns + eps);

  for (int c = lane; c < columns; c += 32) {
    float value = (to_float(x_row[c]) - row_mean) * row_rstd * to_float(weight[c]);
    if (bias != nullptr) value += to_float(bias[c]);
    y_row[c] = from_float<Element>(value);
  }
  if (lane == 0) {
    mean[row] = row_mean;
    rstd[row] = row_rstd;
  }
}

// grad_x = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = grad_y * weight.
template <typename Element>
__global__ void __launch_bounds__(kRowThreads)
    layer_norm_backward_input_kernel(const Element* __restrict__ grad_y, const Element* __restrict__ x,
                                     const Element* __restrict__ weight, const float* __restrict__ mean,
                                     const float* __restrict__ rstd, Element* __restrict__ grad_x, int64_t rows,
                                     int columns) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const Element* g_row = grad_y + row * columns;
  const Element* x_row = x + row * columns;
  const float row_mean = mean[row];
  const float row_rstd = rstd[row];

  float sum_gw = 0.0f;
  float sum_gw_xhat = 0.0f;
  for (int c = lane; c < columns; c += 32) {
    const float gw = to_float(g_row[c]) * to_float(weight[c]);
    sum_gw += gw;
    sum_gw_xhat += gw * (to_float(x_row[c]) - row_mean) * row_rstd;
  }
  const float mean_gw = warp_sum(sum_gw) / columns;
  const float mean_gw_xhat = warp_sum(sum_gw_xhat) / columns;

  Element* dx_row = grad_x + row * columns;
  for (int c = lane; c < columns; c += 32) {
    const float gw = to_float(g_row[c]) * to_float(weight[c]);
    const float xhat = (to_float(x_row[c]) - row_mean) * row_rstd;
    dx_row[c] = from_float<Element>(row_rstd * (gw - mean_gw - xhat * mean_gw_xhat));
  }
}

// Stage 1: partial[slab][c] = sum over the slab's rows of g * xhat (weight) and of g (bias).
// Grid: (column blocks of 32, slabs); thread (x, y) walks rows y, y + 8, ... of the slab for column x.
template <typename Element>
__global__ void __launch_bounds__(kReduceColumns * kReduceRowLanes)
    layer_norm_backward_params_partial_kernel(const Element* __restrict__ grad_y, const Element* __restrict__ x,
                                              const float* __restrict__ mean, const float* __restrict__ rstd,
                                              float* __restrict__ partial_weight, float* __restrict__ partial_bias,
                                              int64_t rows, int64_t columns, int64_t rows_per_slab) {
  __shared__ float weight_sums[kReduceRowLanes][kReduceColumns + 1];  // +1: no bank conflicts reading columns
  __shared__ float bias_sums[kReduceRowLanes][kReduceColumns + 1];
  const int64_t column = static_cast<int64_t>(blockIdx.x) * kReduceColumns + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_slab;
  const int64_t row_end = detail::min_int64(rows, row_begin + rows_per_slab);

  float sum_weight = 0.0f;
  float sum_bias = 0.0f;
  if (column < columns) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kReduceRowLanes) {
      const float g = to_float(grad_y[row * columns + column]);
      const float xhat = (to_float(x[row * columns + column]) - mean[row]) * rstd[row];
      sum_weight += g * xhat;
      sum_bias += g;
    }
  }
  weight_sums[threadIdx.y][threadIdx.x] = sum_weight;
  bias_sums[threadIdx.y][threadIdx.x] = sum_bias;
  __syncthreads();
  if (threadIdx.y == 0 && column < columns) {
    for (int lane_row = 1; lane_row < kReduceRowLanes; ++lane_row) {
      sum_weight += weight_sums[lane_row][threadIdx.x];
      sum_bias += bias_sums[lane_row][threadIdx.x];
    }
    partial_weight[blockIdx.y * columns + column] = sum_weight;
    partial_bias[blockIdx.y * columns + column] = sum_bias;
  }
}

// Stage 2: grad_weight[c] = sum_slabs partial_weight[slab][c], likewise for the bias.
template <typename Element>
__global__ void __launch_bounds__(256)
    layer_norm_backward_params_final_kernel(const float* __restrict__ partial_weight,
                                            const float* __restrict__ partial_bias, Element* __restrict__ grad_weight,
                                            Element* __restrict__ grad_bias, int64_t columns, int64_t slabs) {
  const int64_t column = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (column >= columns) return;
  float sum_weight = 0.0f;
  float sum_bias = 0.0f;
  for (int64_t slab = 0; slab < slabs; ++slab) {
    sum_weight += partial_weight[slab * columns + column];
    sum_bias += partial_bias[slab * columns + column];
  }
  grad_weight[column] = from_float<Element>(sum_weight);
  grad_bias[column] = from_float<Element>(sum_bias);
}

bool valid_shape(int64_t rows, int64_t columns) {
  return rows >= 0 && columns >= 0 && columns <= 2147483647 &&
         detail::ceil_div(rows, kRowsPerBlock) <= detail::kMaxGridX;
}

}  // namespace
}  // namespace engine_cuda

int64_t engine_cuda::layer_norm_backward_workspace_floats(int64_t rows, int64_t columns) {
  return 2 * slab_count(rows) * columns;  // partial sums for the weight, then for the bias
}

cudaError_t engine_cuda::layer_norm_forward(DType dtype, const void* x, const void* weight, const void* bias, void* y,
                                            float* mean, float* rstd, int64_t rows, int64_t columns, float eps,
                                            cudaStream_t stream) {
  if (!valid_shape(rows, columns)) return cudaErrorInvalidValue;
  if (rows == 0 || columns == 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto element) -> cudaError_t {
    using Element = decltype(element);
    layer_norm_forward_kernel<Element>
        <<<static_cast<unsigned>(detail::ceil_div(rows, kRowsPerBlock)), kRowThreads, 0, stream>>>(
            static_cast<const Element*>(x), static_cast<const Element*>(weight), static_cast<const Element*>(bias),
            static_cast<Element*>(y), mean, rstd, rows, static_cast<int>(columns), eps);
    return cudaGetLastError();
  });
}

cudaError_t engine_cuda::layer_norm_backward(DType dtype, const void* grad_y, const void* x, const void* weight,
                                             const float* mean, const float* rstd, void* grad_x, void* grad_weight,
                                             void* grad_bias, float* workspace, int64_t rows, int64_t columns,
                                             cudaStream_t stream) {
  if (!valid_shape(rows, columns)) return cudaErrorInvalidValue;
  if (columns == 0) return cudaSuccess;
  const int64_t slabs = slab_count(rows);
  const int64_t rows_per_slab = detail::ceil_div(rows, slabs);
  float* partial_weight = workspace;
  float* partial_bias = workspace + slabs * columns;
  return detail::dispatch_dtype(dtype, [&](auto element) -> cudaError_t {
    using Element = decltype(element);
    const auto* grad_y_ = static_cast<const Element*>(grad_y);
    const auto* x_ = static_cast<const Element*>(x);
    if (rows > 0) {
      layer_norm_backward_input_kernel<Element>
          <<<static_cast<unsigned>(detail::ceil_div(rows, kRowsPerBlock)), kRowThreads, 0, stream>>>(
              grad_y_, x_, static_cast<const Element*>(weight), mean, rstd, static_cast<Element*>(grad_x), rows,
              static_cast<int>(columns));
    }
    // With rows == 0 every slab is empty: the partials and so the gradients are zeros.
    const dim3 partial_grid(static_cast<unsigned>(detail::ceil_div(columns, kReduceColumns)),
                            static_cast<unsigned>(slabs));
    layer_norm_backward_params_partial_kernel<Element>
        <<<partial_grid, dim3(kReduceColumns, kReduceRowLanes), 0, stream>>>(
            grad_y_, x_, mean, rstd, partial_weight, partial_bias, rows, columns, rows_per_slab);
    layer_norm_backward_params_final_kernel<Element>
        <<<static_cast<unsigned>(detail::ceil_div(columns, 256)), 256, 0, stream>>>(
            partial_weight, partial_bias, static_cast<Element*>(grad_weight), static_cast<Element*>(grad_bias),
            columns, slabs);
    return cudaGetLastError();
  });
}

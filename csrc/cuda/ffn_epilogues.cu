// FFN epilogues on CUDA: the elementwise work around the two FFN matmuls (which stay torch matmuls).
//
//   bias_gelu:           out      = gelu(pre + bias)
//   bias_gelu_backward:  grad_pre = grad * gelu'(pre + bias)
//   bias_residual:       out      = residual + y + bias
//
// GELU in its two forms, with x = pre + bias (Hendrycks & Gimpel, "Gaussian Error Linear Units"):
//   exact ("gelu"):          gelu(x) = x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))
//                            gelu'(x) = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//   tanh form ("gelu_tanh"): u = sqrt(2 / pi) (x + 0.044715 x^3),  gelu(x) = 0.5 x (1 + tanh(u))
//                            gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2 / pi) (1 + 3 * 0.044715 x^2)
//
// Layout: matrices (rows, features) contiguous, bias (features,) or absent; fp32, fp16 or bf16, one
// dtype for all tensors of a call. Arithmetic is fp32 and each output is rounded once (bias_residual
// therefore rounds once where the reference rounds after each addition: at most as much error).
// Each thread owns one column (so its bias is loaded once, and no division maps an index to its column)
// and walks rows with a grid stride; consecutive threads touch consecutive addresses.
// Caveats: no dropout (the caller applies it, or refuses dropout_p > 0).

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

constexpr int kColumnsPerBlock = 256;
constexpr int64_t kMaxRowBlocks = 1024;  // blocks along rows; each walks rows with this stride

constexpr float kInvSqrt2 = 0.7071067811865476f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluTanhCubic = 0.044715f;

__device__ __forceinline__ float gelu(float x, bool tanh_approx) {
  if (tanh_approx) {
    const float u = kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
  }
  return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
}

__device__ __forceinline__ float gelu_derivative(float x, bool tanh_approx) {
  if (tanh_approx) {
    const float tanh_u = tanhf(kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x));
    const float du_dx = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCubic * x * x);
    return 0.5f * (1.0f + tanh_u) + 0.5f * x * (1.0f - tanh_u * tanh_u) * du_dx;
  }
  const float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));  // Phi(x)
  const float pdf = kInvSqrt2Pi * expf(-0.5f * x * x);    // phi(x)
  return cdf + x * pdf;
}

template <typename Element>
__device__ __forceinline__ float bias_at(const Element* bias, int64_t column) {
  return bias == nullptr ? 0.0f : to_float(bias[column]);
}

// Grid: (column blocks, row blocks); thread (x, y) handles column x for rows y, y + gridDim.y, ...
template <typename Element>
__global__ void __launch_bounds__(kColumnsPerBlock)
    bias_gelu_kernel(const Element* __restrict__ pre, const Element* __restrict__ bias, Element* __restrict__ out,
                     int64_t rows, int64_t features, bool tanh_approx) {
  const int64_t column = static_cast<int64_t>(blockIdx.x) * kColumnsPerBlock + threadIdx.x;
  if (column >= features) return;
  const float b = bias_at(bias, column);
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t i = row * features + column;
    out[i] = from_float<Element>(gelu(to_float(pre[i]) + b, tanh_approx));
  }
}

template <typename Element>
__global__ void __launch_bounds__(kColumnsPerBlock)
    bias_gelu_backward_kernel(const Element* __restrict__ grad, const Element* __restrict__ pre,
                              const Element* __restrict__ bias, Element* __restrict__ grad_pre, int64_t rows,
                              int64_t features, bool tanh_approx) {
  const int64_t column = static_cast<int64_t>(blockIdx.x) * kColumnsPerBlock + threadIdx.x;
  if (column >= features) return;
  const float b = bias_at(bias, column);
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t i = row * features + column;
    grad_pre[i] = from_float<Element>(to_float(grad[i]) * gelu_derivative(to_float(pre[i]) + b, tanh_approx));
  }
}

template <typename Element>
__global__ void __launch_bounds__(kColumnsPerBlock)
    bias_residual_kernel(const Element* __restrict__ y, const Element* __restrict__ bias,
                         const Element* __restrict__ residual, Element* __restrict__ out, int64_t rows,
                         int64_t features) {
  const int64_t column = static_cast<int64_t>(blockIdx.x) * kColumnsPerBlock + threadIdx.x;
  if (column >= features) return;
  const float b = bias_at(bias, column);
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t i = row * features + column;
    out[i] = from_float<Element>(to_float(residual[i]) + to_float(y[i]) + b);
  }
}

bool valid_shape(int64_t rows, int64_t features) {
  return rows >= 0 && features >= 0 && detail::ceil_div(features, kColumnsPerBlock) <= detail::kMaxGridX;
}

dim3 grid_for(int64_t rows, int64_t features) {
  return dim3(static_cast<unsigned>(detail::ceil_div(features, kColumnsPerBlock)),
              static_cast<unsigned>(detail::min_int64(rows, kMaxRowBlocks)));
}

}  // namespace
}  // namespace engine_cuda

cudaError_t engine_cuda::bias_gelu(DType dtype, const void* pre, const void* bias, void* out, int64_t rows,
                                   int64_t features, bool tanh_approx, cudaStream_t stream) {
  if (!valid_shape(rows, features)) return cudaErrorInvalidValue;
  if (rows == 0 || features == 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto element) -> cudaError_t {
    using Element = decltype(element);
    bias_gelu_kernel<Element><<<grid_for(rows, features), kColumnsPerBlock, 0, stream>>>(
        static_cast<const Element*>(pre), static_cast<const Element*>(bias), static_cast<Element*>(out), rows,
        features, tanh_approx);
    return cudaGetLastError();
  });
}

cudaError_t engine_cuda::bias_gelu_backward(DType dtype, const void* grad, const void* pre, const void* bias,
                                            void* grad_pre, int64_t rows, int64_t features, bool tanh_approx,
                                            cudaStream_t stream) {
  if (!valid_shape(rows, features)) return cudaErrorInvalidValue;
  if (rows == 0 || features == 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto element) -> cudaError_t {
    using Element = decltype(element);
    bias_gelu_backward_kernel<Element><<<grid_for(rows, features), kColumnsPerBlock, 0, stream>>>(
        static_cast<const Element*>(grad), static_cast<const Element*>(pre), static_cast<const Element*>(bias),
        static_cast<Element*>(grad_pre), rows, features, tanh_approx);
    return cudaGetLastError();
  });
}

cudaError_t engine_cuda::bias_residual(DType dtype, const void* y, const void* bias, const void* residual, void* out,
                                       int64_t rows, int64_t features, cudaStream_t stream) {
  if (!valid_shape(rows, features)) return cudaErrorInvalidValue;
  if (rows == 0 || features == 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto element) -> cudaError_t {
    using Element = decltype(element);
    bias_residual_kernel<Element><<<grid_for(rows, features), kColumnsPerBlock, 0, stream>>>(
        static_cast<const Element*>(y), static_cast<const Element*>(bias), static_cast<const Element*>(residual),
        static_cast<Element*>(out), rows, features);
    return cudaGetLastError();
  });
}

// LayerNorm over the last dimension on the CPU, forward and backward.
//
// Forward, per row x of C values (two passes over the row, which stays in L1):
//   mean = sum(x) / C,  var = sum((x - mean)^2) / C,  rstd = 1 / sqrt(var + eps)
//   y = (x - mean) * rstd * weight + bias
// Backward, with xhat = (x - mean) * rstd and g = dy * weight:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
// dweight and dbias are summed per block of rows into partial sums, then the partials are added
// in a fixed order: the result does not depend on the number of threads.
//
// Inputs (checked, cast to x's dtype and made contiguous by csrc/glue.cpp): x (N, C), weight and bias
// (C,), float32, float16 or bfloat16, read and written in that dtype. Statistics and accumulation in
// fp32; mean and rstd are float32 (N,).
// Parallel over rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>

#include "kernels.h"
#include "simd.h"

namespace engine::cpu {
namespace {

template <class T>
struct LayerNormForwardRows {
  const T* x;  // (rows, cols)
  const float* weight;
  const float* bias;  // zeros when the op has no bias
  T* y;
  float* mean;
  float* rstd;
  int64_t cols, row_begin, row_end;
  float eps;
};

template <class Tile, class T>
ENGINE_ALWAYS_INLINE void layer_norm_forward_rows(const LayerNormForwardRows<T>& p) {
  const float inverse_cols = 1.0f / static_cast<float>(p.cols);
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const T* x = p.x + row * p.cols;
    T* y = p.y + row * p.cols;
    const float mean = sum_terms(p.cols, [&](int64_t c) ENGINE_INLINE_LAMBDA { return to_float(x[c]); }) *
                       inverse_cols;
    const float squares = sum_terms(p.cols, [&](int64_t c) ENGINE_INLINE_LAMBDA {
      return (to_float(x[c]) - mean) * (to_float(x[c]) - mean);
    });
    const float rstd = 1.0f / std::sqrt(squares * inverse_cols + p.eps);
    ENGINE_SIMD
    for (int64_t c = 0; c < p.cols; ++c) y[c] = from_float<T>((to_float(x[c]) - mean) * rstd * p.weight[c] + p.bias[c]);
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

template <class T>
struct LayerNormBackwardRows {
  const T* grad_y;  // (rows, cols)
  const T* x;
  const float* weight;
  const float* mean;
  const float* rstd;
  T* grad_x;
  float* partial_weight;  // (cols,): this block's sum of dy * xhat
  float* partial_bias;    // (cols,): this block's sum of dy
  int64_t cols, row_begin, row_end;
};

template <class Tile, class T>
ENGINE_ALWAYS_INLINE void layer_norm_backward_rows(const LayerNormBackwardRows<T>& p) {
  const float inverse_cols = 1.0f / static_cast<float>(p.cols);
  std::fill(p.partial_weight, p.partial_weight + p.cols, 0.0f);
  std::fill(p.partial_bias, p.partial_bias + p.cols, 0.0f);
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const T* dy = p.grad_y + row * p.cols;
    const T* x = p.x + row * p.cols;
    T* dx = p.grad_x + row * p.cols;
    const float mean = p.mean[row], rstd = p.rstd[row];
    const float mean_g = sum_terms(p.cols, [&](int64_t c) ENGINE_INLINE_LAMBDA {
                           return to_float(dy[c]) * p.weight[c];
                         }) * inverse_cols;
    const float mean_g_xhat = sum_terms(p.cols, [&](int64_t c) ENGINE_INLINE_LAMBDA {
                                return to_float(dy[c]) * p.weight[c] * (to_float(x[c]) - mean) * rstd;
                              }) * inverse_cols;
    ENGINE_SIMD
    for (int64_t c = 0; c < p.cols; ++c) {
      const float xhat = (to_float(x[c]) - mean) * rstd;
      const float g = to_float(dy[c]);
      dx[c] = from_float<T>(rstd * (g * p.weight[c] - mean_g - xhat * mean_g_xhat));
      p.partial_weight[c] += g * xhat;
      p.partial_bias[c] += g;
    }
  }
}

ENGINE_ISA_VARIANTS_PER_ELEMENT(run_layer_norm_forward, layer_norm_forward_rows, LayerNormForwardRows)
ENGINE_ISA_VARIANTS_PER_ELEMENT(run_layer_norm_backward, layer_norm_backward_rows, LayerNormBackwardRows)

}  // namespace

void layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd, float eps) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const at::Tensor weight32 = weight.to(at::kFloat);
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat) : at::zeros({cols}, at::kFloat);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  with_element_type(x.scalar_type(), [&](auto element) {
    using T = decltype(element);
    const LayerNormForwardRows<T> params{x.data_ptr<T>(), weight32.data_ptr<float>(), bias32.data_ptr<float>(),
                                         y.data_ptr<T>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                         cols, 0, 0, eps};
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      LayerNormForwardRows<T> chunk = params;
      chunk.row_begin = begin;
      chunk.row_end = end;
      run_layer_norm_forward(chunk);
    });
  });
}

void layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_x,
                         const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const at::Tensor weight32 = weight.to(at::kFloat);
  const auto options = x.options().dtype(at::kFloat);
  const int64_t blocks = row_blocks(rows);  // the weight and bias gradients' partial sums (kernels.h)
  at::Tensor partial_weight = at::empty({blocks, cols}, options);
  at::Tensor partial_bias = at::empty({blocks, cols}, options);
  with_element_type(x.scalar_type(), [&](auto element) {
    using T = decltype(element);
    const LayerNormBackwardRows<T> params{grad_y.data_ptr<T>(), x.data_ptr<T>(), weight32.data_ptr<float>(),
                                          mean.data_ptr<float>(), rstd.data_ptr<float>(), grad_x.data_ptr<T>(),
                                          nullptr, nullptr, cols, 0, 0};
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        LayerNormBackwardRows<T> chunk = params;
        chunk.row_begin = rows * block / blocks;
        chunk.row_end = rows * (block + 1) / blocks;
        chunk.partial_weight = partial_weight.data_ptr<float>() + block * cols;
        chunk.partial_bias = partial_bias.data_ptr<float>() + block * cols;
        run_layer_norm_backward(chunk);
      }
    });
  });
  // Summed in float32, then stored in the gradients' dtype.
  const auto store_sums = [&](const at::Tensor& partials, const at::Tensor& grad) {
    const at::Tensor sums = at::empty({cols}, options);
    add_partials(partials, sums);
    grad.copy_(sums);
  };
  store_sums(partial_weight, grad_weight);
  store_sums(partial_bias, grad_bias);
}

}  // namespace engine::cpu

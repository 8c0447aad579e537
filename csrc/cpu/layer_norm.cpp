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
// Inputs: x (N, C) contiguous, float32, float16 or bfloat16; weight and bias (C,) of any of those
// dtypes. Statistics and accumulation in fp32; mean and rstd are returned as float32 (N,); y and
// grad_x have x's dtype, grad_weight and grad_bias weight's dtype. Parallel over rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "simd.h"

namespace engine::cpu {
namespace {

struct LayerNormForwardRows {
  const float* x;  // (rows, cols)
  const float* weight;
  const float* bias;  // zeros when the op has no bias
  float* y;
  float* mean;
  float* rstd;
  int64_t cols, row_begin, row_end;
  float eps;
};

template <class Tile>
ENGINE_ALWAYS_INLINE void layer_norm_forward_rows(const LayerNormForwardRows& p) {
  const float inverse_cols = 1.0f / static_cast<float>(p.cols);
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const float* x = p.x + row * p.cols;
    float* y = p.y + row * p.cols;
    const float mean = sum_terms(p.cols, [&](int64_t c) ENGINE_INLINE_LAMBDA { return x[c]; }) * inverse_cols;
    const float squares = sum_terms(p.cols, [&](int64_t c) ENGINE_INLINE_LAMBDA { return (x[c] - mean) * (x[c] - mean); });
    const float rstd = 1.0f / std::sqrt(squares * inverse_cols + p.eps);
    ENGINE_SIMD
    for (int64_t c = 0; c < p.cols; ++c) y[c] = (x[c] - mean) * rstd * p.weight[c] + p.bias[c];
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

struct LayerNormBackwardRows {
  const float* grad_y;  // (rows, cols)
  const float* x;
  const float* weight;
  const float* mean;
  const float* rstd;
  float* grad_x;
  float* partial_weight;  // (cols,): this block's sum of dy * xhat
  float* partial_bias;    // (cols,): this block's sum of dy
  int64_t cols, row_begin, row_end;
};

template <class Tile>
ENGINE_ALWAYS_INLINE void layer_norm_backward_rows(const LayerNormBackwardRows& p) {
  const float inverse_cols = 1.0f / static_cast<float>(p.cols);
  std::fill(p.partial_weight, p.partial_weight + p.cols, 0.0f);
  std::fill(p.partial_bias, p.partial_bias + p.cols, 0.0f);
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const float* dy = p.grad_y + row * p.cols;
    const float* x = p.x + row * p.cols;
    float* dx = p.grad_x + row * p.cols;
    const float mean = p.mean[row], rstd = p.rstd[row];
    const float mean_g = sum_terms(p.cols, [&](int64_t c) ENGINE_INLINE_LAMBDA { return dy[c] * p.weight[c]; }) *
                         inverse_cols;
    const float mean_g_xhat = sum_terms(p.cols, [&](int64_t c) ENGINE_INLINE_LAMBDA {
                                return dy[c] * p.weight[c] * (x[c] - mean) * rstd;
                              }) * inverse_cols;
    ENGINE_SIMD
    for (int64_t c = 0; c < p.cols; ++c) {
      const float xhat = (x[c] - mean) * rstd;
      dx[c] = rstd * (dy[c] * p.weight[c] - mean_g - xhat * mean_g_xhat);
      p.partial_weight[c] += dy[c] * xhat;
      p.partial_bias[c] += dy[c];
    }
  }
}

ENGINE_ISA_VARIANTS(run_layer_norm_forward, layer_norm_forward_rows, LayerNormForwardRows)
ENGINE_ISA_VARIANTS(run_layer_norm_backward, layer_norm_backward_rows, LayerNormBackwardRows)

// Blocks of rows for the weight/bias gradients: a fixed count, so the summation order is fixed.
constexpr int64_t kRowBlocks = 32;

at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_x(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (N, C), got shape ", x.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_vector(const at::Tensor& t, int64_t size, bool float32_only, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape (", size, ",), got ", t.sizes());
  if (float32_only) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  } else {
    TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
                t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "engine::layer_norm_forward";
  check_x(x, op, "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  check_vector(weight, cols, false, op, "weight");
  if (bias.has_value()) {
    check_vector(*bias, cols, false, op, "bias");
  }
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  const at::Tensor x32 = as_float(x);
  const at::Tensor weight32 = as_float(weight).contiguous();
  const at::Tensor bias32 = bias.has_value() ? as_float(*bias).contiguous() : at::zeros({cols}, at::kFloat);
  const auto options = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({rows, cols}, options);
  at::Tensor mean = at::empty({rows}, options);
  at::Tensor rstd = at::empty({rows}, options);
  const LayerNormForwardRows params{x32.data_ptr<float>(), weight32.data_ptr<float>(), bias32.data_ptr<float>(),
                                    y.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                    cols, 0, 0, static_cast<float>(eps)};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    LayerNormForwardRows chunk = params;
    chunk.row_begin = begin;
    chunk.row_end = end;
    run_layer_norm_forward(chunk);
  });
  return {y.to(x.scalar_type()), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& rstd) {
  constexpr const char* op = "engine::layer_norm_backward";
  check_x(x, op, "x");
  check_x(grad_y, op, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(), ", got ", grad_y.sizes());
  const int64_t rows = x.size(0), cols = x.size(1);
  check_vector(weight, cols, false, op, "weight");
  check_vector(mean, rows, true, op, "mean");
  check_vector(rstd, rows, true, op, "rstd");
  const at::Tensor grad_y32 = as_float(grad_y), x32 = as_float(x);
  const at::Tensor weight32 = as_float(weight).contiguous();
  const at::Tensor mean32 = mean.contiguous(), rstd32 = rstd.contiguous();
  const auto options = x.options().dtype(at::kFloat);
  at::Tensor grad_x = at::empty({rows, cols}, options);
  const int64_t blocks = std::max<int64_t>(1, std::min(rows, kRowBlocks));
  at::Tensor partial_weight = at::empty({blocks, cols}, options);
  at::Tensor partial_bias = at::empty({blocks, cols}, options);
  const LayerNormBackwardRows params{grad_y32.data_ptr<float>(), x32.data_ptr<float>(), weight32.data_ptr<float>(),
                                     mean32.data_ptr<float>(), rstd32.data_ptr<float>(), grad_x.data_ptr<float>(),
                                     nullptr, nullptr, cols, 0, 0};
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      LayerNormBackwardRows chunk = params;
      chunk.row_begin = rows * block / blocks;
      chunk.row_end = rows * (block + 1) / blocks;
      chunk.partial_weight = partial_weight.data_ptr<float>() + block * cols;
      chunk.partial_bias = partial_bias.data_ptr<float>() + block * cols;
      run_layer_norm_backward(chunk);
    }
  });
  const auto weight_dtype = weight.scalar_type();
  return {grad_x.to(x.scalar_type()), partial_weight.sum(0).to(weight_dtype), partial_bias.sum(0).to(weight_dtype)};
}

}  // namespace
}  // namespace engine::cpu

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("layer_norm_forward", &engine::cpu::layer_norm_forward);
  m.impl("layer_norm_backward", &engine::cpu::layer_norm_backward);
}

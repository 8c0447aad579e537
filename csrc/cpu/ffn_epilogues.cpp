// The FFN's elementwise epilogues on the CPU: bias + GELU (exact or tanh form) and its derivative,
// and bias + residual. The matmuls around them stay in PyTorch (engine/ops/extension.py).
//
// GELU:      gelu(x)      = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))
//            gelu'(x)     = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
// tanh form: gelu_tanh(x) = 0.5 x (1 + t),  t = tanh(u),  u = sqrt(2/pi) (x + 0.044715 x^3)
//            gelu_tanh'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// erf, exp and tanh are the vectorizable approximations of simd.h (errors about 1e-7).
//
// Inputs (checked, cast to one dtype and made contiguous by csrc/glue.cpp): (N, F) matrices and a
// (F,) bias, float32, float16 or bfloat16. Computation is in fp32. Parallel over rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>

#include "kernels.h"
#include "simd.h"

namespace engine::cpu {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhCubic = 0.044715f;

struct GeluRows {
  const float* pre;   // (rows, cols)
  const float* bias;  // (cols,), zeros when the op has no bias
  const float* grad;  // (rows, cols), backward only
  float* out;         // (rows, cols)
  int64_t cols, row_begin, row_end;
  bool tanh_approx;
};

template <class Tile>
ENGINE_ALWAYS_INLINE void gelu_forward_rows(const GeluRows& p) {
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const float* pre = p.pre + row * p.cols;
    float* out = p.out + row * p.cols;
    if (p.tanh_approx) {
      ENGINE_SIMD
      for (int64_t c = 0; c < p.cols; ++c) {
        const float x = pre[c] + p.bias[c];
        out[c] = 0.5f * x * (1.0f + tanh_approx(kSqrt2OverPi * (x + kTanhCubic * x * x * x)));
      }
    } else {
      ENGINE_SIMD
      for (int64_t c = 0; c < p.cols; ++c) {
        const float x = pre[c] + p.bias[c];
        out[c] = 0.5f * x * (1.0f + erf_approx(x * kSqrtHalf));
      }
    }
  }
}

template <class Tile>
ENGINE_ALWAYS_INLINE void gelu_backward_rows(const GeluRows& p) {
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const float* pre = p.pre + row * p.cols;
    const float* grad = p.grad + row * p.cols;
    float* out = p.out + row * p.cols;
    if (p.tanh_approx) {
      ENGINE_SIMD
      for (int64_t c = 0; c < p.cols; ++c) {
        const float x = pre[c] + p.bias[c];
        const float t = tanh_approx(kSqrt2OverPi * (x + kTanhCubic * x * x * x));
        const float du_dx = kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x * x);
        out[c] = grad[c] * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du_dx);
      }
    } else {
      ENGINE_SIMD
      for (int64_t c = 0; c < p.cols; ++c) {
        const float x = pre[c] + p.bias[c];
        const float gaussian = exp_approx(-0.5f * x * x);  // exp(-z^2) with z = x / sqrt(2)
        const float cdf = 0.5f * (1.0f + erf_from_gaussian(x * kSqrtHalf, gaussian));
        const float pdf = kInvSqrt2Pi * gaussian;
        out[c] = grad[c] * (cdf + x * pdf);
      }
    }
  }
}

struct ResidualRows {
  const float* y;         // (rows, cols)
  const float* bias;      // (cols,), zeros when the op has no bias
  const float* residual;  // (rows, cols)
  float* out;
  int64_t cols, row_begin, row_end;
};

template <class Tile>
ENGINE_ALWAYS_INLINE void bias_residual_rows(const ResidualRows& p) {
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const float* y = p.y + row * p.cols;
    const float* residual = p.residual + row * p.cols;
    float* out = p.out + row * p.cols;
    ENGINE_SIMD
    for (int64_t c = 0; c < p.cols; ++c) out[c] = residual[c] + (y[c] + p.bias[c]);
  }
}

ENGINE_ISA_VARIANTS(run_gelu_forward, gelu_forward_rows, GeluRows)
ENGINE_ISA_VARIANTS(run_gelu_backward, gelu_backward_rows, GeluRows)
ENGINE_ISA_VARIANTS(run_bias_residual, bias_residual_rows, ResidualRows)

// Rows per parallel task: enough elements (about 32K) to amortize a task's start.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// The bias as float32 (cols,), or zeros when absent.
at::Tensor bias_or_zeros(const std::optional<at::Tensor>& bias, int64_t cols) {
  return bias.has_value() ? as_float(*bias) : at::zeros({cols}, at::dtype(at::kFloat));
}

// grad == nullptr: out = gelu(pre + bias); else out = grad * gelu'(pre + bias).
void gelu_op(const at::Tensor* grad, const at::Tensor& pre, const std::optional<at::Tensor>& bias,
             const at::Tensor& out, bool tanh_approx) {
  const int64_t rows = pre.size(0), cols = pre.size(1);
  const at::Tensor bias32 = bias_or_zeros(bias, cols);
  const at::Tensor pre32 = as_float(pre);
  const at::Tensor grad32 = grad != nullptr ? as_float(*grad) : at::Tensor();
  const at::Tensor out32 = float_buffer(out);
  GeluRows params{pre32.data_ptr<float>(), bias32.data_ptr<float>(),
                  grad != nullptr ? grad32.data_ptr<float>() : nullptr, out32.data_ptr<float>(), cols, 0, 0,
                  tanh_approx};
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    GeluRows chunk = params;
    chunk.row_begin = begin;
    chunk.row_end = end;
    if (grad != nullptr) {
      run_gelu_backward(chunk);
    } else {
      run_gelu_forward(chunk);
    }
  });
  store(out, out32);
}

}  // namespace

void bias_gelu(const at::Tensor& pre, const std::optional<at::Tensor>& bias, const at::Tensor& out,
               bool tanh_approx) {
  gelu_op(nullptr, pre, bias, out, tanh_approx);
}

void bias_gelu_backward(const at::Tensor& grad, const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                        const at::Tensor& grad_pre, bool tanh_approx) {
  gelu_op(&grad, pre, bias, grad_pre, tanh_approx);
}

void bias_residual(const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                   const at::Tensor& out) {
  const int64_t rows = y.size(0), cols = y.size(1);
  const at::Tensor bias32 = bias_or_zeros(bias, cols);
  const at::Tensor y32 = as_float(y), residual32 = as_float(residual);
  const at::Tensor out32 = float_buffer(out);
  const ResidualRows params{y32.data_ptr<float>(), bias32.data_ptr<float>(), residual32.data_ptr<float>(),
                            out32.data_ptr<float>(), cols, 0, 0};
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    ResidualRows chunk = params;
    chunk.row_begin = begin;
    chunk.row_end = end;
    run_bias_residual(chunk);
  });
  store(out, out32);
}

}  // namespace engine::cpu

// The FFN's elementwise epilogues on the CPU: bias + GELU (exact or tanh form) and its derivative,
// and bias + residual. The matmuls around them stay in PyTorch (engine/ops/extension.py).
//
// GELU:      gelu(x)      = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))
//            gelu'(x)     = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
// tanh form: gelu_tanh(x) = 0.5 x (1 + t),  t = tanh(u),  u = sqrt(2/pi) (x + 0.044715 x^3)
//            gelu_tanh'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// erf, exp and tanh are the vectorizable approximations of simd.h (errors about 1e-7).
//
// Inputs: 2-D contiguous (N, F) tensors, float32, float16 or bfloat16; bias (F,) of any of
// those dtypes (under autocast the bias stays float32 while pre is bfloat16). Computation is in
// fp32; bias_gelu and its backward return pre's dtype, bias_residual returns the promoted dtype
// of its inputs, as `residual + y + bias` would in PyTorch. Parallel over rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

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

at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

void check_float_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (N, F), got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The bias as float32 (cols,), or zeros when absent.
at::Tensor bias_or_zeros(const std::optional<at::Tensor>& bias, int64_t cols, const char* op) {
  if (!bias.has_value()) {
    return at::zeros({cols}, at::dtype(at::kFloat));
  }
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.device().is_cpu(), op, ": bias must be a CPU tensor, got ", b.device());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == cols, op, ": bias must have shape (", cols, ",), got ", b.sizes());
  const auto dtype = b.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": bias must be float32, float16 or bfloat16, got ", dtype);
  return as_float(b).contiguous();
}

at::Tensor gelu_op(const at::Tensor* grad, const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                   bool tanh_approx, const char* op) {
  check_float_matrix(pre, op, "pre");
  if (grad != nullptr) {
    check_float_matrix(*grad, op, "grad");
    TORCH_CHECK(grad->sizes() == pre.sizes(), op, ": grad must have pre's shape ", pre.sizes(), ", got ",
                grad->sizes());
  }
  const int64_t rows = pre.size(0), cols = pre.size(1);
  const at::Tensor bias32 = bias_or_zeros(bias, cols, op);
  const at::Tensor pre32 = as_float(pre);
  const at::Tensor grad32 = grad != nullptr ? as_float(*grad) : at::Tensor();
  at::Tensor out = at::empty({rows, cols}, pre.options().dtype(at::kFloat));
  GeluRows params{pre32.data_ptr<float>(), bias32.data_ptr<float>(),
                  grad != nullptr ? grad32.data_ptr<float>() : nullptr, out.data_ptr<float>(), cols, 0, 0,
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
  return out.to(pre.scalar_type());
}

at::Tensor bias_gelu(const at::Tensor& pre, const std::optional<at::Tensor>& bias, bool tanh_approx) {
  return gelu_op(nullptr, pre, bias, tanh_approx, "engine::bias_gelu");
}

at::Tensor bias_gelu_backward(const at::Tensor& grad, const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                              bool tanh_approx) {
  return gelu_op(&grad, pre, bias, tanh_approx, "engine::bias_gelu_backward");
}

at::Tensor bias_residual(const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual) {
  constexpr const char* op = "engine::bias_residual";
  check_float_matrix(y, op, "y");
  check_float_matrix(residual, op, "residual");
  TORCH_CHECK(residual.sizes() == y.sizes(), op, ": residual must have y's shape ", y.sizes(), ", got ",
              residual.sizes());
  const int64_t rows = y.size(0), cols = y.size(1);
  auto dtype = c10::promoteTypes(y.scalar_type(), residual.scalar_type());
  if (bias.has_value()) {
    dtype = c10::promoteTypes(dtype, bias->scalar_type());
  }
  const at::Tensor bias32 = bias_or_zeros(bias, cols, op);
  const at::Tensor y32 = as_float(y), residual32 = as_float(residual);
  at::Tensor out = at::empty({rows, cols}, y.options().dtype(at::kFloat));
  const ResidualRows params{y32.data_ptr<float>(), bias32.data_ptr<float>(), residual32.data_ptr<float>(),
                            out.data_ptr<float>(), cols, 0, 0};
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    ResidualRows chunk = params;
    chunk.row_begin = begin;
    chunk.row_end = end;
    run_bias_residual(chunk);
  });
  return out.to(dtype);
}

}  // namespace
}  // namespace engine::cpu

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("bias_gelu", &engine::cpu::bias_gelu);
  m.impl("bias_gelu_backward", &engine::cpu::bias_gelu_backward);
  m.impl("bias_residual", &engine::cpu::bias_residual);
}

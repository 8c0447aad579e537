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
// (F,) bias, float32, float16 or bfloat16, read and written in that dtype; computation is in fp32.
// Parallel over rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "kernels.h"
#include "simd.h"

namespace engine::cpu {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhCubic = 0.044715f;

template <class T>
struct GeluRows {
  const T* pre;          // (rows, cols)
  const float* bias;     // (cols,), zeros when the op has no bias
  const T* grad;         // (rows, cols), backward only
  T* out;                // (rows, cols)
  float* column_sums;    // (cols,): backward only, when asked for: this block's sums of out before rounding
  int64_t cols, row_begin, row_end;
  bool tanh_approx;
};

template <class Tile, class T>
ENGINE_ALWAYS_INLINE void gelu_forward_rows(const GeluRows<T>& p) {
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const T* pre = p.pre + row * p.cols;
    T* out = p.out + row * p.cols;
    if (p.tanh_approx) {
      ENGINE_SIMD
      for (int64_t c = 0; c < p.cols; ++c) {
        const float x = to_float(pre[c]) + p.bias[c];
        out[c] = from_float<T>(0.5f * x * (1.0f + tanh_approx(kSqrt2OverPi * (x + kTanhCubic * x * x * x))));
      }
    } else {
      ENGINE_SIMD
      for (int64_t c = 0; c < p.cols; ++c) {
        const float x = to_float(pre[c]) + p.bias[c];
        out[c] = from_float<T>(0.5f * x * (1.0f + erf_approx(x * kSqrtHalf)));
      }
    }
  }
}

template <bool kTanh>
ENGINE_ALWAYS_INLINE float gelu_derivative(float x) {
  if constexpr (kTanh) {
    const float t = tanh_approx(kSqrt2OverPi * (x + kTanhCubic * x * x * x));
    const float du_dx = kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du_dx;
  } else {
    const float gaussian = exp_approx(-0.5f * x * x);  // exp(-z^2) with z = x / sqrt(2)
    const float cdf = 0.5f * (1.0f + erf_from_gaussian(x * kSqrtHalf, gaussian));
    return cdf + x * kInvSqrt2Pi * gaussian;  // Phi(x) + x phi(x)
  }
}

template <bool kTanh, class T>
ENGINE_ALWAYS_INLINE void gelu_backward_rows_with(const GeluRows<T>& p) {
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const T* pre = p.pre + row * p.cols;
    const T* grad = p.grad + row * p.cols;
    T* out = p.out + row * p.cols;
    if (p.column_sums != nullptr) {
      ENGINE_SIMD
      for (int64_t c = 0; c < p.cols; ++c) {
        const float g = to_float(grad[c]) * gelu_derivative<kTanh>(to_float(pre[c]) + p.bias[c]);
        out[c] = from_float<T>(g);
        p.column_sums[c] += g;
      }
    } else {
      ENGINE_SIMD
      for (int64_t c = 0; c < p.cols; ++c) {
        out[c] = from_float<T>(to_float(grad[c]) * gelu_derivative<kTanh>(to_float(pre[c]) + p.bias[c]));
      }
    }
  }
}

template <class Tile, class T>
ENGINE_ALWAYS_INLINE void gelu_backward_rows(const GeluRows<T>& p) {
  if (p.tanh_approx) {
    gelu_backward_rows_with<true>(p);
  } else {
    gelu_backward_rows_with<false>(p);
  }
}

// dst = src rounded to dst's type (unless dst is null), and this block's column sums of src (the bias
// gradient of y + bias).
template <class TS, class TD>
struct CastRows {
  const TS* src;  // (rows, cols)
  TD* dst;        // (rows, cols)
  float* column_sums;
  int64_t cols, row_begin, row_end;
};

template <class Tile, class TS, class TD>
ENGINE_ALWAYS_INLINE void cast_rows(const CastRows<TS, TD>& p) {
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const TS* src = p.src + row * p.cols;
    if (p.dst == nullptr) {  // the sums only
      ENGINE_SIMD
      for (int64_t c = 0; c < p.cols; ++c) p.column_sums[c] += to_float(src[c]);
      continue;
    }
    TD* dst = p.dst + row * p.cols;
    ENGINE_SIMD
    for (int64_t c = 0; c < p.cols; ++c) {
      const float value = to_float(src[c]);
      dst[c] = from_float<TD>(value);
      p.column_sums[c] += value;
    }
  }
}

// y may be in a lower precision than residual and out (autocast's bf16 matmul output next to the fp32
// residual stream): TY is y's element type, T the others'.
template <class TY, class T>
struct ResidualRows {
  const TY* y;         // (rows, cols)
  const float* bias;   // (cols,), zeros when the op has no bias
  const T* residual;   // (rows, cols)
  T* out;
  int64_t cols, row_begin, row_end;
};

template <class Tile, class TY, class T>
ENGINE_ALWAYS_INLINE void bias_residual_rows(const ResidualRows<TY, T>& p) {
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const TY* y = p.y + row * p.cols;
    const T* residual = p.residual + row * p.cols;
    T* out = p.out + row * p.cols;
    ENGINE_SIMD
    for (int64_t c = 0; c < p.cols; ++c) out[c] = from_float<T>(to_float(residual[c]) + (to_float(y[c]) + p.bias[c]));
  }
}

template <class T>
using SameTypeResidualRows = ResidualRows<T, T>;
using Bf16ToFloatResidualRows = ResidualRows<c10::BFloat16, float>;
using HalfToFloatResidualRows = ResidualRows<c10::Half, float>;

ENGINE_ISA_VARIANTS_PER_ELEMENT(run_gelu_forward, gelu_forward_rows, GeluRows)
ENGINE_ISA_VARIANTS_PER_ELEMENT(run_gelu_backward, gelu_backward_rows, GeluRows)
ENGINE_ISA_VARIANTS_PER_ELEMENT(run_bias_residual, bias_residual_rows, SameTypeResidualRows)
template <class T>
using SameTypeCastRows = CastRows<T, T>;
using FloatToBf16CastRows = CastRows<float, c10::BFloat16>;
using FloatToHalfCastRows = CastRows<float, c10::Half>;
ENGINE_ISA_VARIANTS_PER_ELEMENT(run_cast, cast_rows, SameTypeCastRows)
ENGINE_ISA_VARIANTS(run_cast, cast_rows, FloatToBf16CastRows)
ENGINE_ISA_VARIANTS(run_cast, cast_rows, FloatToHalfCastRows)
ENGINE_ISA_VARIANTS(run_bias_residual, bias_residual_rows, Bf16ToFloatResidualRows)
ENGINE_ISA_VARIANTS(run_bias_residual, bias_residual_rows, HalfToFloatResidualRows)

// Rows per parallel task: enough elements (about 32K) to amortize a task's start.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// The bias as float32 (cols,), or zeros when absent.
at::Tensor bias_or_zeros(const std::optional<at::Tensor>& bias, int64_t cols) {
  return bias.has_value() ? bias->to(at::kFloat) : at::zeros({cols}, at::dtype(at::kFloat));
}

// grad == nullptr: out = gelu(pre + bias); else out = grad * gelu'(pre + bias), and its column sums into
// column_sums when given.
void gelu_op(const at::Tensor* grad, const at::Tensor& pre, const std::optional<at::Tensor>& bias,
             const at::Tensor& out, bool tanh_approx, const std::optional<at::Tensor>& column_sums = std::nullopt) {
  const int64_t rows = pre.size(0), cols = pre.size(1);
  const at::Tensor bias32 = bias_or_zeros(bias, cols);
  const int64_t blocks = column_sums.has_value() ? row_blocks(rows) : 0;
  const at::Tensor partials = blocks > 0 ? at::zeros({blocks, cols}, at::dtype(at::kFloat)) : at::Tensor();
  with_element_type(pre.scalar_type(), [&](auto element) {
    using T = decltype(element);
    const GeluRows<T> params{pre.data_ptr<T>(), bias32.data_ptr<float>(),
                             grad != nullptr ? grad->data_ptr<T>() : nullptr, out.data_ptr<T>(), nullptr, cols, 0,
                             0, tanh_approx};
    const auto run = [&](int64_t begin, int64_t end, float* sums) {
      GeluRows<T> chunk = params;
      chunk.row_begin = begin;
      chunk.row_end = end;
      chunk.column_sums = sums;
      if (grad != nullptr) {
        run_gelu_backward(chunk);
      } else {
        run_gelu_forward(chunk);
      }
    };
    if (blocks > 0) {
      at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
        for (int64_t block = first; block < last; ++block) {
          run(rows * block / blocks, rows * (block + 1) / blocks, partials.data_ptr<float>() + block * cols);
        }
      });
    } else {
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) { run(begin, end, nullptr); });
    }
  });
  if (blocks > 0) add_partials(partials, *column_sums);
}

}  // namespace

void bias_gelu(const at::Tensor& pre, const std::optional<at::Tensor>& bias, const at::Tensor& out,
               bool tanh_approx) {
  gelu_op(nullptr, pre, bias, out, tanh_approx);
}

void bias_gelu_backward(const at::Tensor& grad, const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                        const at::Tensor& grad_pre, bool tanh_approx, const std::optional<at::Tensor>& column_sums) {
  gelu_op(&grad, pre, bias, grad_pre, tanh_approx, column_sums);
}

void cast_with_column_sums(const at::Tensor& src, const std::optional<at::Tensor>& dst,
                           const at::Tensor& column_sums) {
  const int64_t rows = src.size(0), cols = src.size(1), blocks = row_blocks(rows);
  const at::Tensor partials = at::zeros({blocks, cols}, at::dtype(at::kFloat));
  with_element_type(src.scalar_type(), [&](auto src_element) {
    using TS = decltype(src_element);
    with_element_type(dst.has_value() ? dst->scalar_type() : src.scalar_type(), [&](auto dst_element) {
      using TD = decltype(dst_element);
      if constexpr (std::is_same_v<TS, TD> || std::is_same_v<TS, float>) {
        const CastRows<TS, TD> params{src.data_ptr<TS>(), dst.has_value() ? dst->data_ptr<TD>() : nullptr, nullptr,
                                      cols, 0, 0};
        at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
          for (int64_t block = first; block < last; ++block) {
            CastRows<TS, TD> chunk = params;
            chunk.row_begin = rows * block / blocks;
            chunk.row_end = rows * (block + 1) / blocks;
            chunk.column_sums = partials.data_ptr<float>() + block * cols;
            run_cast(chunk);
          }
        });
      } else {
        TORCH_CHECK(false, "engine: casting ", src.scalar_type(), " to ", dst->scalar_type(), " is not supported");
      }
    });
  });
  add_partials(partials, column_sums);
}

void bias_residual(const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                   const at::Tensor& out) {
  const int64_t rows = y.size(0), cols = y.size(1);
  const at::Tensor bias32 = bias_or_zeros(bias, cols);
  with_element_type(y.scalar_type(), [&](auto y_element) {
    using TY = decltype(y_element);
    with_element_type(out.scalar_type(), [&](auto element) {
      using T = decltype(element);
      if constexpr (std::is_same_v<TY, T> || std::is_same_v<T, float>) {
        const ResidualRows<TY, T> params{y.data_ptr<TY>(), bias32.data_ptr<float>(), residual.data_ptr<T>(),
                                         out.data_ptr<T>(), cols, 0, 0};
        at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
          ResidualRows<TY, T> chunk = params;
          chunk.row_begin = begin;
          chunk.row_end = end;
          run_bias_residual(chunk);
        });
      } else {
        TORCH_CHECK(false, "engine::bias_residual: y in ", y.scalar_type(), " with an output in ", out.scalar_type());
      }
    });
  });
}

}  // namespace engine::cpu

// The CPU kernels' entry points, called by the torch-facing glue (csrc/glue.cpp) only: the CPU
// counterpart of csrc/cuda/launchers.h.
//
// The glue has already checked every tensor (on the CPU, shapes as the schema says, one float dtype
// per op for the inputs, outputs and biases or weights, float32 statistics, int64 targets), made the
// matrices contiguous and allocated the outputs (contiguous, in that dtype). Attention's q, k, v,
// grad_out and out may have any strides: the kernels pack each head, so the model's transposed views
// cost no copy. The kernels read and write each tensor in its own dtype and compute in fp32 (simd.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <optional>

namespace engine::cpu {

// out (B, H, T, D), lse (B, H, T) float32.
void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                       const at::Tensor& lse, bool causal, float scale);
void attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_q,
                        const at::Tensor& grad_k, const at::Tensor& grad_v, bool causal, float scale);

// Matrices (rows, features), bias (features,) or none.
void bias_gelu(const at::Tensor& pre, const std::optional<at::Tensor>& bias, const at::Tensor& out,
               bool tanh_approx);
// bias_gelu_backward also writes the column sums of grad_pre (before rounding; float32 (features,)), the
// bias's gradient, into column_sums when given.
void bias_gelu_backward(const at::Tensor& grad, const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                        const at::Tensor& grad_pre, bool tanh_approx,
                        const std::optional<at::Tensor>& column_sums = std::nullopt);
// dst (rows, columns), when given, = src rounded to dst's dtype (the same, or float32 to bf16/fp16);
// column_sums (columns,) float32 = src's column sums, the gradient of a bias added to every row.
void cast_with_column_sums(const at::Tensor& src, const std::optional<at::Tensor>& dst,
                           const at::Tensor& column_sums);
// bias_residual: residual and out share one dtype; y has it too, or is bf16/fp16 next to fp32 ones.
void bias_residual(const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                   const at::Tensor& out);

// x (rows, columns); weight, bias, grad_weight, grad_bias (columns,); mean, rstd (rows,) float32.
void layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd, float eps);
void layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_x,
                         const at::Tensor& grad_weight, const at::Tensor& grad_bias);

// logits (rows, vocab); targets (rows,) int64, each in [0, vocab) or ignore_index (checked here, naming the
// first bad row: on the CPU that costs no device sync); loss 0-dim and lse (rows,) float32; grad_loss one
// float32 value.
void cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& loss,
                           const at::Tensor& lse, int64_t ignore_index);
void cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                            const at::Tensor& lse, const at::Tensor& grad_logits, int64_t ignore_index);

// ---- helpers of the kernel files

// f(T{}) with T the C++ element type of `dtype`: float, c10::BFloat16 or c10::Half (the glue has checked it).
template <class F>
decltype(auto) with_element_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(dtype == at::kFloat, "engine CPU kernels: unsupported dtype ", dtype); return f(float{});
  }
}

// Column sums over rows (the bias and LayerNorm weight gradients) are taken in row_blocks(rows) blocks of
// rows, each summing into a float32 partial of its own; add_partials then adds the partials in block order.
// The block count is fixed, so the sums do not depend on the number of threads.
inline int64_t row_blocks(int64_t rows) {
  constexpr int64_t kRowBlocks = 32;
  return std::clamp<int64_t>(rows, 1, kRowBlocks);
}

// column_sums (cols,) float32 = the sum of partials (blocks, cols) float32, in block order.
inline void add_partials(const at::Tensor& partials, const at::Tensor& column_sums) {
  const int64_t blocks = partials.size(0), cols = partials.size(1);
  const float* partial = partials.data_ptr<float>();
  float* sums = column_sums.data_ptr<float>();
  for (int64_t c = 0; c < cols; ++c) sums[c] = 0.0f;
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t c = 0; c < cols; ++c) sums[c] += partial[block * cols + c];
  }
}

}  // namespace engine::cpu

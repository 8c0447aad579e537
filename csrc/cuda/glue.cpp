// The torch side of the CUDA kernels: TORCH_LIBRARY_IMPL(engine, CUDA, m) for the ops whose schemas
// csrc/ops.cpp declares.
//
// Each function checks its tensors (device, dtype, shape; errors name the tensor), makes inputs
// contiguous, allocates outputs and workspaces with torch's caching allocator, and calls the plain
// launcher from launchers.h on the current CUDA stream of the inputs' device. Nothing here waits for the
// device. This file needs torch's CUDA headers, so it is compiled only in a CUDA build (setup.py);
// the kernels themselves live in the .cu files, which need only the CUDA toolkit.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "launchers.h"

namespace {

using engine_cuda::DType;

DType element_type(const at::Tensor& tensor, const char* name) {
  const auto type = tensor.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", type);
  if (type == at::kFloat) return DType::kFloat32;
  return type == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

void check_cuda(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.is_cuda(), name, " must be a CUDA tensor, got one on ", tensor.device());
}

// `tensor` is on the same device and has the same dtype as `reference`.
void check_like(const at::Tensor& tensor, const char* name, const at::Tensor& reference, const char* reference_name) {
  check_cuda(tensor, name);
  TORCH_CHECK(tensor.device() == reference.device(), name, " is on ", tensor.device(), " but ", reference_name,
              " is on ", reference.device());
  TORCH_CHECK(tensor.scalar_type() == reference.scalar_type(), name, " has dtype ", tensor.scalar_type(), " but ",
              reference_name, " has dtype ", reference.scalar_type());
}

void check_shape(const at::Tensor& tensor, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(tensor.sizes() == expected, name, " must have shape ", expected, ", got ", tensor.sizes());
}

void check_float32(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.scalar_type() == at::kFloat, name, " must be float32, got ", tensor.scalar_type());
}

void check_status(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "engine::", op, " on CUDA failed: ", cudaGetErrorString(status));
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// Contiguous and 16-byte aligned: the attention kernels copy rows in 16-byte chunks.
at::Tensor contiguous_aligned(const at::Tensor& tensor) {
  at::Tensor result = tensor.contiguous();
  if (reinterpret_cast<std::uintptr_t>(result.data_ptr()) % 16 != 0) result = result.clone();
  return result;
}

const void* optional_data(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->data_ptr() : nullptr;
}

// ---- attention ----

// q (B, H, T, D) and the checks shared by forward and backward; returns the dtype.
DType check_attention_input(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cuda(q, "q");
  const DType dtype = element_type(q, "q");
  TORCH_CHECK(q.dim() == 4, "q must have shape (B, H, T, D), got ", q.sizes());
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  check_shape(k, "k", q.sizes());
  check_shape(v, "v", q.sizes());
  const int64_t head_dim = q.size(3);
  TORCH_CHECK(head_dim % 8 == 0 && head_dim >= 8 && head_dim <= engine_cuda::kAttentionMaxHeadDim,
              "CUDA attention needs a head dimension (q.size(-1)) that is a multiple of 8 from 8 to ",
              engine_cuda::kAttentionMaxHeadDim, ", got ", head_dim);
  if (dtype != DType::kFloat32) {
    const auto* properties = at::cuda::getDeviceProperties(q.device().index());
    TORCH_CHECK(properties->major >= 8, "CUDA attention in ", q.scalar_type(),
                " needs tensor cores of compute capability 8.0 or newer; ", properties->name, " is ",
                properties->major, ".", properties->minor, " (use float32 or another backend)");
  }
  return dtype;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, bool causal, double scale) {
  const DType dtype = check_attention_input(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q_ = contiguous_aligned(q);
  const at::Tensor k_ = contiguous_aligned(k);
  const at::Tensor v_ = contiguous_aligned(v);
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2), head_dim = q.size(3);
  at::Tensor out = at::empty_like(q_);
  at::Tensor lse = at::empty({batch, heads, seq_len}, q.options().dtype(at::kFloat));
  check_status(engine_cuda::attention_forward(dtype, q_.data_ptr(), k_.data_ptr(), v_.data_ptr(), out.data_ptr(),
                                              lse.data_ptr<float>(), batch * heads, seq_len, head_dim, causal,
                                              static_cast<float>(scale), current_stream()),
               "attention_forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(const at::Tensor& grad_out,
                                                                       const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& out,
                                                                       const at::Tensor& lse, bool causal,
                                                                       double scale) {
  const DType dtype = check_attention_input(q, k, v);
  check_like(grad_out, "grad_out", q, "q");
  check_like(out, "out", q, "q");
  check_shape(grad_out, "grad_out", q.sizes());
  check_shape(out, "out", q.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2), head_dim = q.size(3);
  check_cuda(lse, "lse");
  check_float32(lse, "lse");
  TORCH_CHECK(lse.device() == q.device(), "lse is on ", lse.device(), " but q is on ", q.device());
  check_shape(lse, "lse", {batch, heads, seq_len});

  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor grad_out_ = contiguous_aligned(grad_out);
  const at::Tensor q_ = contiguous_aligned(q);
  const at::Tensor k_ = contiguous_aligned(k);
  const at::Tensor v_ = contiguous_aligned(v);
  const at::Tensor out_ = contiguous_aligned(out);
  const at::Tensor lse_ = lse.contiguous();
  at::Tensor grad_q = at::empty_like(q_);
  at::Tensor grad_k = at::empty_like(k_);
  at::Tensor grad_v = at::empty_like(v_);
  at::Tensor delta = at::empty({batch * heads * seq_len}, q.options().dtype(at::kFloat));
  check_status(engine_cuda::attention_backward(dtype, grad_out_.data_ptr(), q_.data_ptr(), k_.data_ptr(),
                                               v_.data_ptr(), out_.data_ptr(), lse_.data_ptr<float>(),
                                               grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(),
                                               delta.data_ptr<float>(), batch * heads, seq_len, head_dim, causal,
                                               static_cast<float>(scale), current_stream()),
               "attention_backward");
  return {grad_q, grad_k, grad_v};
}

// ---- FFN epilogues ----

// A (rows, features) matrix and an optional (features,) bias like it; returns the dtype.
DType check_matrix_and_bias(const at::Tensor& matrix, const char* name, const std::optional<at::Tensor>& bias) {
  check_cuda(matrix, name);
  const DType dtype = element_type(matrix, name);
  TORCH_CHECK(matrix.dim() == 2, name, " must have shape (N, F), got ", matrix.sizes());
  if (bias.has_value()) {
    check_like(*bias, "bias", matrix, name);
    check_shape(*bias, "bias", {matrix.size(1)});
  }
  return dtype;
}

std::optional<at::Tensor> contiguous_optional(const std::optional<at::Tensor>& tensor) {
  if (!tensor.has_value()) return std::nullopt;
  return tensor->contiguous();
}

at::Tensor bias_gelu_cuda(const at::Tensor& pre, const std::optional<at::Tensor>& bias, bool tanh_approx) {
  const DType dtype = check_matrix_and_bias(pre, "pre", bias);
  const c10::cuda::CUDAGuard guard(pre.device());
  const at::Tensor pre_ = pre.contiguous();
  const std::optional<at::Tensor> bias_ = contiguous_optional(bias);
  at::Tensor out = at::empty_like(pre_);
  check_status(engine_cuda::bias_gelu(dtype, pre_.data_ptr(), optional_data(bias_), out.data_ptr(), pre.size(0),
                                      pre.size(1), tanh_approx, current_stream()),
               "bias_gelu");
  return out;
}

at::Tensor bias_gelu_backward_cuda(const at::Tensor& grad, const at::Tensor& pre,
                                   const std::optional<at::Tensor>& bias, bool tanh_approx) {
  const DType dtype = check_matrix_and_bias(pre, "pre", bias);
  check_like(grad, "grad", pre, "pre");
  check_shape(grad, "grad", pre.sizes());
  const c10::cuda::CUDAGuard guard(pre.device());
  const at::Tensor grad_ = grad.contiguous();
  const at::Tensor pre_ = pre.contiguous();
  const std::optional<at::Tensor> bias_ = contiguous_optional(bias);
  at::Tensor grad_pre = at::empty_like(pre_);
  check_status(engine_cuda::bias_gelu_backward(dtype, grad_.data_ptr(), pre_.data_ptr(), optional_data(bias_),
                                               grad_pre.data_ptr(), pre.size(0), pre.size(1), tanh_approx,
                                               current_stream()),
               "bias_gelu_backward");
  return grad_pre;
}

at::Tensor bias_residual_cuda(const at::Tensor& y, const std::optional<at::Tensor>& bias,
                              const at::Tensor& residual) {
  const DType dtype = check_matrix_and_bias(y, "y", bias);
  check_like(residual, "residual", y, "y");
  check_shape(residual, "residual", y.sizes());
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor y_ = y.contiguous();
  const at::Tensor residual_ = residual.contiguous();
  const std::optional<at::Tensor> bias_ = contiguous_optional(bias);
  at::Tensor out = at::empty_like(y_);
  check_status(engine_cuda::bias_residual(dtype, y_.data_ptr(), optional_data(bias_), residual_.data_ptr(),
                                          out.data_ptr(), y.size(0), y.size(1), current_stream()),
               "bias_residual");
  return out;
}

// ---- LayerNorm ----

// x (N, C) and weight (C,) like it; returns the dtype.
DType check_layer_norm_input(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda(x, "x");
  const DType dtype = element_type(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must have shape (N, C), got ", x.sizes());
  check_like(weight, "weight", x, "x");
  check_shape(weight, "weight", {x.size(1)});
  return dtype;
}

// A (N,) fp32 statistic saved by the forward.
void check_statistic(const at::Tensor& statistic, const char* name, const at::Tensor& x) {
  check_cuda(statistic, name);
  check_float32(statistic, name);
  TORCH_CHECK(statistic.device() == x.device(), name, " is on ", statistic.device(), " but x is on ", x.device());
  check_shape(statistic, name, {x.size(0)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       double eps) {
  const DType dtype = check_layer_norm_input(x, weight);
  if (bias.has_value()) {
    check_like(*bias, "bias", x, "x");
    check_shape(*bias, "bias", {x.size(1)});
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_ = x.contiguous();
  const at::Tensor weight_ = weight.contiguous();
  const std::optional<at::Tensor> bias_ = contiguous_optional(bias);
  at::Tensor y = at::empty_like(x_);
  at::Tensor mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_status(engine_cuda::layer_norm_forward(dtype, x_.data_ptr(), weight_.data_ptr(), optional_data(bias_),
                                               y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                               x.size(0), x.size(1), static_cast<float>(eps), current_stream()),
               "layer_norm_forward");
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& mean,
                                                                        const at::Tensor& rstd) {
  const DType dtype = check_layer_norm_input(x, weight);
  check_like(grad_y, "grad_y", x, "x");
  check_shape(grad_y, "grad_y", x.sizes());
  check_statistic(mean, "mean", x);
  check_statistic(rstd, "rstd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor grad_y_ = grad_y.contiguous();
  const at::Tensor x_ = x.contiguous();
  const at::Tensor weight_ = weight.contiguous();
  const at::Tensor mean_ = mean.contiguous();
  const at::Tensor rstd_ = rstd.contiguous();
  const int64_t rows = x.size(0), columns = x.size(1);
  at::Tensor grad_x = at::empty_like(x_);
  at::Tensor grad_weight = at::empty_like(weight_);
  at::Tensor grad_bias = at::empty_like(weight_);
  at::Tensor workspace =
      at::empty({engine_cuda::layer_norm_backward_workspace_floats(rows, columns)}, x.options().dtype(at::kFloat));
  check_status(engine_cuda::layer_norm_backward(dtype, grad_y_.data_ptr(), x_.data_ptr(), weight_.data_ptr(),
                                                mean_.data_ptr<float>(), rstd_.data_ptr<float>(), grad_x.data_ptr(),
                                                grad_weight.data_ptr(), grad_bias.data_ptr(),
                                                workspace.data_ptr<float>(), rows, columns, current_stream()),
               "layer_norm_backward");
  return {grad_x, grad_weight, grad_bias};
}

// ---- cross-entropy ----

// logits (N, V) with V >= 1 and int64 targets (N,) on its device; returns the dtype.
DType check_cross_entropy_input(const at::Tensor& logits, const at::Tensor& targets) {
  check_cuda(logits, "logits");
  const DType dtype = element_type(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "logits must have shape (N, V), got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, "logits must have at least one class, got shape ", logits.sizes());
  check_cuda(targets, "targets");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.device() == logits.device(), "targets is on ", targets.device(), " but logits is on ",
              logits.device());
  check_shape(targets, "targets", {logits.size(0)});
  return dtype;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                              int64_t ignore_index) {
  const DType dtype = check_cross_entropy_input(logits, targets);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor logits_ = logits.contiguous();
  const at::Tensor targets_ = targets.contiguous();
  const int64_t rows = logits.size(0);
  const auto fp32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, fp32);
  at::Tensor lse = at::empty({rows}, fp32);
  at::Tensor row_losses = at::empty({rows}, fp32);
  check_status(engine_cuda::cross_entropy_forward(dtype, logits_.data_ptr(), targets_.data_ptr<int64_t>(),
                                                  loss.data_ptr<float>(), lse.data_ptr<float>(),
                                                  row_losses.data_ptr<float>(), rows, logits.size(1), ignore_index,
                                                  current_stream()),
               "cross_entropy_forward");
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                       const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index) {
  const DType dtype = check_cross_entropy_input(logits, targets);
  check_cuda(grad_loss, "grad_loss");
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must hold one value (the loss is a scalar), got shape ",
              grad_loss.sizes());
  TORCH_CHECK(grad_loss.device() == logits.device(), "grad_loss is on ", grad_loss.device(), " but logits is on ",
              logits.device());
  check_cuda(lse, "lse");
  check_float32(lse, "lse");
  TORCH_CHECK(lse.device() == logits.device(), "lse is on ", lse.device(), " but logits is on ", logits.device());
  check_shape(lse, "lse", {logits.size(0)});
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor grad_loss_ = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor logits_ = logits.contiguous();
  const at::Tensor targets_ = targets.contiguous();
  const at::Tensor lse_ = lse.contiguous();
  at::Tensor grad_logits = at::empty_like(logits_);
  at::Tensor workspace = at::empty({1}, logits.options().dtype(at::kFloat));
  check_status(engine_cuda::cross_entropy_backward(dtype, grad_loss_.data_ptr<float>(), logits_.data_ptr(),
                                                   targets_.data_ptr<int64_t>(), lse_.data_ptr<float>(),
                                                   grad_logits.data_ptr(), workspace.data_ptr<float>(),
                                                   logits.size(0), logits.size(1), ignore_index, current_stream()),
               "cross_entropy_backward");
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cuda);
  m.impl("bias_residual", &bias_residual_cuda);
  m.impl("layer_norm_forward", &layer_norm_forward_cuda);
  m.impl("layer_norm_backward", &layer_norm_backward_cuda);
  m.impl("cross_entropy_forward", &cross_entropy_forward_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
}

// The plain C++ interface between the CUDA kernels (csrc/cuda/*.cu) and the torch glue (csrc/glue.cpp).
//
// Why this seam exists: the kernel files include only CUDA headers, so `nvcc -c` compiles them on any
// machine with the CUDA toolkit, including CI machines whose CPU-only torch ships ATen/cuda and
// c10/cuda headers that do not compile (shared/PLATFORM.md). csrc/glue.cpp, shared with the CPU kernels,
// checks tensors, brings them to one dtype, allocates outputs and workspaces with torch and, in a CUDA
// build (ENGINE_WITH_CUDA), calls these functions with raw pointers on the current stream.
//
// Conventions for every launcher:
// - All tensors are contiguous and on the current device; `dtype` is the element type of every
//   non-fp32-statistics tensor of the op (inputs, outputs, weights and biases all share it).
// - Statistics (lse, mean, rstd, delta, row losses) and workspaces are fp32; targets are int64.
// - A nullable `bias` pointer means "no bias".
// - The return value is the launch status (cudaGetLastError after the last launch), or
//   cudaErrorInvalidValue for arguments the kernels do not support; the glue turns it into an error.
//   Shapes with zero elements launch nothing and return cudaSuccess.
// - Work is queued on `stream`; nothing synchronizes with the host.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace engine_cuda {

// Element type of the floating-point tensors of an op.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Attention head dimensions supported: multiples of 8 from 8 to this (zero-padded to 32, 64 or 128).
constexpr int64_t kAttentionMaxHeadDim = 128;

// ---- attention (attention.cu) -------------------------------------------------------------------

// out = softmax(q k^T * scale + causal mask) v and lse = log-sum-exp of the scaled (masked) scores.
// q, k, v, out: (batch_heads, seq_len, head_dim); lse: (batch_heads, seq_len) fp32.
// fp16/bf16 need compute capability 8.0 or newer. min_blocks_per_sm (1 or 2) picks the register budget of
// the fp16/bf16 kernel at head dims 40 to 64: 2 is the __launch_bounds__(256, 2) build (at most 128
// registers a thread, so two blocks share an SM); other head dims and fp32 have one build and ignore it.
cudaError_t attention_forward(DType dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                              int64_t batch_heads, int64_t seq_len, int64_t head_dim, bool causal, float scale,
                              int min_blocks_per_sm, cudaStream_t stream);

// Gradients of attention_forward given grad_out (same shape as out), the forward's out and lse.
// delta: a workspace of batch_heads * seq_len floats (rowsum(grad_out * out)); overwritten.
cudaError_t attention_backward(DType dtype, const void* grad_out, const void* q, const void* k, const void* v,
                               const void* out, const float* lse, void* grad_q, void* grad_k, void* grad_v,
                               float* delta, int64_t batch_heads, int64_t seq_len, int64_t head_dim, bool causal,
                               float scale, cudaStream_t stream);

// ---- FFN epilogues (ffn_epilogues.cu); matrices are (rows, features), bias is (features,) ----

// out = gelu(pre + bias); tanh_approx picks GPT-2's tanh form instead of the exact erf form.
cudaError_t bias_gelu(DType dtype, const void* pre, const void* bias, void* out, int64_t rows, int64_t features,
                      bool tanh_approx, cudaStream_t stream);

// grad_pre = grad * gelu'(pre + bias).
cudaError_t bias_gelu_backward(DType dtype, const void* grad, const void* pre, const void* bias, void* grad_pre,
                               int64_t rows, int64_t features, bool tanh_approx, cudaStream_t stream);

// out = residual + y + bias.
cudaError_t bias_residual(DType dtype, const void* y, const void* bias, const void* residual, void* out,
                          int64_t rows, int64_t features, cudaStream_t stream);

// ---- LayerNorm over the last dimension (layer_norm.cu); x is (rows, columns) ----

// y = (x - mean) * rstd * weight + bias, with mean and rstd = 1 / sqrt(var + eps) saved as fp32 (rows,).
cudaError_t layer_norm_forward(DType dtype, const void* x, const void* weight, const void* bias, void* y,
                               float* mean, float* rstd, int64_t rows, int64_t columns, float eps,
                               cudaStream_t stream);

// Size in floats of the workspace layer_norm_backward needs for this shape.
int64_t layer_norm_backward_workspace_floats(int64_t rows, int64_t columns);

// grad_x, grad_weight and grad_bias (both (columns,), reduced over rows) from grad_y and the forward's
// x, weight, mean and rstd. workspace: layer_norm_backward_workspace_floats(rows, columns) floats.
cudaError_t layer_norm_backward(DType dtype, const void* grad_y, const void* x, const void* weight,
                                const float* mean, const float* rstd, void* grad_x, void* grad_weight,
                                void* grad_bias, float* workspace, int64_t rows, int64_t columns,
                                cudaStream_t stream);

// ---- cross-entropy (cross_entropy.cu); logits are (rows, vocab), targets (rows,) int64 ----

// loss (one float) = mean over rows whose target != ignore_index of lse - logits[target]; lse (rows,).
// row_losses: a workspace of `rows` floats. A target outside [0, vocab) that is not ignore_index gives
// a NaN loss (checking it on the host would need a device sync).
cudaError_t cross_entropy_forward(DType dtype, const void* logits, const int64_t* targets, float* loss, float* lse,
                                  float* row_losses, int64_t rows, int64_t vocab, int64_t ignore_index,
                                  cudaStream_t stream);

// grad_logits = grad_loss / count * (softmax(logits) - onehot(target)) on non-ignored rows, 0 on ignored
// rows; grad_loss points to one float on the device. workspace: one float.
cudaError_t cross_entropy_backward(DType dtype, const float* grad_loss, const void* logits, const int64_t* targets,
                                   const float* lse, void* grad_logits, float* workspace, int64_t rows,
                                   int64_t vocab, int64_t ignore_index, cudaStream_t stream);

}  // namespace engine_cuda

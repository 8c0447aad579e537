// The torch-facing layer of every engine op, one for both devices: TORCH_LIBRARY_IMPL(engine, CPU, m)
// and, in the CUDA build, TORCH_LIBRARY_IMPL(engine, CUDA, m) register the same functions.
//
// Each function checks its tensors (dtype, shape, device; errors name the op and the tensor), brings
// them to the one dtype the kernels take, makes them contiguous, allocates the outputs and calls the
// kernels of the tensors' device: csrc/cpu/kernels.h, or the plain launchers of csrc/cuda/launchers.h
// with raw pointers on the current CUDA stream. Only those calls differ per device, so the CPU tests
// run the checks, promotions and allocations that CUDA tensors go through.
//
// Dtypes, as the fake functions in engine/ops/extension.py declare them. Under autocast the model
// hands the ops bf16 or fp16 activations next to float32 biases and weights; the kernels take one
// dtype, the activation's:
// - bias_gelu, bias_gelu_backward: the bias (and grad) are cast to pre's dtype; outputs have it.
// - bias_residual: bias and residual are cast to their promoted dtype with y (what `residual + y + bias`
//   gives in PyTorch, float32 under autocast); the output has it. y is cast too, except on the CPU, whose
//   kernel reads a bf16/fp16 y next to a float32 residual as it is.
// - ffn_forward, ffn_backward: x, w1 and w2 share one dtype; under autocast, its Autocast kernel casts them
//   to autocast's dtype first, as autocast does for a matmul. pre, hidden and the gradients of x, w1, w2
//   have it; out as bias_residual gives it; the bias gradients are float32.
// - layer_norm_forward: weight and bias are cast to x's dtype; y has it. layer_norm_backward computes
//   in x's dtype and returns grad_weight and grad_bias in weight's dtype.
// - attention: q, k, v and out share one dtype (an error otherwise), grad_out is cast to it.
// - cross_entropy: logits any float dtype; loss, lse and grad_loss float32; grad_logits has logits' dtype.
// Statistics (lse, mean, rstd) are float32 and checked, not cast.
//
// Layout: outputs are always contiguous. Inputs are made contiguous (a no-op when they are), except
// attention's on the CPU, whose kernels pack each head and read any strides (the model's q, k, v are
// transposed views); the CUDA kernels need contiguous, 16-byte-aligned rows.
//
// This file includes no ATen/cuda or c10/cuda header (they do not compile with a CPU torch,
// PLATFORM.md): the CUDA half, under ENGINE_WITH_CUDA (set by setup.py for the CUDAExtension build),
// reaches the current stream through c10's device-generic interface and the kernels through
// launchers.h, and tests/test_cuda_sources.py compiles it on machines without a GPU.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/autocast_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/core/ScalarType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include "cpu/kernels.h"

#ifdef ENGINE_WITH_CUDA
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "cuda/launchers.h"
#endif

namespace engine {
namespace {

// ------------------------------------------------------------------------------ checks

// "(2, 3)", "(8,)": shapes as Python prints them, in every message.
std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream text;
  text << "(";
  for (size_t i = 0; i < sizes.size(); ++i) text << (i > 0 ? ", " : "") << sizes[i];
  text << (sizes.size() == 1 ? ",)" : ")");
  return text.str();
}

bool is_float_type(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_float_type(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

void check_float32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

// `t` is on the device of `main`, the tensor whose device picked the kernel.
void check_device(const at::Tensor& t, const char* op, const char* name, const at::Tensor& main,
                  const char* main_name) {
  TORCH_CHECK(t.device() == main.device(), op, ": ", name, " is on ", t.device(), " but ", main_name, " is on ",
              main.device());
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", shape_string(expected), ", got ",
              shape_string(t.sizes()));
}

// A (rows, columns) float matrix: the main input of an op.
void check_matrix(const at::Tensor& t, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D ", shape, ", got shape ", shape_string(t.sizes()));
  check_float_type(t, op, name);
}

// Another float tensor of the given shape next to `main` (any float dtype: it is cast where needed).
void check_float_like(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name,
                      const at::Tensor& main, const char* main_name) {
  check_device(t, op, name, main, main_name);
  check_shape(t, shape, op, name);
  check_float_type(t, op, name);
}

// A float32 statistic of the given shape saved by a forward (lse, mean, rstd).
void check_statistic(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name,
                     const at::Tensor& main, const char* main_name) {
  check_device(t, op, name, main, main_name);
  check_shape(t, shape, op, name);
  check_float32(t, op, name);
}

// ------------------------------------------------------------------------------ promotion, layout

// `t` in the kernels' dtype and contiguous: `t` itself when it already is (checked without a dispatcher
// call, which costs about a microsecond per tensor). Not Tensor::to with MemoryFormat::Contiguous: for a
// view of the right dtype it returns the view, strides and all.
at::Tensor prepared(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return t.to(dtype).contiguous();
}

std::optional<at::Tensor> prepared(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value()) return std::nullopt;
  return prepared(*t, dtype);
}

// An output of `shape`, contiguous, in `dtype`, on `like`'s device.
at::Tensor new_output(at::IntArrayRef shape, at::ScalarType dtype, const at::Tensor& like) {
  return at::empty(shape, like.options().dtype(dtype));
}

// An attention input in q's dtype as the device's kernels read it: any strides on the CPU; contiguous and
// 16-byte aligned on CUDA (the kernels copy rows in 16-byte chunks).
at::Tensor attention_input(const at::Tensor& t, at::ScalarType dtype) {
  if (!t.is_cuda()) return t.scalar_type() == dtype ? t : t.to(dtype);
  at::Tensor result = prepared(t, dtype);
  if (reinterpret_cast<std::uintptr_t>(result.data_ptr()) % 16 != 0) result = result.clone();
  return result;
}

// ------------------------------------------------------------------------------ CUDA launches

#ifdef ENGINE_WITH_CUDA
namespace cuda {

using engine_cuda::DType;

DType element_type(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return DType::kFloat32;
  return t.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

const void* data(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

float* floats(const at::Tensor& t) { return t.data_ptr<float>(); }

// A launch on `t`'s device and that device's current stream (what torch's own kernels use).
class Launch {
 public:
  explicit Launch(const at::Tensor& t) : guard_(t.device()) {
    const c10::impl::VirtualGuardImpl device_interface(c10::DeviceType::CUDA);
    stream_ = static_cast<cudaStream_t>(device_interface.getStream(t.device()).native_handle());
  }

  cudaStream_t stream() const { return stream_; }

  // The launcher's status as an error naming the op.
  static void check(cudaError_t status, const char* op) {
    TORCH_CHECK(status == cudaSuccess, op, " on CUDA failed: ", cudaGetErrorString(status));
  }

 private:
  c10::DeviceGuard guard_;
  cudaStream_t stream_ = nullptr;
};

// What the CUDA attention kernels support beyond the glue's checks: head dims and, for fp16/bf16, tensor cores.
void check_attention_support(const at::Tensor& q, const char* op) {
  const int64_t head_dim = q.size(3);
  TORCH_CHECK(head_dim % 8 == 0 && head_dim >= 8 && head_dim <= engine_cuda::kAttentionMaxHeadDim, op,
              ": CUDA attention needs a head dimension (q.size(-1)) that is a multiple of 8 from 8 to ",
              engine_cuda::kAttentionMaxHeadDim, ", got ", head_dim);
  if (q.scalar_type() == at::kFloat) return;
  int major = 0, minor = 0;
  const int device = q.device().index();
  Launch::check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), op);
  Launch::check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), op);
  TORCH_CHECK(major >= 8, op, ": CUDA attention in ", q.scalar_type(),
              " needs tensor cores of compute capability 8.0 or newer; ", q.device(), " is ", major, ".", minor,
              " (use float32 or another backend)");
}

// ENGINE_CUDA_ATTENTION_BLOCKS_PER_SM=2 picks the attention forward built for two blocks per SM at head dims
// 40 to 64 (launchers.h); read at every call, so one process (the GPU check) can time both builds.
int attention_blocks_per_sm() {
  const char* value = std::getenv("ENGINE_CUDA_ATTENTION_BLOCKS_PER_SM");
  const std::string text = value == nullptr ? "" : value;
  TORCH_CHECK(text.empty() || text == "1" || text == "2", "ENGINE_CUDA_ATTENTION_BLOCKS_PER_SM must be 1 or 2, got '",
              text, "'");
  return text == "2" ? 2 : 1;
}

}  // namespace cuda
#endif

// ------------------------------------------------------------------------------ attention

// q (B, H, T, D) and k, v like it; scale finite.
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            const char* op) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, T, D), got shape ", shape_string(q.sizes()));
  check_float_type(q, op, "q");
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_device(*t, op, name, q, "q");
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": ", name, " must have q's shape ", shape_string(q.sizes()),
                ", got ", shape_string(t->sizes()));
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                " but q has dtype ", q.scalar_type(), " (q, k and v must share one dtype)");
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
#ifdef ENGINE_WITH_CUDA
  if (q.is_cuda()) cuda::check_attention_support(q, op);
#endif
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool causal, double scale) {
  constexpr const char* op = "engine::attention_forward";
  check_attention_inputs(q, k, v, scale, op);
  const auto dtype = q.scalar_type();
  const at::Tensor q_ = attention_input(q, dtype), k_ = attention_input(k, dtype), v_ = attention_input(v, dtype);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  at::Tensor out = new_output(q.sizes(), dtype, q);
  at::Tensor lse = new_output({B, H, T}, at::kFloat, q);
#ifdef ENGINE_WITH_CUDA
  if (q.is_cuda()) {
    const cuda::Launch launch(q);
    cuda::Launch::check(engine_cuda::attention_forward(cuda::element_type(q_), q_.data_ptr(), k_.data_ptr(),
                                                       v_.data_ptr(), out.data_ptr(), cuda::floats(lse), B * H, T,
                                                       q.size(3), causal, static_cast<float>(scale),
                                                       cuda::attention_blocks_per_sm(), launch.stream()),
                        op);
    return {out, lse};
  }
#endif
  cpu::attention_forward(q_, k_, v_, out, lse, causal, static_cast<float>(scale));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double scale) {
  constexpr const char* op = "engine::attention_backward";
  check_attention_inputs(q, k, v, scale, op);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  check_float_like(grad_out, q.sizes(), op, "grad_out", q, "q");
  check_device(out, op, "out", q, "q");
  check_shape(out, q.sizes(), op, "out");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), op, ": out has dtype ", out.scalar_type(), " but q has dtype ",
              q.scalar_type());
  check_statistic(lse, {B, H, T}, op, "lse", q, "q");
  const auto dtype = q.scalar_type();
  const at::Tensor grad_out_ = attention_input(grad_out, dtype), q_ = attention_input(q, dtype),
                   k_ = attention_input(k, dtype), v_ = attention_input(v, dtype),
                   out_ = attention_input(out, dtype), lse_ = lse.contiguous();
  at::Tensor grad_q = new_output(q.sizes(), dtype, q);
  at::Tensor grad_k = new_output(q.sizes(), dtype, q);
  at::Tensor grad_v = new_output(q.sizes(), dtype, q);
#ifdef ENGINE_WITH_CUDA
  if (q.is_cuda()) {
    const cuda::Launch launch(q);
    const at::Tensor delta = new_output({B * H * T}, at::kFloat, q);  // the launcher's workspace
    cuda::Launch::check(engine_cuda::attention_backward(cuda::element_type(q_), grad_out_.data_ptr(), q_.data_ptr(),
                                                        k_.data_ptr(), v_.data_ptr(), out_.data_ptr(),
                                                        cuda::floats(lse_), grad_q.data_ptr(), grad_k.data_ptr(),
                                                        grad_v.data_ptr(), cuda::floats(delta), B * H, T, q.size(3),
                                                        causal, static_cast<float>(scale), launch.stream()),
                        op);
    return {grad_q, grad_k, grad_v};
  }
#endif
  cpu::attention_backward(grad_out_, q_, k_, v_, out_, lse_, grad_q, grad_k, grad_v, causal,
                          static_cast<float>(scale));
  return {grad_q, grad_k, grad_v};
}

// ------------------------------------------------------------------------------ FFN epilogues

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& matrix, const char* op,
                const char* matrix_name) {
  if (bias.has_value()) check_float_like(*bias, {matrix.size(1)}, op, "bias", matrix, matrix_name);
}

// grad == nullptr: gelu(pre + bias); else grad * gelu'(pre + bias). Both in pre's dtype.
at::Tensor gelu_op(const at::Tensor* grad, const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                   bool tanh_approx, const char* op) {
  check_matrix(pre, op, "pre", "(N, F)");
  check_bias(bias, pre, op, "pre");
  if (grad != nullptr) check_float_like(*grad, pre.sizes(), op, "grad", pre, "pre");
  const auto dtype = pre.scalar_type();
  const at::Tensor pre_ = prepared(pre, dtype);
  const std::optional<at::Tensor> bias_ = prepared(bias, dtype);
  const at::Tensor grad_ = grad != nullptr ? prepared(*grad, dtype) : at::Tensor();
  at::Tensor out = new_output(pre.sizes(), dtype, pre);
#ifdef ENGINE_WITH_CUDA
  if (pre.is_cuda()) {
    const cuda::Launch launch(pre);
    const auto element = cuda::element_type(pre_);
    const int64_t rows = pre.size(0), features = pre.size(1);
    cuda::Launch::check(
        grad != nullptr
            ? engine_cuda::bias_gelu_backward(element, grad_.data_ptr(), pre_.data_ptr(), cuda::data(bias_),
                                              out.data_ptr(), rows, features, tanh_approx, launch.stream())
            : engine_cuda::bias_gelu(element, pre_.data_ptr(), cuda::data(bias_), out.data_ptr(), rows, features,
                                     tanh_approx, launch.stream()),
        op);
    return out;
  }
#endif
  if (grad != nullptr) {
    cpu::bias_gelu_backward(grad_, pre_, bias_, out, tanh_approx);
  } else {
    cpu::bias_gelu(pre_, bias_, out, tanh_approx);
  }
  return out;
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
  check_matrix(y, op, "y", "(N, C)");
  check_bias(bias, y, op, "y");
  check_device(residual, op, "residual", y, "y");
  TORCH_CHECK(residual.sizes() == y.sizes(), op, ": residual must have y's shape ", shape_string(y.sizes()),
              ", got ", shape_string(residual.sizes()));
  check_float_type(residual, op, "residual");
  auto dtype = c10::promoteTypes(y.scalar_type(), residual.scalar_type());
  if (bias.has_value()) dtype = c10::promoteTypes(dtype, bias->scalar_type());
  // The CPU kernel reads a bf16/fp16 y next to fp32 residual and output as it is (autocast's case); CUDA's
  // kernels take one dtype.
  const auto y_dtype = !y.is_cuda() && dtype == at::kFloat ? y.scalar_type() : dtype;
  const at::Tensor y_ = prepared(y, y_dtype), residual_ = prepared(residual, dtype);
  const std::optional<at::Tensor> bias_ = prepared(bias, dtype);
  at::Tensor out = new_output(y.sizes(), dtype, y);
#ifdef ENGINE_WITH_CUDA
  if (y.is_cuda()) {
    const cuda::Launch launch(y);
    cuda::Launch::check(engine_cuda::bias_residual(cuda::element_type(y_), y_.data_ptr(), cuda::data(bias_),
                                                   residual_.data_ptr(), out.data_ptr(), y.size(0), y.size(1),
                                                   launch.stream()),
                        op);
    return out;
  }
#endif
  cpu::bias_residual(y_, bias_, residual_, out);
  return out;
}

// ------------------------------------------------------------------------------ the whole FFN
//
// The matmuls are PyTorch's (at::mm: oneDNN/MKL on the CPU, cuBLAS on CUDA), the epilogues the kernels
// above; the bias gradients are column sums taken in the same pass as the epilogue's backward on the CPU.

// x, w1 (F, C) and w2 (C, F): one float dtype and device, shapes that multiply.
void check_ffn_inputs(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must be (..., C), got a scalar");
  check_float_type(x, op, "x");
  const int64_t C = x.size(-1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, op, ": w1 must be (F, C) with C = ", C, " (x's last dimension), got ",
              "shape ", shape_string(w1.sizes()));
  check_shape(w2, {C, w1.size(0)}, op, "w2");
  for (const auto& [t, name] : {std::pair{&w1, "w1"}, std::pair{&w2, "w2"}}) {
    check_device(*t, op, name, x, "x");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                " but x has dtype ", x.scalar_type(), " (x, w1 and w2 must share one dtype)");
  }
}

// (..., C) -> (N, C), the rows the matmuls take (a view when it can be).
at::Tensor rows_of(const at::Tensor& t) {
  const auto sizes = t.sizes();
  return t.reshape({c10::multiply_integers(sizes.begin(), sizes.end() - 1), sizes.back()});  // C = 0 too
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_forward(const at::Tensor& x, const at::Tensor& w1,
                                                           const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                           const std::optional<at::Tensor>& b2,
                                                           const at::Tensor& residual, bool tanh_approx) {
  constexpr const char* op = "engine::ffn_forward";
  check_ffn_inputs(x, w1, w2, op);
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must have x's shape ", shape_string(x.sizes()),
              ", got ", shape_string(residual.sizes()));
  // The matmuls run in x's dtype: autocast's cast is the op's Autocast kernel (below), so the calls here go
  // to their kernels, not to autocast, even where a caller bypasses that kernel.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // Contiguous operands (no copy when they are): the matmuls then take the same path, and give the same
  // bits, whatever the inputs' strides.
  const at::Tensor pre = at::mm(rows_of(x.contiguous()), w1.contiguous().t());                     // (N, F)
  const at::Tensor hidden = gelu_op(nullptr, pre, b1, tanh_approx, op);                             // (N, F)
  const at::Tensor out = bias_residual(at::mm(hidden, w2.contiguous().t()), b2, rows_of(residual));  // (N, C)
  return {out.view(residual.sizes()), pre, hidden};
}

// grad * act'(pre + bias), and its column sums in float32 (the bias's gradient). The CPU kernel sums the
// float32 values before they are rounded to pre's dtype; on CUDA the sums are PyTorch's, of the rounded
// grad_pre (in bf16 the two differ by the rounding, about 2^-9 of each term, well within the 2x rule).
std::tuple<at::Tensor, at::Tensor> gelu_backward_and_column_sums(const at::Tensor& grad, const at::Tensor& pre,
                                                                 const std::optional<at::Tensor>& bias,
                                                                 bool tanh_approx, const char* op) {
#ifdef ENGINE_WITH_CUDA
  if (pre.is_cuda()) {
    at::Tensor grad_pre = gelu_op(&grad, pre, bias, tanh_approx, op);
    return {grad_pre, grad_pre.sum(0, /*keepdim=*/false, at::kFloat)};
  }
#endif
  check_bias(bias, pre, op, "pre");
  const auto dtype = pre.scalar_type();
  at::Tensor grad_pre = new_output(pre.sizes(), dtype, pre);
  at::Tensor sums = new_output({pre.size(1)}, at::kFloat, pre);
  cpu::bias_gelu_backward(prepared(grad, dtype), prepared(pre, dtype), prepared(bias, dtype), grad_pre, tanh_approx,
                          sums);
  return {grad_pre, sums};
}

// grad (N, C) in `dtype` (itself when it has it) and its column sums in float32 (the gradient of y + bias).
std::tuple<at::Tensor, at::Tensor> cast_and_column_sums(const at::Tensor& grad, at::ScalarType dtype) {
#ifdef ENGINE_WITH_CUDA
  if (grad.is_cuda()) return {grad.to(dtype), grad.sum(0, /*keepdim=*/false, at::kFloat)};
#endif
  // The kernel keeps the dtype or rounds float32 to bf16/fp16 (the model's cases); others go through float32.
  const bool direct = grad.scalar_type() == dtype || grad.scalar_type() == at::kFloat;
  const at::Tensor grad_ = direct ? grad.contiguous() : grad.to(at::kFloat).contiguous();
  const bool same = grad_.scalar_type() == dtype;
  const at::Tensor cast = same ? grad_ : new_output(grad.sizes(), dtype, grad);
  at::Tensor sums = new_output({grad.size(1)}, at::kFloat, grad);
  cpu::cast_with_column_sums(grad_, same ? std::nullopt : std::optional<at::Tensor>(cast), sums);
  return {cast, sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const at::Tensor& w2, const at::Tensor& pre, const at::Tensor& hidden, bool tanh_approx) {
  constexpr const char* op = "engine::ffn_backward";
  check_ffn_inputs(x, w1, w2, op);
  // x, w1 and w2 come in the forward's compute dtype; a backward called under autocast does not recast them.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor rows = rows_of(x);
  const int64_t features = w1.size(0);
  check_float_like(grad_out, x.sizes(), op, "grad_out", x, "x");
  for (const auto& [t, name] : {std::pair{&pre, "pre"}, std::pair{&hidden, "hidden"}}) {
    check_device(*t, op, name, x, "x");
    check_shape(*t, {rows.size(0), features}, op, name);
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                " but x has dtype ", x.scalar_type());
  }
  // Contiguous operands, as in the forward.
  const auto [grad_y, grad_b2] = cast_and_column_sums(rows_of(grad_out), x.scalar_type());  // (N, C), (C,)
  const at::Tensor grad_w2 = at::mm(grad_y.t(), hidden.contiguous());                     // (C, F)
  const auto [grad_pre, grad_b1] =
      gelu_backward_and_column_sums(at::mm(grad_y, w2.contiguous()), pre, b1, tanh_approx, op);  // (N, F), (F,)
  const at::Tensor grad_x = at::mm(grad_pre, w1.contiguous()).view(x.sizes());                    // (..., C)
  const at::Tensor grad_w1 = at::mm(grad_pre.t(), rows.contiguous());                             // (F, C)
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

// ------------------------------------------------------------------------------ LayerNorm

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "engine::layer_norm_forward";
  check_matrix(x, op, "x", "(N, C)");
  const int64_t rows = x.size(0), columns = x.size(1);
  check_float_like(weight, {columns}, op, "weight", x, "x");
  if (bias.has_value()) check_float_like(*bias, {columns}, op, "bias", x, "x");
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  const auto dtype = x.scalar_type();
  const at::Tensor x_ = prepared(x, dtype), weight_ = prepared(weight, dtype);
  const std::optional<at::Tensor> bias_ = prepared(bias, dtype);
  at::Tensor y = new_output(x.sizes(), dtype, x);
  at::Tensor mean = new_output({rows}, at::kFloat, x);
  at::Tensor rstd = new_output({rows}, at::kFloat, x);
#ifdef ENGINE_WITH_CUDA
  if (x.is_cuda()) {
    const cuda::Launch launch(x);
    cuda::Launch::check(engine_cuda::layer_norm_forward(cuda::element_type(x_), x_.data_ptr(), weight_.data_ptr(),
                                                        cuda::data(bias_), y.data_ptr(), cuda::floats(mean),
                                                        cuda::floats(rstd), rows, columns, static_cast<float>(eps),
                                                        launch.stream()),
                        op);
    return {y, mean, rstd};
  }
#endif
  cpu::layer_norm_forward(x_, weight_, bias_, y, mean, rstd, static_cast<float>(eps));
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& rstd) {
  constexpr const char* op = "engine::layer_norm_backward";
  check_matrix(x, op, "x", "(N, C)");
  const int64_t rows = x.size(0), columns = x.size(1);
  check_float_like(grad_y, x.sizes(), op, "grad_y", x, "x");
  check_float_like(weight, {columns}, op, "weight", x, "x");
  check_statistic(mean, {rows}, op, "mean", x, "x");
  check_statistic(rstd, {rows}, op, "rstd", x, "x");
  const auto dtype = x.scalar_type();
  const at::Tensor grad_y_ = prepared(grad_y, dtype), x_ = prepared(x, dtype), weight_ = prepared(weight, dtype),
                   mean_ = mean.contiguous(), rstd_ = rstd.contiguous();
  at::Tensor grad_x = new_output(x.sizes(), dtype, x);
  // The kernels reduce the weight and bias gradients in fp32 and round them to x's dtype; they are
  // returned in weight's dtype.
  at::Tensor grad_weight = new_output({columns}, dtype, x);
  at::Tensor grad_bias = new_output({columns}, dtype, x);
  const auto weight_dtype = weight.scalar_type();
#ifdef ENGINE_WITH_CUDA
  if (x.is_cuda()) {
    const cuda::Launch launch(x);
    const at::Tensor workspace =
        new_output({engine_cuda::layer_norm_backward_workspace_floats(rows, columns)}, at::kFloat, x);
    cuda::Launch::check(engine_cuda::layer_norm_backward(cuda::element_type(x_), grad_y_.data_ptr(), x_.data_ptr(),
                                                         weight_.data_ptr(), cuda::floats(mean_),
                                                         cuda::floats(rstd_), grad_x.data_ptr(),
                                                         grad_weight.data_ptr(), grad_bias.data_ptr(),
                                                         cuda::floats(workspace), rows, columns, launch.stream()),
                        op);
    return {grad_x, grad_weight.to(weight_dtype), grad_bias.to(weight_dtype)};
  }
#endif
  cpu::layer_norm_backward(grad_y_, x_, weight_, mean_, rstd_, grad_x, grad_weight, grad_bias);
  return {grad_x, grad_weight.to(weight_dtype), grad_bias.to(weight_dtype)};
}

// ------------------------------------------------------------------------------ cross-entropy

// logits (N, V) with V >= 1 unless N = 0, and int64 targets (N,) on its device.
void check_cross_entropy_inputs(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  check_matrix(logits, op, "logits", "(N, V)");
  TORCH_CHECK(logits.size(1) > 0 || logits.size(0) == 0, op, ": logits must have at least one class, got shape ",
              shape_string(logits.sizes()));
  check_device(targets, op, "targets", logits, "logits");
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  check_shape(targets, {logits.size(0)}, op, "targets");
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                         int64_t ignore_index) {
  constexpr const char* op = "engine::cross_entropy_forward";
  check_cross_entropy_inputs(logits, targets, op);
  const int64_t rows = logits.size(0);
  const at::Tensor logits_ = prepared(logits, logits.scalar_type()), targets_ = targets.contiguous();
  at::Tensor loss = new_output({}, at::kFloat, logits);
  at::Tensor lse = new_output({rows}, at::kFloat, logits);
#ifdef ENGINE_WITH_CUDA
  if (logits.is_cuda()) {
    const cuda::Launch launch(logits);
    const at::Tensor row_losses = new_output({rows}, at::kFloat, logits);  // the launcher's workspace
    cuda::Launch::check(engine_cuda::cross_entropy_forward(cuda::element_type(logits_), logits_.data_ptr(),
                                                           targets_.data_ptr<int64_t>(), cuda::floats(loss),
                                                           cuda::floats(lse), cuda::floats(row_losses), rows,
                                                           logits.size(1), ignore_index, launch.stream()),
                        op);
    return {loss, lse};
  }
#endif
  cpu::cross_entropy_forward(logits_, targets_, loss, lse, ignore_index);
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& lse, int64_t ignore_index) {
  constexpr const char* op = "engine::cross_entropy_backward";
  check_cross_entropy_inputs(logits, targets, op);
  const int64_t rows = logits.size(0);
  check_device(grad_loss, op, "grad_loss", logits, "logits");
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must hold one value (the loss is a scalar), got shape ",
              shape_string(grad_loss.sizes()));
  check_statistic(lse, {rows}, op, "lse", logits, "logits");
  const auto dtype = logits.scalar_type();
  const at::Tensor grad_loss_ = prepared(grad_loss, at::kFloat), logits_ = prepared(logits, dtype),
                   targets_ = targets.contiguous(), lse_ = lse.contiguous();
  at::Tensor grad_logits = new_output(logits.sizes(), dtype, logits);
#ifdef ENGINE_WITH_CUDA
  if (logits.is_cuda()) {
    const cuda::Launch launch(logits);
    const at::Tensor workspace = new_output({1}, at::kFloat, logits);
    cuda::Launch::check(engine_cuda::cross_entropy_backward(cuda::element_type(logits_), cuda::floats(grad_loss_),
                                                            logits_.data_ptr(), targets_.data_ptr<int64_t>(),
                                                            cuda::floats(lse_), grad_logits.data_ptr(),
                                                            cuda::floats(workspace), rows, logits.size(1),
                                                            ignore_index, launch.stream()),
                        op);
    return grad_logits;
  }
#endif
  cpu::cross_entropy_backward(grad_loss_, logits_, targets_, lse_, grad_logits, ignore_index);
  return grad_logits;
}

// ------------------------------------------------------------------------------ autograd formulas
//
// The autograd formula of every forward op, for every device (the Autograd key): each forward saves what
// its backward needs and the backward calls the backward op. They live here, in C++, rather than in
// Python register_autograd: the Python path cost about 60 to 100 us per op and step on the 2-core CPU (the
// wrapper's Python frames, the ctx object, the garbage collector it wakes), which summed to a quarter of
// a small model's step. Every op is called through the dispatcher (below autograd), so torch.compile and
// the fake functions (engine/ops/extension.py) see them. Auxiliary outputs (lse, mean, rstd) are not
// differentiable: engine.ops never returns them.

// The typed handle of an op of the engine library, looked up once per call site.
template <class Signature>
c10::TypedOperatorHandle<Signature> engine_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The column sums of grad (N, C) in fp32, as `dtype`: the gradient of a bias broadcast over rows.
at::Tensor bias_gradient(const at::Tensor& grad, at::ScalarType dtype) {
  return grad.sum(0, /*keepdim=*/false, at::kFloat).to(dtype);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The multi-output functions set materialize_grads(false): autograd then passes their auxiliary outputs'
// gradients (always absent: engine.ops never returns those outputs) as undefined tensors instead of zeros of
// their shape, which for the FFN's pre and hidden would be two (N, 4C) fills per step. A backward reached
// without the main output's gradient has nothing to pass on: one undefined gradient per forward argument.

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               bool causal, double scale) {
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the auxiliary outputs
    static const auto op = engine_op<decltype(attention_forward)>("engine::attention_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the call below goes to the kernel, not back here
    auto [out, lse] = op.call(q, k, v, causal, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(5);
    static const auto op = engine_op<decltype(attention_backward)>("engine::attention_backward");
    const auto saved = ctx->get_saved_variables();
    auto [grad_q, grad_k, grad_v] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                            ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble());
    return {grad_q, grad_k, grad_v, at::Tensor(), at::Tensor()};
  }
};

// act(pre + bias): d/d pre = grad * act'(pre + bias); d/d bias = its column sums.
class BiasGeluFunction : public torch::autograd::Function<BiasGeluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                            bool tanh_approx) {
    static const auto op = engine_op<decltype(bias_gelu)>("engine::bias_gelu");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({pre, bias.value_or(at::Tensor())});
    ctx->saved_data["tanh_approx"] = tanh_approx;
    return op.call(pre, bias, tanh_approx);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = engine_op<decltype(bias_gelu_backward)>("engine::bias_gelu_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& bias = saved[1];
    const std::optional<at::Tensor> optional_bias = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
    at::Tensor grad_pre = op.call(grads[0], saved[0], optional_bias, ctx->saved_data["tanh_approx"].toBool());
    at::Tensor grad_bias = bias.defined() ? bias_gradient(grad_pre, bias.scalar_type()) : at::Tensor();
    return {grad_pre, grad_bias, at::Tensor()};
  }
};

// residual + y + bias: each input's gradient is grad, in its own dtype (the bias's summed over rows).
class BiasResidualFunction : public torch::autograd::Function<BiasResidualFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const std::optional<at::Tensor>& bias,
                            const at::Tensor& residual) {
    static const auto op = engine_op<decltype(bias_residual)>("engine::bias_residual");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["y_dtype"] = static_cast<int64_t>(y.scalar_type());
    ctx->saved_data["residual_dtype"] = static_cast<int64_t>(residual.scalar_type());
    ctx->saved_data["bias_dtype"] = bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    return op.call(y, bias, residual);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    const auto dtype = [&](const char* name) { return static_cast<at::ScalarType>(ctx->saved_data[name].toInt()); };
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    at::Tensor grad_bias = bias_dtype >= 0 ? bias_gradient(grad, dtype("bias_dtype")) : at::Tensor();
    return {grad.to(dtype("y_dtype")), grad_bias, grad.to(dtype("residual_dtype"))};
  }
};

class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the auxiliary outputs
    static const auto op = engine_op<decltype(layer_norm_forward)>("engine::layer_norm_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = op.call(x, weight, bias, eps);
    ctx->save_for_backward({x, weight, mean, rstd});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(4);
    static const auto op = engine_op<decltype(layer_norm_backward)>("engine::layer_norm_backward");
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_weight, grad_bias] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3]);
    return {grad_x, grad_weight, ctx->saved_data["has_bias"].toBool() ? grad_bias : at::Tensor(), at::Tensor()};
  }
};

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets,
                               int64_t ignore_index) {
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the auxiliary outputs
    static const auto op = engine_op<decltype(cross_entropy_forward)>("engine::cross_entropy_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, lse] = op.call(logits, targets, ignore_index);
    ctx->save_for_backward({logits, targets, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({lse});
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(3);
    static const auto op = engine_op<decltype(cross_entropy_backward)>("engine::cross_entropy_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits = op.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["ignore_index"].toInt());
    return {grad_logits, at::Tensor(), at::Tensor()};
  }
};

// The FFN as one node of the graph: x, w1 and w2 come in one dtype (autocast's, cast by the Autocast kernel
// below); each gradient goes back in its input's dtype.
class FfnFunction : public torch::autograd::Function<FfnFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                               const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                               const std::optional<at::Tensor>& b2, const at::Tensor& residual, bool tanh_approx) {
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the auxiliary outputs
    static const auto op = engine_op<decltype(ffn_forward)>("engine::ffn_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, pre, hidden] = op.call(x, w1, b1, w2, b2, residual, tanh_approx);
    ctx->save_for_backward({x, w1, b1.value_or(at::Tensor()), w2, pre, hidden});
    ctx->saved_data["tanh_approx"] = tanh_approx;
    const auto dtype_of = [](const std::optional<at::Tensor>& t) {
      return t.has_value() ? static_cast<int64_t>(t->scalar_type()) : int64_t{-1};
    };
    ctx->saved_data["dtypes"] = std::vector<int64_t>{dtype_of(b1), dtype_of(b2), dtype_of(residual)};
    ctx->mark_non_differentiable({pre, hidden});
    return {out, pre, hidden};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(7);
    static const auto op = engine_op<decltype(ffn_backward)>("engine::ffn_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& b1 = saved[2];
    const std::optional<at::Tensor> optional_b1 = b1.defined() ? std::optional<at::Tensor>(b1) : std::nullopt;
    auto [grad_x, grad_w1, grad_b1, grad_w2, grad_b2] =
        op.call(grads[0], saved[0], saved[1], optional_b1, saved[3], saved[4], saved[5],
                ctx->saved_data["tanh_approx"].toBool());
    // The biases' and residual's gradients in their own dtypes (x, w1 and w2 have the op's); none for an
    // absent bias.
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    const auto as_input = [&](const at::Tensor& grad, size_t input) {
      return dtypes[input] < 0 ? at::Tensor() : grad.to(static_cast<at::ScalarType>(dtypes[input]));
    };
    return {grad_x, grad_w1, as_input(grad_b1, 0), grad_w2, as_input(grad_b2, 1), as_input(grads[0], 2),
            at::Tensor()};
  }
};

// ------------------------------------------------------------------------------ autocast
//
// The FFN's matmuls run in autocast's dtype, as a matmul's do: its Autocast kernel casts x, w1 and w2 (float
// tensors other than float64) and calls the op with autocast off. The other ops have no Autocast kernel: they
// compute in the dtypes they are given (the model's activations, which autocast's matmuls made).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_forward_autocast(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, const at::Tensor& residual, bool tanh_approx) {
  static const auto op = engine_op<decltype(ffn_forward)>("engine::ffn_forward");
  const auto device_type = x.device().type();
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // autocast's own cast: float tensors other than float64 on this device, weights cached for the region.
  const auto cast = [&](const at::Tensor& t) {
    return at::autocast::cached_cast(at::autocast::get_autocast_dtype(device_type), t, device_type);
  };
  return op.call(cast(x), cast(w1), b1, cast(w2), b2, residual, tanh_approx);
}

void register_autograd(torch::Library& m) {
  m.impl("attention_forward", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                 double scale) {
    auto outputs = AttentionFunction::apply(q, k, v, causal, scale);
    return std::make_tuple(outputs[0], outputs[1]);
  });
  m.impl("bias_gelu", [](const at::Tensor& pre, const std::optional<at::Tensor>& bias, bool tanh_approx) {
    return BiasGeluFunction::apply(pre, bias, tanh_approx);
  });
  m.impl("bias_residual", [](const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual) {
    return BiasResidualFunction::apply(y, bias, residual);
  });
  m.impl("ffn_forward", [](const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                           const at::Tensor& w2, const std::optional<at::Tensor>& b2, const at::Tensor& residual,
                           bool tanh_approx) {
    auto outputs = FfnFunction::apply(x, w1, b1, w2, b2, residual, tanh_approx);
    return std::make_tuple(outputs[0], outputs[1], outputs[2]);
  });
  m.impl("layer_norm_forward", [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  double eps) {
    auto outputs = LayerNormFunction::apply(x, weight, bias, eps);
    return std::make_tuple(outputs[0], outputs[1], outputs[2]);
  });
  m.impl("cross_entropy_forward", [](const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
    auto outputs = CrossEntropyFunction::apply(logits, targets, ignore_index);
    return std::make_tuple(outputs[0], outputs[1]);
  });
}

// The same functions for every device key.
void register_kernels(torch::Library& m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
  m.impl("bias_gelu", &bias_gelu);
  m.impl("bias_gelu_backward", &bias_gelu_backward);
  m.impl("bias_residual", &bias_residual);
  m.impl("ffn_forward", &ffn_forward);
  m.impl("ffn_backward", &ffn_backward);
  m.impl("layer_norm_forward", &layer_norm_forward);
  m.impl("layer_norm_backward", &layer_norm_backward);
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
}

}  // namespace
}  // namespace engine

TORCH_LIBRARY_IMPL(engine, CPU, m) { engine::register_kernels(m); }

#ifdef ENGINE_WITH_CUDA
TORCH_LIBRARY_IMPL(engine, CUDA, m) { engine::register_kernels(m); }
#endif

TORCH_LIBRARY_IMPL(engine, Autograd, m) { engine::register_autograd(m); }
TORCH_LIBRARY_IMPL(engine, AutocastCPU, m) { m.impl("ffn_forward", &engine::ffn_forward_autocast); }
TORCH_LIBRARY_IMPL(engine, AutocastCUDA, m) { m.impl("ffn_forward", &engine::ffn_forward_autocast); }

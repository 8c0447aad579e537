// The operator schemas of the `engine` library, the one place they are defined, and the Python
// module `engine._C` whose import registers them.
//
// Implementations: csrc/glue.cpp registers the same functions for CPU and, in the CUDA build, CUDA
// tensors (checks, dtype promotion, allocation), which call the kernels of csrc/cpu/ or csrc/cuda/.
// register_fake lives in engine/ops/extension.py; the autograd formulas are in C++ (csrc/glue.cpp, the
// Autograd key) to save Python per call. Float
// tensors are float32, float16 or bfloat16 with fp32 accumulation; lse, mean and rstd are always float32.
#include <Python.h>
#include <torch/library.h>

#include <exception>

#include "cpu/simd.h"

TORCH_LIBRARY(engine, m) {
  // q, k, v (B, H, T, D), any strides -> out (B, H, T, D) contiguous, lse (B, H, T) float32 (log-sum-exp of
  // the scaled scores).
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
      "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // act(pre + bias), pre (N, F); act is exact GELU, or the tanh approximation when tanh_approx.
  m.def("bias_gelu(Tensor pre, Tensor? bias, bool tanh_approx) -> Tensor");
  // d act(pre + bias) / d pre, times grad.
  m.def("bias_gelu_backward(Tensor grad, Tensor pre, Tensor? bias, bool tanh_approx) -> Tensor");
  // residual + y + bias, (N, C).
  m.def("bias_residual(Tensor y, Tensor? bias, Tensor residual) -> Tensor");
  // The whole FFN with its residual: out = residual + act(x @ w1^T + b1) @ w2^T + b2. x, residual (..., C);
  // w1 (F, C), w2 (C, F) in nn.Linear layout and x's dtype; b1 (F,), b2 (C,). pre = x @ w1^T and
  // hidden = act(pre + b1), (N, F), are what the backward needs.
  m.def(
      "ffn_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor residual, bool tanh_approx) "
      "-> (Tensor out, Tensor pre, Tensor hidden)");
  // Gradients of x, w1, w2 (in their dtype) and the bias gradients b1 (F,), b2 (C,) in float32 (computed
  // whether or not the biases exist). The residual's gradient is grad_out itself.
  m.def(
      "ffn_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor pre, Tensor hidden, "
      "bool tanh_approx) -> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");
  // x (N, C) -> y (N, C), mean (N,) and rstd (N,) float32.
  m.def("layer_norm_forward(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // logits (N, V), targets (N,) int64 -> loss (0-dim float32, mean over non-ignored rows), lse (N,) float32.
  m.def("cross_entropy_forward(Tensor logits, Tensor targets, int ignore_index) -> (Tensor loss, Tensor lse)");
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse, int ignore_index) "
      "-> Tensor grad_logits");
}

namespace {

PyObject* cpu_isa(PyObject* /*module*/, PyObject* /*unused*/) {
  try {
    return PyUnicode_FromString(engine::cpu::isa_name(engine::cpu::cpu_isa()));
  } catch (const std::exception& error) {  // a bad ENGINE_CPU_ISA
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set the CPU kernels run with: 'avx512', 'avx2' or 'base' (ENGINE_CPU_ISA lowers it)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_C", "The compiled engine ops; importing this module registers torch.ops.engine.*",
    -1, methods, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_definition); }

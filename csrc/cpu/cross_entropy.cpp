// Cross-entropy of logits against integer targets on the CPU, forward and backward.
//
// Forward, per row of V logits x with target t:
//   lse = max(x) + log(sum_j exp(x_j - max(x)))      (saved for the backward)
//   loss_row = lse - x_t, or 0 where t == ignore_index
//   loss = sum of loss_row / (number of rows not ignored)   (0 / 0 = NaN when all are ignored,
//                                                            as in PyTorch)
// Backward: d loss / d x_j = grad_loss / count * (softmax(x)_j - [j == t]), with
// softmax(x)_j = exp(x_j - lse); 0 for ignored rows.
//
// Inputs: logits (N, V) contiguous, float32, float16 or bfloat16 (computed in fp32); targets (N,)
// int64 in [0, V) or equal to ignore_index (checked, naming the first bad row). Row losses are
// summed in double, in row order. Parallel over rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"

namespace engine::cpu {
namespace {

struct CrossEntropyRows {
  const float* logits;    // (rows, vocab)
  const int64_t* targets;  // (rows,)
  float* lse;              // (rows,): output of the forward, input of the backward
  float* row_loss;         // (rows,): forward only
  float* grad_logits;      // (rows, vocab): backward only
  int64_t vocab, row_begin, row_end, ignore_index;
  float grad_scale;  // backward: grad_loss / count
};

template <class Tile>
ENGINE_ALWAYS_INLINE void cross_entropy_forward_rows(const CrossEntropyRows& p) {
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const float* x = p.logits + row * p.vocab;
    float row_max = -std::numeric_limits<float>::infinity();
    ENGINE_SIMD_REDUCE(max, row_max)
    for (int64_t j = 0; j < p.vocab; ++j) row_max = x[j] > row_max ? x[j] : row_max;
    const float sum = sum_terms(p.vocab, [&](int64_t j) ENGINE_INLINE_LAMBDA { return exp_approx(x[j] - row_max); });
    const float lse = row_max + std::log(sum);
    p.lse[row] = lse;
    const int64_t target = p.targets[row];
    p.row_loss[row] = target == p.ignore_index ? 0.0f : lse - x[target];
  }
}

template <class Tile>
ENGINE_ALWAYS_INLINE void cross_entropy_backward_rows(const CrossEntropyRows& p) {
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const float* x = p.logits + row * p.vocab;
    float* grad = p.grad_logits + row * p.vocab;
    const int64_t target = p.targets[row];
    if (target == p.ignore_index) {
      std::fill(grad, grad + p.vocab, 0.0f);
      continue;
    }
    const float lse = p.lse[row];
    ENGINE_SIMD
    for (int64_t j = 0; j < p.vocab; ++j) grad[j] = p.grad_scale * exp_approx(x[j] - lse);
    grad[target] -= p.grad_scale;
  }
}

ENGINE_ISA_VARIANTS(run_cross_entropy_forward, cross_entropy_forward_rows, CrossEntropyRows)
ENGINE_ISA_VARIANTS(run_cross_entropy_backward, cross_entropy_backward_rows, CrossEntropyRows)

at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

void check_logits_and_targets(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, V), got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": logits must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous");
  TORCH_CHECK(targets.device().is_cpu(), op, ": targets must be a CPU tensor, got ", targets.device());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must have shape (",
              logits.size(0), ",), got ", targets.sizes());
}

// Rows whose target is not ignore_index; every other target must index a logit.
int64_t count_and_check_targets(const at::Tensor& targets, int64_t vocab, int64_t ignore_index, const char* op) {
  const int64_t* data = targets.data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t row = 0; row < targets.size(0); ++row) {
    if (data[row] == ignore_index) {
      continue;
    }
    TORCH_CHECK(data[row] >= 0 && data[row] < vocab, op, ": targets[", row, "] = ", data[row],
                " is out of range for ", vocab, " classes (and is not ignore_index = ", ignore_index, ")");
    ++count;
  }
  return count;
}

int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1)); }

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                         int64_t ignore_index) {
  constexpr const char* op = "engine::cross_entropy_forward";
  check_logits_and_targets(logits, targets, op);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 || rows == 0, op, ": logits must have at least one class, got shape ", logits.sizes());
  const at::Tensor targets64 = targets.contiguous();
  const int64_t count = count_and_check_targets(targets64, vocab, ignore_index, op);
  const at::Tensor logits32 = as_float(logits);
  const auto options = logits.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({rows}, options);
  std::vector<float> row_loss(rows);
  const CrossEntropyRows params{logits32.data_ptr<float>(), targets64.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                row_loss.data(), nullptr, vocab, 0, 0, ignore_index, 0.0f};
  at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    CrossEntropyRows chunk = params;
    chunk.row_begin = begin;
    chunk.row_end = end;
    run_cross_entropy_forward(chunk);
  });
  double total = 0.0;
  for (float value : row_loss) total += value;
  at::Tensor loss = at::empty({}, options);
  loss.fill_(count > 0 ? total / static_cast<double>(count) : std::numeric_limits<double>::quiet_NaN());
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& lse, int64_t ignore_index) {
  constexpr const char* op = "engine::cross_entropy_backward";
  check_logits_and_targets(logits, targets, op);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(grad_loss.device().is_cpu() && grad_loss.numel() == 1, op,
              ": grad_loss must be a one-element CPU tensor, got shape ", grad_loss.sizes(), " on ",
              grad_loss.device());
  TORCH_CHECK(lse.device().is_cpu(), op, ": lse must be a CPU tensor, got ", lse.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == rows, op, ": lse must have shape (", rows, ",), got ", lse.sizes());
  const at::Tensor targets64 = targets.contiguous();
  const int64_t count = count_and_check_targets(targets64, vocab, ignore_index, op);
  const at::Tensor logits32 = as_float(logits), lse32 = lse.contiguous();
  at::Tensor grad_logits = at::empty({rows, vocab}, logits.options().dtype(at::kFloat));
  const float grad_scale = static_cast<float>(grad_loss.item<double>() / static_cast<double>(count));
  const CrossEntropyRows params{logits32.data_ptr<float>(), targets64.data_ptr<int64_t>(), lse32.data_ptr<float>(),
                                nullptr, grad_logits.data_ptr<float>(), vocab, 0, 0, ignore_index, grad_scale};
  at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    CrossEntropyRows chunk = params;
    chunk.row_begin = begin;
    chunk.row_end = end;
    run_cross_entropy_backward(chunk);
  });
  return grad_logits.to(logits.scalar_type());
}

}  // namespace
}  // namespace engine::cpu

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("cross_entropy_forward", &engine::cpu::cross_entropy_forward);
  m.impl("cross_entropy_backward", &engine::cpu::cross_entropy_backward);
}

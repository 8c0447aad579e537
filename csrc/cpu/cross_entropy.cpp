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
// Inputs (checked and made contiguous by csrc/glue.cpp): logits (N, V), float32, float16 or bfloat16
// (read in that dtype, computed in fp32; the gradient is written in it); targets (N,) int64 in [0, V) or equal to ignore_index (checked here, naming the
// first bad row). Row losses are summed in double, in row order. Parallel over rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace engine::cpu {
namespace {

template <class T>
struct CrossEntropyRows {
  const T* logits;         // (rows, vocab)
  const int64_t* targets;  // (rows,)
  float* lse;              // (rows,): output of the forward, input of the backward
  float* row_loss;         // (rows,): forward only
  T* grad_logits;          // (rows, vocab): backward only
  int64_t vocab, row_begin, row_end, ignore_index;
  float grad_scale;  // backward: grad_loss / count
};

template <class Tile, class T>
ENGINE_ALWAYS_INLINE void cross_entropy_forward_rows(const CrossEntropyRows<T>& p) {
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const T* x = p.logits + row * p.vocab;
    float row_max = -std::numeric_limits<float>::infinity();
    ENGINE_SIMD_REDUCE(max, row_max)
    for (int64_t j = 0; j < p.vocab; ++j) row_max = to_float(x[j]) > row_max ? to_float(x[j]) : row_max;
    const float sum = sum_terms(p.vocab, [&](int64_t j) ENGINE_INLINE_LAMBDA {
      return exp_approx(to_float(x[j]) - row_max);
    });
    const float lse = row_max + std::log(sum);
    p.lse[row] = lse;
    const int64_t target = p.targets[row];
    p.row_loss[row] = target == p.ignore_index ? 0.0f : lse - to_float(x[target]);
  }
}

template <class Tile, class T>
ENGINE_ALWAYS_INLINE void cross_entropy_backward_rows(const CrossEntropyRows<T>& p) {
  for (int64_t row = p.row_begin; row < p.row_end; ++row) {
    const T* x = p.logits + row * p.vocab;
    T* grad = p.grad_logits + row * p.vocab;
    const int64_t target = p.targets[row];
    if (target == p.ignore_index) {
      std::fill(grad, grad + p.vocab, from_float<T>(0.0f));
      continue;
    }
    const float lse = p.lse[row];
    ENGINE_SIMD
    for (int64_t j = 0; j < p.vocab; ++j) {
      const float g = p.grad_scale * exp_approx(to_float(x[j]) - lse);
      grad[j] = from_float<T>(j == target ? g - p.grad_scale : g);  // rounded once, the target's term included
    }
  }
}

ENGINE_ISA_VARIANTS_PER_ELEMENT(run_cross_entropy_forward, cross_entropy_forward_rows, CrossEntropyRows)
ENGINE_ISA_VARIANTS_PER_ELEMENT(run_cross_entropy_backward, cross_entropy_backward_rows, CrossEntropyRows)

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

}  // namespace

void cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& loss,
                           const at::Tensor& lse, int64_t ignore_index) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int64_t count = count_and_check_targets(targets, vocab, ignore_index, "engine::cross_entropy_forward");
  std::vector<float> row_loss(rows);
  with_element_type(logits.scalar_type(), [&](auto element) {
    using T = decltype(element);
    const CrossEntropyRows<T> params{logits.data_ptr<T>(), targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                     row_loss.data(), nullptr, vocab, 0, 0, ignore_index, 0.0f};
    at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
      CrossEntropyRows<T> chunk = params;
      chunk.row_begin = begin;
      chunk.row_end = end;
      run_cross_entropy_forward(chunk);
    });
  });
  double total = 0.0;
  for (float value : row_loss) total += value;
  loss.fill_(count > 0 ? total / static_cast<double>(count) : std::numeric_limits<double>::quiet_NaN());
}

void cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                            const at::Tensor& lse, const at::Tensor& grad_logits, int64_t ignore_index) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int64_t count = count_and_check_targets(targets, vocab, ignore_index, "engine::cross_entropy_backward");
  const float grad_scale = static_cast<float>(grad_loss.item<double>() / static_cast<double>(count));
  with_element_type(logits.scalar_type(), [&](auto element) {
    using T = decltype(element);
    const CrossEntropyRows<T> params{logits.data_ptr<T>(), targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                     nullptr, grad_logits.data_ptr<T>(), vocab, 0, 0, ignore_index, grad_scale};
    at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
      CrossEntropyRows<T> chunk = params;
      chunk.row_begin = begin;
      chunk.row_end = end;
      run_cross_entropy_backward(chunk);
    });
  });
}

}  // namespace engine::cpu

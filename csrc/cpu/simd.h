// Shared by the CPU kernels: how their loops are vectorized, which instruction set runs them,
// and the vectorizable math (exp2, erf, tanh) their loops call.
//
// Vectorization: kernels are plain C++ loops. Every hot inner loop is marked ENGINE_SIMD
// (`#pragma omp simd`, honoured with -fopenmp) so the compiler vectorizes it even where it
// would otherwise give up (reductions, loops it cannot prove independent); without the pragma
// GCC 12 turns the register-blocked matmul of attention.cpp into scalar code for AVX2 and SSE2.
// `python -m engine.ops.extension --build --vectorize-report` shows GCC's report of which loops
// vectorized and with what vector width (64 bytes: AVX-512, 32: AVX2, 16: SSE2).
//
// Instruction sets: one binary must run on any x86-64 CPU, so the build uses no -march flag.
// Instead each kernel body is a template instantiated three times by ENGINE_ISA_VARIANTS,
// inside functions compiled for AVX-512 (512-bit vectors), AVX2+FMA and the x86-64 baseline
// (SSE2), and the variant this CPU supports is chosen at run time (cpu_isa()). The kernel
// bodies are always-inline so they are compiled with the instruction set of the function they
// are inlined into. Other architectures (aarch64: NEON is baseline) build the baseline only.
// ENGINE_CPU_ISA=base|avx2|avx512 forces a lower variant (tests use it to cover all three).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if !defined(__GNUC__)
#error "the engine's CPU kernels need GCC or Clang (function target attributes, #pragma omp simd)"
#endif

#define ENGINE_ALWAYS_INLINE inline __attribute__((always_inline))
#define ENGINE_PRAGMA(text) _Pragma(#text)
#define ENGINE_SIMD ENGINE_PRAGMA(omp simd)
#define ENGINE_SIMD_REDUCE(op, ...) ENGINE_PRAGMA(omp simd reduction(op : __VA_ARGS__))

#if defined(__x86_64__)
#define ENGINE_X86_VARIANTS 1
#if defined(__clang__)
#define ENGINE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), min_vector_width(512)))
#else
// GCC's tuning for AVX-512 CPUs otherwise prefers 256-bit vectors.
#define ENGINE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#endif
#define ENGINE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace engine::cpu {

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The variant the kernels run: the best this CPU supports, or ENGINE_CPU_ISA if set (lower only).
Isa cpu_isa();
const char* isa_name(Isa isa);

// Register tiles of the small matmuls (gemm_block below): kRows rows of C by kCols columns,
// kept in registers while the reduction runs. kRows * kCols / (floats per vector) accumulators:
// 16 of 32 zmm registers for AVX-512, 8 of 16 ymm for AVX2, 8 of 16 xmm for SSE2.
struct TileAvx512 { static constexpr int kRows = 8, kCols = 32; };
struct TileAvx2 { static constexpr int kRows = 4, kCols = 16; };
struct TileBase { static constexpr int kRows = 4, kCols = 8; };

// Defines `name(const Params&)`, which runs `impl<Tile>(params)` compiled for the instruction set
// cpu_isa() picks. `impl` must be an ENGINE_ALWAYS_INLINE template, as must everything it calls
// in its hot loops (otherwise that code is compiled for the baseline only).
#if defined(ENGINE_X86_VARIANTS)
#define ENGINE_ISA_VARIANTS(name, impl, Params)                                                   \
  static void name##_base(const Params& params) { impl<::engine::cpu::TileBase>(params); }        \
  ENGINE_TARGET_AVX2 static void name##_avx2(const Params& params) {                              \
    impl<::engine::cpu::TileAvx2>(params);                                                        \
  }                                                                                               \
  ENGINE_TARGET_AVX512 static void name##_avx512(const Params& params) {                          \
    impl<::engine::cpu::TileAvx512>(params);                                                      \
  }                                                                                               \
  static void name(const Params& params) {                                                        \
    switch (::engine::cpu::cpu_isa()) {                                                           \
      case ::engine::cpu::Isa::kAvx512: return name##_avx512(params);                             \
      case ::engine::cpu::Isa::kAvx2: return name##_avx2(params);                                 \
      case ::engine::cpu::Isa::kBase: return name##_base(params);                                 \
    }                                                                                             \
  }
#else
#define ENGINE_ISA_VARIANTS(name, impl, Params) \
  static void name(const Params& params) { impl<::engine::cpu::TileBase>(params); }
#endif

// ENGINE_ISA_VARIANTS for a kernel whose Params is a template over the tensors' element type
// (below): overloads of `name` for Params<float>, Params<c10::BFloat16> and Params<c10::Half>.
#define ENGINE_ISA_VARIANTS_PER_ELEMENT(name, impl, Params)  \
  ENGINE_ISA_VARIANTS(name, impl, Params<float>)             \
  ENGINE_ISA_VARIANTS(name, impl, Params<::c10::BFloat16>)   \
  ENGINE_ISA_VARIANTS(name, impl, Params<::c10::Half>)

// Element types. The kernels read and write float32, bfloat16 and float16 tensors in place and
// compute in fp32: to_float widens an element as it is loaded, from_float<T> rounds a result as
// it is stored (to nearest, ties to even, as PyTorch's casts). For bf16 both are a few integer
// operations that vectorize with the loop, so a bf16 tensor is never copied to fp32 and back:
// under autocast that copy used to cost more than some of the kernels themselves.
ENGINE_ALWAYS_INLINE float to_float(float x) { return x; }

ENGINE_ALWAYS_INLINE float to_float(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;  // bf16 is the high half of an fp32
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

ENGINE_ALWAYS_INLINE float to_float(c10::Half x) { return static_cast<float>(x); }

template <class T>
ENGINE_ALWAYS_INLINE T from_float(float x);

template <>
ENGINE_ALWAYS_INLINE float from_float<float>(float x) {
  return x;
}

template <>
ENGINE_ALWAYS_INLINE c10::BFloat16 from_float<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  // Round the low 16 bits to nearest, ties to even; NaN stays a (quiet) NaN.
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

template <>
ENGINE_ALWAYS_INLINE c10::Half from_float<c10::Half>(float x) {
  return c10::Half(x);
}

constexpr float kLog2e = 1.4426950408889634f;  // log2(e)
constexpr float kLn2 = 0.6931471805599453f;     // ln(2)

// 2^x for float x, vectorizable (no library call, no branch): 2^x = 2^n * 2^f with n = round(x)
// and f = x - n in [-0.5, 0.5]; 2^f by a degree-6 polynomial fitted (weighted least squares, our
// own fit) to a relative error of 2e-9, about 1 ulp after fp32 rounding; 2^n built in the
// exponent bits. x <= -127 (including -inf) gives exactly 0, x >= 127 gives 2^127; NaN stays NaN.
ENGINE_ALWAYS_INLINE float exp2_approx(float x) {
  x = x < -127.0f ? -127.0f : x;
  x = x > 127.0f ? 127.0f : x;
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (valid for |x| < 2^22).
  const float n = (x + 12582912.0f) - 12582912.0f;
  const float f = x - n;
  float p = 1.535332630e-4f;
  p = p * f + 1.339887460e-3f;
  p = p * f + 9.618437502e-3f;
  p = p * f + 5.550332471e-2f;
  p = p * f + 2.402264791e-1f;
  p = p * f + 6.931472029e-1f;
  p = p * f + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;  // n = -127 gives 0.0f
  float power_of_two;
  std::memcpy(&power_of_two, &exponent_bits, sizeof(power_of_two));
  return p * power_of_two;
}

ENGINE_ALWAYS_INLINE float exp_approx(float x) { return exp2_approx(x * kLog2e); }

// erf(z) by Abramowitz & Stegun, Handbook of Mathematical Functions, formula 7.1.26:
// 1 - (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) exp(-z^2), t = 1 / (1 + p |z|),
// absolute error below 1.5e-7 (about one fp32 rounding step of values near 1).
// Takes gaussian = exp(-z^2), which GELU's derivative needs too, so it is computed once.
ENGINE_ALWAYS_INLINE float erf_from_gaussian(float z, float gaussian) {
  const float t = 1.0f / (1.0f + 0.3275911f * std::fabs(z));
  float poly = 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  return std::copysign(1.0f - poly * t * gaussian, z);
}

ENGINE_ALWAYS_INLINE float erf_approx(float z) { return erf_from_gaussian(z, exp_approx(-z * z)); }

// tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits +-1 (exp overflows to 2^127 or underflows to 0);
// absolute error about 2e-7 near 0, where the subtraction cancels.
ENGINE_ALWAYS_INLINE float tanh_approx(float u) { return 1.0f - 2.0f / (exp2_approx(2.0f * kLog2e * u) + 1.0f); }

// Sum of term(c) for c in [0, n). The terms go into kPartialSums independent partial sums, which
// vectorize into several vector accumulators: a single accumulator would make every vector add
// wait for the previous one (4 cycles), and GCC's horizontal epilogue for `omp simd reduction`
// adds the lanes one by one through memory. The partials are added pairwise at the end.
// `term` must be an ENGINE_INLINE_LAMBDA so that it is inlined, and vectorized, in the loop.
constexpr int kPartialSums = 64;
#define ENGINE_INLINE_LAMBDA __attribute__((always_inline))

template <class Term>
ENGINE_ALWAYS_INLINE float sum_terms(int64_t n, Term term) {
  float partial[kPartialSums] = {};
  int64_t c = 0;
  for (; c + kPartialSums <= n; c += kPartialSums) {
    ENGINE_SIMD
    for (int k = 0; k < kPartialSums; ++k) partial[k] += term(c + k);
  }
  for (int k = 0; c < n; ++c, ++k) partial[k] += term(c);
  for (int width = kPartialSums / 2; width > 0; width /= 2) {
    ENGINE_SIMD
    for (int k = 0; k < width; ++k) partial[k] += partial[k + width];
  }
  return partial[0];
}

constexpr int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace engine::cpu

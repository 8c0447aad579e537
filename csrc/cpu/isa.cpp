// Which instruction-set variant of the CPU kernels runs (see simd.h): detected once per process.
#include "simd.h"

#include <cstdlib>
#include <string>

#include <c10/util/Exception.h>

namespace engine::cpu {
namespace {

Isa detect_isa() {
#if defined(ENGINE_X86_VARIANTS)
  // libgcc's detection also checks that the OS saves the AVX/AVX-512 registers (XGETBV).
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBase;
}

Isa choose_isa() {
  const Isa detected = detect_isa();
  const char* requested = std::getenv("ENGINE_CPU_ISA");
  if (requested == nullptr || *requested == '\0') {
    return detected;
  }
  const std::string name(requested);
  for (Isa isa : {Isa::kBase, Isa::kAvx2, Isa::kAvx512}) {
    if (name == isa_name(isa)) {
      TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(detected), "ENGINE_CPU_ISA=", name,
                  " is not supported by this CPU (or build); it supports up to ", isa_name(detected));
      return isa;
    }
  }
  TORCH_CHECK(false, "ENGINE_CPU_ISA must be base, avx2 or avx512, got '", name, "'");
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBase: return "base";
  }
  return "unknown";
}

Isa cpu_isa() {
  static const Isa isa = choose_isa();
  return isa;
}

}  // namespace engine::cpu

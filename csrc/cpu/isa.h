// The CPU kernels' instruction-set paths: each vectorized loop is compiled for the default target, AVX2
// and AVX-512 (function attributes, no global -m flags), and one is picked at run time. Every path does
// the same IEEE operations in the same order, so results do not depend on the machine.
#pragma once

#include <ATen/Version.h>

#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#define LOCALVOL_X86_DISPATCH 1
#include <immintrin.h>
#else
#define LOCALVOL_X86_DISPATCH 0
#endif

#if defined(__GNUC__)
#define LOCALVOL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LOCALVOL_ALWAYS_INLINE inline
#endif

// No floating-point contraction in the ISA-specific functions: with it, GCC fuses a * b + c into an FMA
// wherever the target has one (target("avx512f") implies FMA), and the float64 sums of direction_stats
// (and the float32 sums of kl_against_anchor) would then depend on the machine. Without it, every path does the same IEEE operations.
#if defined(__clang__)
#pragma clang fp contract(off)
#define LOCALVOL_NO_CONTRACT
#elif defined(__GNUC__)
#define LOCALVOL_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define LOCALVOL_NO_CONTRACT
#endif

#if LOCALVOL_X86_DISPATCH
// torch's AVX2 capability implies AVX2 + FMA, its AVX512 capability AVX512F/BW/DQ/VL + FMA.
#define LOCALVOL_TARGET_AVX2 __attribute__((target("avx2,fma"))) LOCALVOL_NO_CONTRACT
#define LOCALVOL_TARGET_AVX512 \
  __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl"))) LOCALVOL_NO_CONTRACT
#endif

namespace localvol {

// The ISA path: the widest that torch's own CPU kernels use (ATEN_CPU_CAPABILITY=default|avx2|avx512
// overrides it, as for torch), checked once more against the CPU. All paths give the same results.
enum class Isa { kDefault, kAvx2, kAvx512 };

inline Isa cpu_isa() {
  static const Isa isa = [] {
#if LOCALVOL_X86_DISPATCH
    const std::string capability = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool fma = __builtin_cpu_supports("fma");
    if (capability == "AVX512" && fma && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      return Isa::kAvx512;
    }
    if ((capability == "AVX512" || capability == "AVX2") && fma && __builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
    return Isa::kDefault;
  }();
  return isa;
}

template <typename Fn>
Fn pick_isa(Fn on_default, Fn on_avx2, Fn on_avx512) {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return on_avx512;
    case Isa::kAvx2:
      return on_avx2;
    default:
      return on_default;
  }
}

// LOCALVOL_ISA_PATHS(DEFINE, name, w1, w2, w3) expands DEFINE(attributes, name_<path>, width) for the
// default, AVX2 and AVX-512 paths (only the default one off x86), the widths being the op's vector lanes
// on each; LOCALVOL_PICK(name) is then the path for this CPU.
#if LOCALVOL_X86_DISPATCH
#define LOCALVOL_ISA_PATHS(DEFINE, name, width_default, width_avx2, width_avx512) \
  DEFINE(LOCALVOL_NO_CONTRACT, name##_default, width_default)                     \
  DEFINE(LOCALVOL_TARGET_AVX2, name##_avx2, width_avx2)                           \
  DEFINE(LOCALVOL_TARGET_AVX512, name##_avx512, width_avx512)
#define LOCALVOL_PICK(name) pick_isa(&name##_default, &name##_avx2, &name##_avx512)
#else
#define LOCALVOL_ISA_PATHS(DEFINE, name, width_default, width_avx2, width_avx512) \
  DEFINE(LOCALVOL_NO_CONTRACT, name##_default, width_default)
#define LOCALVOL_PICK(name) (&name##_default)
#endif

}  // namespace localvol

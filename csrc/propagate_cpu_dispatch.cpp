// Argument checks and run-time choice of the instruction-set variant of the CPU kernel (the variants
// are propagate_cpu.cpp compiled with different -m flags; which ones exist is decided in CMakeLists.txt
// and passed here as TF_HAVE_AVX2 / TF_HAVE_AVX512 / TF_HAVE_AVX512BF16).

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "propagate_cpu.h"

namespace tokenflow {
namespace {

using Kernel = void (*)(const PropagateArgs&);

struct Variant {
  Kernel fn;
  const char* name;
};

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("tokenflow._C.propagate_cpu: " + msg); }

// TOKENFLOW_CPU_ISA caps the variant (generic < avx2 < avx512 < avx512bf16), so a machine with more can run
// the code paths an AVX2-only CI machine takes. It never raises the choice above what the CPU supports.
int isa_cap() {
  const char* env = std::getenv("TOKENFLOW_CPU_ISA");
  if (!env || !*env) return 3;
  const std::string v(env);
  if (v == "generic") return 0;
  if (v == "avx2") return 1;
  if (v == "avx512") return 2;
  if (v == "avx512bf16") return 3;
  bad("TOKENFLOW_CPU_ISA='" + v + "' is not one of generic, avx2, avx512, avx512bf16; unset it for the widest");
}

Variant pick() {
  const int cap = isa_cap();
  (void)cap;
#if defined(__x86_64__) || defined(__i386__)
#if defined(TF_HAVE_AVX512BF16)
  // The avx512 variant plus the vdpbf16ps search for bf16 features (it differs only there).
  if (cap >= 3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx512bf16"))
    return {detail::propagate_cpu_avx512bf16, "avx512bf16"};
#endif
#if defined(TF_HAVE_AVX512)
  // avx512bw/vl/dq are what the avx512 variant is compiled with (CMakeLists.txt), f16c for its fp16 rows.
  if (cap >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return {detail::propagate_cpu_avx512, "avx512"};
#endif
#if defined(TF_HAVE_AVX2)
  if (cap >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return {detail::propagate_cpu_avx2, "avx2"};
#endif
#endif
  return {detail::propagate_cpu_generic, "generic"};
}

const Variant& variant() {
  static const Variant v = pick();  // thread-safe static init; the CPU does not change under us
  return v;
}

bool known_dtype(int d) { return d == kFloat32 || d == kFloat16 || d == kBFloat16; }

}  // namespace

const char* cpu_isa() { return variant().name; }

const char* cpu_isas_built() {
  return "generic"
#if defined(TF_HAVE_AVX2)
         ",avx2"
#endif
#if defined(TF_HAVE_AVX512)
         ",avx512"
#endif
#if defined(TF_HAVE_AVX512BF16)
         ",avx512bf16"
#endif
      ;
}

void propagate_cpu(const PropagateArgs& a) {
  // The Python glue validates shapes against the tensors; these checks guard the raw-pointer boundary
  // itself, so a wrong call from anywhere fails here instead of reading out of bounds.
  if (a.F < 0 || a.J < 0 || a.K < 0 || a.R < 0 || a.S < 1 || a.C < 1)
    bad("need F, J, K, R >= 0 and S, C >= 1; got F=" + std::to_string(a.F) + " J=" + std::to_string(a.J) +
        " K=" + std::to_string(a.K) + " S=" + std::to_string(a.S) + " C=" + std::to_string(a.C));
  if (a.S >= (int64_t(1) << 31)) bad("S must be below 2^31 (candidate indices are int32 inside the kernel)");
  if (!known_dtype(a.feat_dtype)) bad("unknown feature dtype code " + std::to_string(a.feat_dtype));
  // Nothing to write (J == 0 with an output still writes out = residual or 0).
  if (a.F == 0 || (!a.out && a.J == 0)) return;
  if (a.F * a.J > 0 && (!a.x || !a.key_feats || !a.which)) bad("x, key_feats and which must be non-null");
  for (int64_t i = 0; i < a.F * a.J; ++i)
    if (a.which[i] < -1 || a.which[i] >= a.K)
      bad("which[" + std::to_string(i) + "] = " + std::to_string(a.which[i]) + " outside [-1, " +
          std::to_string(a.K - 1) + "]");
  if (a.out) {
    if (a.R > 0 && a.F * a.J > 0 && (!a.key_out || !a.weights))
      bad("key_out and weights must be non-null when out is given");
    if (!known_dtype(a.out_dtype)) bad("unknown output dtype code " + std::to_string(a.out_dtype));
    if (a.residual && !known_dtype(a.res_dtype)) bad("unknown residual dtype code " + std::to_string(a.res_dtype));
  } else if (!a.idx) {
    bad("nothing to compute: both out and idx are null");
  }
  variant().fn(a);
}

}  // namespace tokenflow

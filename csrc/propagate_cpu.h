// TokenFlow propagation on the CPU (propagate_cpu.cpp, one copy per instruction set, and
// propagate_cpu_dispatch.cpp). Arguments and contract: propagate.h.
#pragma once

#include "propagate.h"

namespace tokenflow {

// Checks sizes, pointers and codes (throws std::invalid_argument naming the problem), then runs the
// kernel for the widest instruction set this CPU supports. `out == nullptr` computes idx only.
void propagate_cpu(const PropagateArgs& args);

// Name of the instruction-set variant propagate_cpu runs on this CPU ("avx512bf16", "avx512", "avx2" or
// "generic"),
// and the variants compiled into this build.
const char* cpu_isa();
const char* cpu_isas_built();

namespace detail {
// One per compiled variant (propagate_cpu.cpp compiled once per ISA, see CMakeLists.txt).
void propagate_cpu_generic(const PropagateArgs& args);
void propagate_cpu_avx2(const PropagateArgs& args);
void propagate_cpu_avx512(const PropagateArgs& args);
void propagate_cpu_avx512bf16(const PropagateArgs& args);  // avx512 + vdpbf16ps searches (bf16; pre-search)
}  // namespace detail

}  // namespace tokenflow

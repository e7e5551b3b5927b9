// TokenFlow propagation on CUDA GPUs (propagate_cuda.cu). Arguments and contract: propagate.h.
// Plain launchers over device pointers: no PyTorch and no CUDA header is needed to call them, so the
// pybind11 module (bindings.cpp) compiles with the host compiler alone. The stream is a cudaStream_t
// passed as void* (PyTorch's torch.cuda.current_stream().cuda_stream); the launch is asynchronous on it.
#pragma once

#include <string>

#include "propagate.h"

namespace tokenflow {

// Feature dtypes (x, key_feats): kFloat16 or kBFloat16 (tensor-core MMA inputs).
// Output dtype (key_out, out): any DType; residual must have the output dtype (res_dtype == out_dtype).
// Requires C % 8 == 0 (16-byte vector loads of feature rows). `out == nullptr` computes idx only;
// `idx == nullptr` is allowed when out is given (indices then stay on chip).
// which and weights are device pointers too; x and key_feats must be 16-byte aligned. `workspace` is
// device memory for K * S floats (the candidates' inverse norms), owned by the caller so that PyTorch's
// caching allocator provides it. Throws std::invalid_argument for bad arguments and std::runtime_error
// when a launch fails (message from cudaGetErrorString).
void propagate_cuda(const PropagateArgs& args, float* workspace, void* stream);

// "" when a CUDA device can run these kernels, else why not (no driver, no device, too old a GPU...).
std::string cuda_runtime_status();

// Architectures compiled into this build, e.g. "80;90" (from CMake's CMAKE_CUDA_ARCHITECTURES).
const char* cuda_archs_built();

}  // namespace tokenflow

// Arguments of the TokenFlow propagation kernels (CPU and CUDA), as raw pointers and sizes: the native
// code includes no PyTorch header (the PyTorch glue is tokenflow/ops/backend_{cpu,cuda}.py). Shapes use
// the spec's symbols; every tensor is contiguous (row-major):
//   x [F, S, C], key_feats [K, S, C], key_out [R, K, S, C], which [F, J] int64 (-1 = none),
//   weights [F, J] float32, residual [R, F, S, C] (optional), out [R, F, S, C], idx [F, J, S] int64.
// idx[f, j, s] = argmax_t cos(x[f, s], key_feats[which[f, j], t]) (ties to the lowest t, 0 where which is -1)
// out[r, f, s] = residual[r, f, s] + sum_{j: which[f, j] >= 0} weights[f, j] * key_out[r, which[f, j], idx[f, j, s]]
// accumulated in float32; out has key_out's dtype (out_dtype).
#pragma once

#include <cstdint>

namespace tokenflow {

// Element type codes shared with the Python glue (backend_cpu.py / backend_cuda.py: _DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct PropagateArgs {
  const void* x = nullptr;          // [F, S, C], feat_dtype
  const void* key_feats = nullptr;  // [K, S, C], feat_dtype
  const void* key_out = nullptr;    // [R, K, S, C], out_dtype; unused by cosine_argmax
  const int64_t* which = nullptr;   // [F, J]
  const float* weights = nullptr;   // [F, J]; unused by cosine_argmax
  const void* residual = nullptr;   // [R, F, S, C], res_dtype, or null
  void* out = nullptr;              // [R, F, S, C], out_dtype, or null (cosine_argmax only)
  int64_t* idx = nullptr;           // [F, J, S], or null (the kernel then keeps its own)
  int64_t F = 0, J = 0, K = 0, R = 0, S = 0, C = 0;
  int feat_dtype = kFloat32, out_dtype = kFloat32, res_dtype = kFloat32;
  int num_threads = 1;  // CPU threads (<= 0: the OpenMP default); unused by the CUDA kernel
  // CPU only. float32/float16 features on CPUs with AVX512-BF16: search in bf16 first, then rescore in
  // float32 every candidate the bf16 error bound cannot rule out (same indices as the float32 search,
  // bit for bit; propagate_cpu.cpp). false: the float32 search alone.
  bool presearch = true;
  // CPU only, optional [3] counters of the pre-search, added to: rows searched, candidates rescored in
  // float32, rows searched in float32 instead (their window overflowed, or the thread gave up pre-searching
  // on near-duplicate data).
  int64_t* stats = nullptr;
};

}  // namespace tokenflow

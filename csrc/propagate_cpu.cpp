// TokenFlow propagation on the CPU: cosine nearest neighbour in the chosen keyframes (a GEMM whose
// epilogue is a running argmax) followed by the gather-blend of the keyframes' outputs. Contract in
// propagate.h. The [F*S, S] similarity matrix never exists: each micro-tile of MR x NR similarities
// lives in registers and is folded into a per-lane running (max, index) before the next tile.
//
// This file is compiled once per instruction set (CMakeLists.txt: TF_CPU_ISA = generic | avx2 | avx512 |
// avx512bf16, each with its own -m flags) and propagate_cpu_dispatch.cpp picks the widest one the CPU
// supports at run time, so a wheel built here runs on any x86-64 and still uses AVX-512 where it exists.
// The kernel is written with GCC/Clang vector extensions: one source, vector width W chosen by the ISA.
// The avx512bf16 variant is the avx512 one plus two vdpbf16ps searches: for bf16 features
// (propagate_bf16_dot below), and for float32 / float16 features a bf16 pre-search with exact float32
// rescoring (propagate_presearch below): the float32 search's indices, bit for bit, near the bf16 speed.
//
// Layout of the search (BLIS-style packing, so the inner loop only streams two contiguous panels):
//   Bp: every referenced keyframe, normalised (k / max(|k|, 1e-12), as the reference) and converted to
//       float32, cut into panels of NR candidates stored channel-major: panel[c][0..NR).
//   Ap: MC query rows of one frame, converted to float32, in micro-panels of MR rows: micro[c][0..MR).
//   micro-kernel: for c in C: MR broadcasts x NV vector loads -> MR*NV FMAs into register accumulators.
// The query is not normalised: its norm does not change an argmax over candidates.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "propagate_cpu.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define TF_BF16_DOT 1  // bf16 features take the vdpbf16ps search (propagate_bf16_dot below)
#else
#define TF_BF16_DOT 0
#endif

#ifndef TF_CPU_ISA
#error "compile with -DTF_CPU_ISA=generic|avx2|avx512|avx512bf16 (see CMakeLists.txt)"
#endif
#define TF_CAT2(a, b) a##b
#define TF_CAT(a, b) TF_CAT2(a, b)
#define TF_ENTRY TF_CAT(propagate_cpu_, TF_CPU_ISA)

namespace tokenflow {
namespace detail {
namespace {  // internal linkage: every ISA's copy of these helpers stays separate

// Vector width (floats) and register blocking per ISA. The micro-tile is MR rows x NR = NV*W candidates;
// MR*NV accumulators + NV candidate vectors + 1 broadcast must fit the register file without spills:
//   avx512: 32 zmm -> 8 x 32 (16 acc); Zen 4 / Ice Lake retire 1-2 zmm FMA per cycle with 4-cycle
//           latency, so 16 independent accumulators cover the latency (measured: bench/bench_propagate_cpu.py).
//   avx2:   16 ymm -> 6 x 16 (12 acc), the classic Haswell shape.
//   generic (SSE2, or any other target): 4 x 8.
#if defined(__AVX512F__)
constexpr int W = 16;
#ifndef TF_MR
#define TF_MR 8
#endif
#ifndef TF_NV
#define TF_NV 2
#endif
#elif defined(__AVX2__)
constexpr int W = 8;
#ifndef TF_MR
#define TF_MR 6
#endif
#ifndef TF_NV
#define TF_NV 2
#endif
#else
constexpr int W = 4;
#ifndef TF_MR
#define TF_MR 4
#endif
#ifndef TF_NV
#define TF_NV 2
#endif
#endif
constexpr int MR = TF_MR;
constexpr int NV = TF_NV;
constexpr int NR = NV * W;
// Query rows per work unit: Ap (MC x C floats, 240 KiB at C = 640) and one candidate panel (NR x C) stay
// in L2 while the unit sweeps all panels; 16 units per 1024-row frame keep 2-16 threads busy.
constexpr int MC = MR * 8;
constexpr size_t kAlign = 64;

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

// ---------------------------------------------------------------------------------------------------
// Element conversion. bf16 and fp16 rows are converted to float32 a row at a time (the loops vectorise).

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN (as c10::BFloat16)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// _Float16 (GCC >= 12, Clang >= 15 on x86-64/aarch64) converts with F16C where the ISA has it, else
// through libgcc; exact either way.
void load_row(const void* base, int dtype, int64_t offset, int64_t n, float* __restrict dst) {
  switch (dtype) {
    case kFloat32: {
      std::memcpy(dst, static_cast<const float*>(base) + offset, size_t(n) * sizeof(float));
      break;
    }
    case kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = bf16_to_f32(s[c]);
      break;
    }
    default: {  // kFloat16 (codes are checked before any kernel runs)
      const _Float16* s = static_cast<const _Float16*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = float(s[c]);
      break;
    }
  }
}

void store_row(void* base, int dtype, int64_t offset, int64_t n, const float* __restrict src) {
  switch (dtype) {
    case kFloat32: {
      std::memcpy(static_cast<float*>(base) + offset, src, size_t(n) * sizeof(float));
      break;
    }
    case kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) d[c] = f32_to_bf16(src[c]);
      break;
    }
    default: {
      _Float16* d = static_cast<_Float16*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) d[c] = _Float16(src[c]);
      break;
    }
  }
}

// acc[c] += w * row[c], row of any supported dtype (tmp is scratch for the converted row).
void axpy_row(float w, const void* base, int dtype, int64_t offset, int64_t n, float* __restrict acc,
              float* __restrict tmp) {
  const float* src;
  if (dtype == kFloat32) {
    src = static_cast<const float*>(base) + offset;
  } else {
    load_row(base, dtype, offset, n, tmp);
    src = tmp;
  }
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) acc[c] += w * src[c];
}

// ---------------------------------------------------------------------------------------------------
// Aligned scratch (std::vector does not promise 64-byte alignment; the vector loads below need W*4).

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], FreeDeleter> aligned_buffer(size_t count) {
  size_t bytes = (count * sizeof(T) + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, bytes ? bytes : kAlign);
  if (!p) throw std::bad_alloc();
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

// ---------------------------------------------------------------------------------------------------
// The micro-kernel: acc[i][v] = sum_c a[c][i] * b[c][v*W .. v*W+W), i < MR, v < NV.
// Fully unrolled over i and v so the accumulators stay in registers (checked in the assembly: no spills).

__attribute__((always_inline)) inline void micro_kernel(const float* __restrict a, const float* __restrict b,
                                                        int64_t C, vf (&acc)[MR][NV]) {
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = vf{};
  for (int64_t c = 0; c < C; ++c) {
    vf bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const vf*>(b + c * NR + v * W);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const vf av = vf{} + a[c * MR + i];  // broadcast (folds into the FMA's memory operand)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
}

// Fold a micro-tile into the per-lane running best. Lane l of row i holds the best over candidates
// t = p*NR + l seen so far; strict '>' keeps the earlier (lower) t on ties, as torch.argmax does.
template <int M>
__attribute__((always_inline)) inline void fold_tile(const vf (&acc)[M][NV], float* __restrict bestv,
                                                     int32_t* __restrict besti, int32_t base, int valid) {
  vi lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  const vf neg_inf = vf{} - std::numeric_limits<float>::infinity();
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      vf s = acc[i][v];
      const vi col = lane + v * W;
      if (valid < NR) s = (col < valid) ? s : neg_inf;  // padded candidates of the last panel
      vf* bv = reinterpret_cast<vf*>(bestv + i * NR + v * W);
      vi* bi = reinterpret_cast<vi*>(besti + i * NR + v * W);
      const vi better = s > *bv;
      *bv = better ? s : *bv;
      *bi = better ? col + base : *bi;
    }
  }
}

// Reduce one row's NR lanes: the largest value, and among equal values the lowest candidate index.
inline int64_t reduce_row(const float* bestv, const int32_t* besti) {
  float bv = bestv[0];
  int32_t bi = besti[0];
  for (int l = 1; l < NR; ++l) {
    if (bestv[l] > bv || (bestv[l] == bv && besti[l] < bi)) {
      bv = bestv[l];
      bi = besti[l];
    }
  }
  return bi;
}

// out[r, f, s] = residual[r, f, s] + sum_j w[f, j] * key_out[r, which[f, j], idx[f, j, s]] for the rows
// s in [r0, r0 + rows) of frame f and every branch r, accumulated in float32. Memory-bound: every output
// row is written exactly once.
void gather_blend(const PropagateArgs& a, const int64_t* idx, int64_t f, int64_t r0, int64_t rows,
                  float* __restrict acc, float* __restrict tmp) {
  const int64_t F = a.F, J = a.J, K = a.K, S = a.S, C = a.C;
  for (int64_t r = 0; r < a.R; ++r) {
    for (int64_t s = r0; s < r0 + rows; ++s) {
      const int64_t o = ((r * F + f) * S + s) * C;
      if (a.residual)
        load_row(a.residual, a.res_dtype, o, C, acc);
      else
        std::fill(acc, acc + C, 0.f);
      for (int64_t j = 0; j < J; ++j) {
        const int64_t kf = a.which[f * J + j];
        if (kf < 0) continue;
        const int64_t t = idx[(f * J + j) * S + s];
        axpy_row(a.weights[f * J + j], a.key_out, a.out_dtype, ((r * K + kf) * S + t) * C, C, acc, tmp);
      }
      store_row(a.out, a.out_dtype, o, C, acc);
    }
  }
}

// One work unit of every search path: rows [r0, r0 + rows) of frame f, blocks of `block_rows` rows
// (unit = f * n_blocks + block). pack(f, r0, rows) prepares the unit's query rows once, before the first
// keyframe it searches; search(kf, out_idx, rows) writes their indices in keyframe kf. The gather-blend of
// the unit's rows follows right away: the memory-bound gather of one thread then overlaps the
// compute-bound search of the others, and the indices are still in cache.
template <class Pack, class Search>
__attribute__((always_inline)) inline void run_unit(const PropagateArgs& a, int64_t unit, int64_t block_rows,
                                                    int64_t* idx, Pack& pack, Search& search, float* row_acc,
                                                    float* row_tmp) {
  const int64_t n_blocks = (a.S + block_rows - 1) / block_rows;
  const int64_t f = unit / n_blocks, r0 = (unit % n_blocks) * block_rows;
  const int64_t rows = std::min<int64_t>(block_rows, a.S - r0);
  bool packed = false;
  for (int64_t j = 0; j < a.J; ++j) {
    const int64_t kf = a.which[f * a.J + j];
    int64_t* out_idx = idx + (f * a.J + j) * a.S + r0;
    if (kf < 0) {
      std::fill(out_idx, out_idx + rows, int64_t(0));
      continue;
    }
    if (!packed) {
      pack(f, r0, rows);
      packed = true;
    }
    search(kf, out_idx, rows);
  }
  if (a.out) gather_blend(a, idx, f, r0, rows, row_acc, row_tmp);
}

int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// Every referenced keyframe's candidates, normalised as the reference does (k / max(|k|, 1e-12): a
// division, not a reciprocal), in float32, row-major: Kn[slot][S][C].
void normalise_candidates(const PropagateArgs& a, const std::vector<int64_t>& slot_kf, float* Kn, int nthreads) {
  const int64_t S = a.S, C = a.C, n = int64_t(slot_kf.size()) * S;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t qt = 0; qt < n; ++qt) {
    float* row = Kn + qt * C;
    load_row(a.key_feats, a.feat_dtype, (slot_kf[size_t(qt / S)] * S + qt % S) * C, C, row);
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += double(row[c]) * double(row[c]);
    const float nrm = std::max(float(std::sqrt(ss)), 1e-12f);
    for (int64_t c = 0; c < C; ++c) row[c] /= nrm;
  }
}

// Panel p of one keyframe's normalised rows (Kn_slot, [S][C]) for the float32 micro-kernel: NR candidates
// channel-major, panel[c][0..NR), candidates past S zero.
void panelize(const float* Kn_slot, int64_t S, int64_t C, int64_t p, float* __restrict panel) {
  for (int l = 0; l < NR; ++l) {
    const int64_t t = p * NR + l;
    for (int64_t c = 0; c < C; ++c) panel[c * NR + l] = t < S ? Kn_slot[t * C + c] : 0.f;
  }
}


#if TF_BF16_DOT
// ---------------------------------------------------------------------------------------------------
// bf16 features on CPUs with AVX512-BF16: the search runs on the bf16 values themselves with vdpbf16ps
// (_mm512_dpbf16_ps: per fp32 lane, two bf16 x bf16 products added to an fp32 accumulator), so it
// streams half the bytes and issues one instruction per two channels instead of converting tiles to
// float32 first. A bf16 x bf16 product is exact in float32 and the sums are float32, so the
// similarities are the float32 path's up to summation order (and vdpbf16ps's flush of denormals to zero).
// Candidates are not normalised in bf16 (that would round them a second time): the raw dot product is
// divided by max(|k|, 1e-12) per candidate in the epilogue, before the argmax fold (a division, as the
// reference's k / max(|k|, eps): exact ties stay ties, e.g. C = 1 where every |cos| is 1).
//   Bh: panels of NR candidates, channel pairs interleaved: panel[c2][l] = (k[l][2 c2], k[l][2 c2 + 1])
//       as one 32-bit word (odd C: the last pair's high half is 0). norm[t] alongside.
//   Ah: MR_B query rows in micro-panels of channel pairs: micro[c2][i], broadcast straight from memory.
// Register blocking MR_B x NV vectors: MR_B*NV accumulators + NV candidate vectors (<= 32 zmm).
#ifndef TF_MR_B
#define TF_MR_B 12
#endif
constexpr int MR_B = TF_MR_B;
constexpr int MC_B = MR_B * 8;
static_assert(MR_B * NV + NV <= 32, "bf16 micro-tile does not fit the 32 zmm registers");

__attribute__((always_inline)) inline void micro_kernel_bf16(const uint32_t* __restrict a,
                                                             const uint32_t* __restrict b, int64_t C2,
                                                             const float* __restrict nrm, vf (&acc)[MR_B][NV]) {
  __m512 r[MR_B][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR_B; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) r[i][v] = _mm512_setzero_ps();
  for (int64_t c2 = 0; c2 < C2; ++c2) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_load_si512(b + c2 * NR + v * W);
#pragma GCC unroll 16
    for (int i = 0; i < MR_B; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(a[c2 * MR_B + i]));  // {1to16} memory operand
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) r[i][v] = _mm512_dpbf16_ps(r[i][v], av, bv[v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m512 s = _mm512_load_ps(nrm + v * W);
#pragma GCC unroll 16
    for (int i = 0; i < MR_B; ++i) acc[i][v] = (vf)_mm512_div_ps(r[i][v], s);
  }
}

inline uint32_t bf16_pair(const uint16_t* row, int64_t c2, int64_t C) {
  const uint32_t lo = row[2 * c2];
  const uint32_t hi = 2 * c2 + 1 < C ? row[2 * c2 + 1] : 0u;
  return lo | (hi << 16);
}

// The whole kernel for bf16 features: pack, search, gather-blend (the same schedule as the float32 path).
void propagate_bf16_dot(const PropagateArgs& a, const std::vector<int64_t>& slot_of,
                        const std::vector<int64_t>& slot_kf, int64_t* idx, int nthreads) {
  const int64_t F = a.F, S = a.S, C = a.C;
  const int64_t C2 = (C + 1) / 2;
  const int64_t NP = (S + NR - 1) / NR;
  const int64_t n_slots = int64_t(slot_kf.size());
  const int64_t feat_frame = S * C;
  const uint16_t* xs = static_cast<const uint16_t*>(a.x);
  const uint16_t* ks = static_cast<const uint16_t*>(a.key_feats);
  auto Bh = aligned_buffer<uint32_t>(size_t(std::max<int64_t>(n_slots, 1) * NP * C2 * NR));
  auto norm = aligned_buffer<float>(size_t(std::max<int64_t>(n_slots, 1) * NP * NR));

#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t sp = 0; sp < n_slots * NP; ++sp) {
    const int64_t q = sp / NP, p = sp % NP;
    const int64_t kf = slot_kf[size_t(q)];
    uint32_t* panel = Bh.get() + (q * NP + p) * C2 * NR;
    float* pnrm = norm.get() + (q * NP + p) * NR;
    for (int l = 0; l < NR; ++l) {
      const int64_t t = p * NR + l;
      if (t >= S) {
        for (int64_t c2 = 0; c2 < C2; ++c2) panel[c2 * NR + l] = 0u;
        pnrm[l] = 1.f;  // padding: 0 / 1, masked by fold_tile anyway
        continue;
      }
      const uint16_t* row = ks + kf * feat_frame + t * C;
      double ss = 0.0;
      for (int64_t c = 0; c < C; ++c) ss += double(bf16_to_f32(row[c])) * double(bf16_to_f32(row[c]));
      pnrm[l] = std::max(float(std::sqrt(ss)), 1e-12f);  // as the reference's F.normalize eps
      for (int64_t c2 = 0; c2 < C2; ++c2) panel[c2 * NR + l] = bf16_pair(row, c2, C);
    }
  }

  const int64_t n_blocks = (S + MC_B - 1) / MC_B;
#pragma omp parallel num_threads(nthreads)
  {
    auto Ah = aligned_buffer<uint32_t>(size_t(MC_B) * size_t(C2));
    auto bestv = aligned_buffer<float>(size_t(MC_B) * NR);
    auto besti = aligned_buffer<int32_t>(size_t(MC_B) * NR);
    auto row_acc = aligned_buffer<float>(size_t(C));
    auto row_tmp = aligned_buffer<float>(size_t(C));
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < F * n_blocks; ++unit) {
      int64_t n_micro = 0;
      auto pack = [&](int64_t f, int64_t r0, int64_t rows) {
        n_micro = (rows + MR_B - 1) / MR_B;
        for (int64_t i = 0; i < n_micro * MR_B; ++i) {
          uint32_t* dst = Ah.get() + (i / MR_B) * C2 * MR_B + (i % MR_B);
          if (i < rows) {
            const uint16_t* row = xs + f * feat_frame + (r0 + i) * C;
            for (int64_t c2 = 0; c2 < C2; ++c2) dst[c2 * MR_B] = bf16_pair(row, c2, C);
          } else {
            for (int64_t c2 = 0; c2 < C2; ++c2) dst[c2 * MR_B] = 0u;
          }
        }
      };
      auto search = [&](int64_t kf, int64_t* out_idx, int64_t rows) {
        std::fill(bestv.get(), bestv.get() + n_micro * MR_B * NR, -std::numeric_limits<float>::infinity());
        std::fill(besti.get(), besti.get() + n_micro * MR_B * NR, int32_t(0));
        const int64_t q = slot_of[size_t(kf)];
        const uint32_t* Bk = Bh.get() + q * NP * C2 * NR;
        const float* Nk = norm.get() + q * NP * NR;
        for (int64_t p = 0; p < NP; ++p) {
          const uint32_t* b = Bk + p * C2 * NR;
          const int valid = int(std::min<int64_t>(NR, S - p * NR));
          for (int64_t m = 0; m < n_micro; ++m) {
            vf acc[MR_B][NV];
            micro_kernel_bf16(Ah.get() + m * C2 * MR_B, b, C2, Nk + p * NR, acc);
            fold_tile(acc, bestv.get() + m * MR_B * NR, besti.get() + m * MR_B * NR, int32_t(p * NR), valid);
          }
        }
        for (int64_t i = 0; i < rows; ++i) out_idx[i] = reduce_row(bestv.get() + i * NR, besti.get() + i * NR);
      };
      run_unit(a, unit, MC_B, idx, pack, search, row_acc.get(), row_tmp.get());
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// float32 and float16 features on CPUs with AVX512-BF16: a bf16 pre-search, then exact float32 rescoring
// of the few candidates the bf16 error cannot rule out. The indices are the float32 search's, bit for bit:
//   s(t)  = the float32 similarity of query a and normalised candidate k_t, an FMA chain over c (what the
//           float32 micro-kernel computes in each lane, and what rescore() computes again);
//   s~(t) = the vdpbf16ps similarity of a~ = bf16(a) and k~_t = bf16(k_t).
// |s~(t) - s(t)| <= e with e = |a~ - a| max|k~| + |a| max|k~ - k| (Cauchy-Schwarz on the rounding errors,
// with their actual norms), + gamma_C (|a~| max|k~| + |a| max|k|) for the two float32 summations, + a
// 2^-126 term for vdpbf16ps's flush of denormals (max over the keyframe's candidates, per query row).
// So s~(t*) >= s(t*) - e >= s(t~) - e >= s~(t~) - 2e for the float32 winner t* and the bf16 winner t~: every
// candidate within 2e of the bf16 row maximum is rescored with s(t), ties to the lowest index as before.
// The window is usually a handful of candidates; a row that collects more than kWindowCap (near-duplicate
// tokens: flat image regions) is searched again with the float32 micro-kernel, one MR-row micro-panel at a
// time, so the worst case costs the bf16 search on top of today's float32 one, and the answer never changes.
constexpr int kWindowCap = 32;

// Rows [0, n) of a row-major block (stride C) into an MR-row micro-panel micro[c][i]; missing rows are 0.
void pack_micro_f32(const float* rows_f32, int64_t n, int64_t C, float* __restrict dst) {
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t c = 0; c < C; ++c) dst[c * MR + i] = i < n ? rows_f32[i * C + c] : 0.f;
}

struct Window {  // per query row of a work unit
  float runmax, width;
  int count;
  bool overflow;
};

// Fold one bf16 micro-tile into the rows' windows: update each row's running maximum, then keep every
// candidate within `width` of it (candidates arrive in increasing t; compaction keeps that order).
__attribute__((always_inline)) inline void window_fold(const vf (&acc)[MR_B][NV], int rows_here, int32_t base,
                                                       int valid, Window* win, int32_t* cand_t, float* cand_s) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int i = 0; i < MR_B && i < rows_here; ++i) {
    Window& w = win[i];
    __m512 s[NV];
    __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      s[v] = (__m512)acc[i][v];
      if (valid < NR)  // padded candidates of the last panel
        s[v] = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                  _mm512_cmplt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(v * W)),
                                                          _mm512_set1_epi32(valid)),
                                  s[v]);
      m = _mm512_max_ps(m, s[v]);
    }
    const float tile_max = _mm512_reduce_max_ps(m);
    if (tile_max > w.runmax) w.runmax = tile_max;
    if (w.overflow) continue;
    const float thr = w.runmax - w.width;
    const __m512 thr_v = _mm512_set1_ps(thr);
    for (int v = 0; v < NV && !w.overflow; ++v) {
      uint32_t bits = _mm512_cmp_ps_mask(s[v], thr_v, _CMP_GE_OQ);
      while (bits) {
        const int l = __builtin_ctz(bits);
        bits &= bits - 1;
        int32_t* ct = cand_t + i * kWindowCap;
        float* cs = cand_s + i * kWindowCap;
        if (w.count == kWindowCap) {  // drop what the risen maximum has ruled out
          int n = 0;
          for (int k = 0; k < w.count; ++k)
            if (cs[k] >= thr) ct[n] = ct[k], cs[n] = cs[k], ++n;
          w.count = n;
          if (n == kWindowCap) {
            w.overflow = true;
            break;
          }
        }
        ct[w.count] = base + v * W + l;
        cs[w.count] = s[v][l];
        ++w.count;
      }
    }
  }
}

// s(t) for candidates t (increasing) of one query row, as the float32 micro-kernel's lanes compute it: an
// FMA chain from c = 0 (explicit fmaf: written as `s += a * b` the vectoriser turns it into rounded products
// added in order, which is not the micro-kernel's value). Four chains at a time for latency. Returns the
// best t, ties to the lowest.
int32_t rescore(const float* __restrict a, const float* __restrict Kn, int64_t C, const int32_t* ts, int n) {
  float best = -std::numeric_limits<float>::infinity();
  int32_t best_t = ts[0];
  for (int k0 = 0; k0 < n; k0 += 4) {
    const int m = std::min(4, n - k0);
    const float* k[4];
    for (int j = 0; j < 4; ++j) k[j] = Kn + int64_t(ts[k0 + std::min(j, m - 1)]) * C;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      s0 = __builtin_fmaf(a[c], k[0][c], s0);
      s1 = __builtin_fmaf(a[c], k[1][c], s1);
      s2 = __builtin_fmaf(a[c], k[2][c], s2);
      s3 = __builtin_fmaf(a[c], k[3][c], s3);
    }
    const float sj[4] = {s0, s1, s2, s3};
    for (int j = 0; j < m; ++j)
      if (sj[j] > best) best = sj[j], best_t = ts[k0 + j];
  }
  return best_t;
}

// Round n floats to bf16 (vcvtneps2bf16: nearest even) into h, and return the sums of x^2, (h - x)^2 and
// h^2, accumulated in double (float32 squares would underflow for tiny rows; h - x itself is exact by
// Sterbenz, or -x where a denormal is flushed). The caller turns them into bounds (sum_bound).
struct RoundSums {
  double xx, dd, hh;
};
inline __m512d sq_acc(__m512 v, __m512d acc) {  // acc + (lower and upper 8 lanes of v)^2, in double
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm512_fmadd_pd(hi, hi, _mm512_fmadd_pd(lo, lo, acc));
}
inline RoundSums round_to_bf16(const float* __restrict x, int64_t n, uint16_t* __restrict h) {
  __m512d vx = _mm512_setzero_pd(), vd = _mm512_setzero_pd(), vh = _mm512_setzero_pd();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = n - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - c)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + c);
    const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
    _mm256_mask_storeu_epi16(h + c, k, b);
    const __m512 r = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
    vx = sq_acc(v, vx), vd = sq_acc(_mm512_sub_ps(r, v), vd), vh = sq_acc(r, vh);
  }
  return {_mm512_reduce_add_pd(vx), _mm512_reduce_add_pd(vd), _mm512_reduce_add_pd(vh)};
}

// sqrt of an upper bound of a double sum of n non-negative terms (a generous (n + 32) 2^-50 for its
// roundings). inf or NaN when the inputs were.
inline double sum_bound(double s, int64_t n) { return std::sqrt(s * (1.0 + double(n + 32) * 0x1p-50)); }

struct SlotBound {  // over one keyframe's normalised candidates k and their bf16 roundings k~
  double kt = 0, dk = 0, kh = 0;  // max |k~|, max |k~ - k|, max |k|
  bool finite = true;
};

void propagate_presearch(const PropagateArgs& a, const std::vector<int64_t>& slot_of,
                         const std::vector<int64_t>& slot_kf, int64_t* idx, int nthreads) {
  const int64_t F = a.F, S = a.S, C = a.C;
  const int64_t C2 = (C + 1) / 2;
  const int64_t NP = (S + NR - 1) / NR;
  const int64_t n_slots = int64_t(slot_kf.size());
  const size_t slots = size_t(std::max<int64_t>(n_slots, 1));
  auto Kn = aligned_buffer<float>(slots * S * C);  // float32 rows: rescoring
  normalise_candidates(a, slot_kf, Kn.get(), nthreads);
  // float32 panels for the fallback search, packed by the first thread that needs a keyframe's.
  auto Bp = aligned_buffer<float>(slots * NP * C * NR);
  std::unique_ptr<std::once_flag[]> bp_once(new std::once_flag[slots]);

  // bf16 panels of the normalised candidates (pairs interleaved as in propagate_bf16_dot), and the bounds.
  auto Bh = aligned_buffer<uint32_t>(slots * NP * C2 * NR);
  auto ones = aligned_buffer<float>(NR);  // micro_kernel_bf16 divides by a norm: these are normalised already
  std::fill(ones.get(), ones.get() + NR, 1.f);
  std::vector<SlotBound> bound(slots);
  std::vector<SlotBound> panel_bound(slots * size_t(NP));
#pragma omp parallel num_threads(nthreads)
  {
    auto h = aligned_buffer<uint16_t>(size_t(C) + 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t sp = 0; sp < n_slots * NP; ++sp) {
      const int64_t q = sp / NP, p = sp % NP;
      uint32_t* panel = Bh.get() + (q * NP + p) * C2 * NR;
      SlotBound& b = panel_bound[size_t(sp)];
      for (int l = 0; l < NR; ++l) {
        const int64_t t = p * NR + l;
        if (t >= S) {
          for (int64_t c2 = 0; c2 < C2; ++c2) panel[c2 * NR + l] = 0u;
          continue;
        }
        const RoundSums r = round_to_bf16(Kn.get() + (q * S + t) * C, C, h.get());
        const double kt = sum_bound(r.hh, C), dk = sum_bound(r.dd, C), kh = sum_bound(r.xx, C);
        b.kt = std::max(b.kt, kt), b.dk = std::max(b.dk, dk), b.kh = std::max(b.kh, kh);
        b.finite = b.finite && std::isfinite(kt) && std::isfinite(dk) && std::isfinite(kh);
        for (int64_t c2 = 0; c2 < C2; ++c2) panel[c2 * NR + l] = bf16_pair(h.get(), c2, C);
      }
    }
  }
  for (int64_t sp = 0; sp < n_slots * NP; ++sp) {
    SlotBound& b = bound[size_t(sp / NP)];
    const SlotBound& pb = panel_bound[size_t(sp)];
    b.kt = std::max(b.kt, pb.kt), b.dk = std::max(b.dk, pb.dk), b.kh = std::max(b.kh, pb.kh);
    b.finite = b.finite && pb.finite;
  }
  const double u = std::ldexp(1.0, -24), gamma = (C + 1) * u / (1 - (C + 1) * u);
  const double tiny = std::ldexp(1.0, -126);

  const int64_t n_blocks = (S + MC_B - 1) / MC_B;
  int64_t n_rows = 0, n_rescored = 0, n_fallback = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : n_rows, n_rescored, n_fallback)
  {
    auto Af = aligned_buffer<float>(size_t(MC_B) * size_t(C));  // the unit's query rows, float32
    auto Ah = aligned_buffer<uint32_t>(size_t(MC_B) * size_t(C2));
    constexpr int64_t kMicroRows = (MC_B + MR - 1) / MR;  // float32 micro-panels in a unit
    auto Ap = aligned_buffer<float>(size_t(kMicroRows * MR) * size_t(C));
    auto h = aligned_buffer<uint16_t>(size_t(C) + 1);
    auto cand_t = aligned_buffer<int32_t>(size_t(MC_B) * kWindowCap);
    auto cand_s = aligned_buffer<float>(size_t(MC_B) * kWindowCap);
    auto bestv = aligned_buffer<float>(size_t(kMicroRows * MR) * NR);
    auto besti = aligned_buffer<int32_t>(size_t(kMicroRows * MR) * NR);
    auto row_acc = aligned_buffer<float>(size_t(C));
    auto row_tmp = aligned_buffer<float>(size_t(C));
    std::vector<double> an(MC_B), dn(MC_B), tn(MC_B);  // |a|, |a~ - a|, |a~| per row
    std::vector<Window> win(MC_B);
    std::vector<char> redo(MC_B);
    std::vector<int64_t> micro_row(kMicroRows);  // first row of each float32 micro-panel to search again
    int64_t seen = 0, seen_redone = 0;            // this thread's rows, and those searched again
    bool give_up = false;
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < F * n_blocks; ++unit) {
      int64_t n_micro = 0;
      auto pack = [&](int64_t f, int64_t r0, int64_t rows) {  // float32 rows, bf16 micro-panels, norms
        n_micro = (rows + MR_B - 1) / MR_B;
        for (int64_t i = 0; i < n_micro * MR_B; ++i) {
          uint32_t* dst = Ah.get() + (i / MR_B) * C2 * MR_B + (i % MR_B);
          if (i >= rows) {
            for (int64_t c2 = 0; c2 < C2; ++c2) dst[c2 * MR_B] = 0u;
            continue;
          }
          float* r = Af.get() + i * C;
          load_row(a.x, a.feat_dtype, (f * S + r0 + i) * C, C, r);
          const RoundSums rs = round_to_bf16(r, C, h.get());
          an[size_t(i)] = sum_bound(rs.xx, C), dn[size_t(i)] = sum_bound(rs.dd, C), tn[size_t(i)] = sum_bound(rs.hh, C);
          for (int64_t c2 = 0; c2 < C2; ++c2) dst[c2 * MR_B] = bf16_pair(h.get(), c2, C);
        }
      };
      auto search = [&](int64_t kf, int64_t* out_idx, int64_t rows) {
        const int64_t q = slot_of[size_t(kf)];
        const SlotBound& b = bound[size_t(q)];
        n_rows += rows;
        if (give_up) {
          std::fill(redo.begin(), redo.begin() + rows, char(1));
        } else {
          for (int64_t i = 0; i < rows; ++i) {
            const double e = dn[size_t(i)] * b.kt + an[size_t(i)] * b.dk +
                             gamma * (tn[size_t(i)] * b.kt + an[size_t(i)] * b.kh) +
                             tiny * (std::sqrt(double(C)) * (b.kt + tn[size_t(i)]) + 2.0 * C);
            const double width = 2.0 * e * (1.0 + 1e-6);  // rounded up: float(width) must not fall below 2e
            // Non-finite inputs, or magnitudes where bf16 or float32 sums could overflow: float32 search.
            const bool ok = b.finite && std::isfinite(an[size_t(i)]) && an[size_t(i)] < 1e30;
            win[size_t(i)] = {-std::numeric_limits<float>::infinity(), ok ? float(width) : 0.f, 0, !ok};
          }
          const uint32_t* Bk = Bh.get() + q * NP * C2 * NR;
          for (int64_t p = 0; p < NP; ++p) {
            const uint32_t* bp = Bk + p * C2 * NR;
            const int valid = int(std::min<int64_t>(NR, S - p * NR));
            for (int64_t m = 0; m < n_micro; ++m) {
              vf acc[MR_B][NV];
              micro_kernel_bf16(Ah.get() + m * C2 * MR_B, bp, C2, ones.get(), acc);
              window_fold(acc, int(std::min<int64_t>(MR_B, rows - m * MR_B)), int32_t(p * NR), valid,
                          win.data() + m * MR_B, cand_t.get() + m * MR_B * kWindowCap,
                          cand_s.get() + m * MR_B * kWindowCap);
            }
          }
          for (int64_t i = 0; i < rows; ++i) {
            Window& w = win[size_t(i)];
            redo[size_t(i)] = w.overflow;
            if (w.overflow) continue;
            const float thr = w.runmax - w.width;
            int32_t* ct = cand_t.get() + i * kWindowCap;
            const float* cs = cand_s.get() + i * kWindowCap;
            int n = 0;
            for (int k = 0; k < w.count; ++k)
              if (cs[k] >= thr) ct[n++] = ct[k];
            n_rescored += n;
            out_idx[i] = rescore(Af.get() + i * C, Kn.get() + q * S * C, C, ct, n);
          }
        }
        // Rows whose window overflowed: the float32 search over the MR-row micro-panels holding one, in the
        // float32 path's order (panel outer, micro-panels inner).
        int64_t n_redo = 0;
        for (int64_t i0 = 0; i0 < rows; i0 += MR) {
          const int64_t nr = std::min<int64_t>(MR, rows - i0);
          if (std::any_of(redo.begin() + i0, redo.begin() + i0 + nr, [](char c) { return c != 0; })) {
            pack_micro_f32(Af.get() + i0 * C, nr, C, Ap.get() + n_redo * MR * C);
            micro_row[size_t(n_redo++)] = i0;
          }
        }
        int64_t redone = 0;
        if (n_redo) {
          float* Bf = Bp.get() + q * NP * C * NR;
          std::call_once(bp_once[size_t(q)], [&] {
            for (int64_t p = 0; p < NP; ++p) panelize(Kn.get() + q * S * C, S, C, p, Bf + p * C * NR);
          });
          std::fill(bestv.get(), bestv.get() + n_redo * MR * NR, -std::numeric_limits<float>::infinity());
          std::fill(besti.get(), besti.get() + n_redo * MR * NR, int32_t(0));
          for (int64_t p = 0; p < NP; ++p) {
            const int valid = int(std::min<int64_t>(NR, S - p * NR));
            for (int64_t m = 0; m < n_redo; ++m) {
              vf acc[MR][NV];
              micro_kernel(Ap.get() + m * MR * C, Bf + p * C * NR, C, acc);
              fold_tile(acc, bestv.get() + m * MR * NR, besti.get() + m * MR * NR, int32_t(p * NR), valid);
            }
          }
          for (int64_t m = 0; m < n_redo; ++m)
            for (int64_t i = micro_row[size_t(m)]; i < std::min<int64_t>(micro_row[size_t(m)] + MR, rows); ++i)
              if (redo[size_t(i)]) {
                const int64_t l = m * MR + (i - micro_row[size_t(m)]);
                out_idx[i] = reduce_row(bestv.get() + l * NR, besti.get() + l * NR);
                ++redone;
              }
        }
        n_fallback += redone;
        // Near-duplicate data (most windows overflow): this thread stops pre-searching, so the worst case
        // costs about the float32 search alone. The answer is the same either way.
        seen += rows, seen_redone += redone;
        give_up = give_up || (seen >= 4 * MC_B && 2 * seen_redone > seen);
      };
      run_unit(a, unit, MC_B, idx, pack, search, row_acc.get(), row_tmp.get());
    }
  }
  if (a.stats) a.stats[0] += n_rows, a.stats[1] += n_rescored, a.stats[2] += n_fallback;
}
#endif  // TF_BF16_DOT

}  // namespace

void TF_ENTRY(const PropagateArgs& a) {
  const int64_t F = a.F, J = a.J, K = a.K, S = a.S, C = a.C;
  const int nthreads = resolve_threads(a.num_threads);
  (void)nthreads;  // unused without OpenMP

  // Keyframes some frame searches, each packed once however many frames share it.
  std::vector<int64_t> slot_of(size_t(K), -1), slot_kf;
  for (int64_t i = 0; i < F * J; ++i) {
    const int64_t kf = a.which[i];
    if (kf >= 0 && slot_of[size_t(kf)] < 0) {
      slot_of[size_t(kf)] = int64_t(slot_kf.size());
      slot_kf.push_back(kf);
    }
  }
  const int64_t NP = (S + NR - 1) / NR;  // candidate panels per keyframe
  const int64_t n_slots = int64_t(slot_kf.size());

  // Indices: the caller's buffer, or our own when only `out` is wanted.
  std::unique_ptr<int64_t[]> own_idx;
  int64_t* idx = a.idx;
  if (!idx) {
    own_idx.reset(new int64_t[size_t(F * J * S)]);
    idx = own_idx.get();
  }
  const int64_t feat_frame = S * C;
#if TF_BF16_DOT
  if (a.feat_dtype == kBFloat16) {
    propagate_bf16_dot(a, slot_of, slot_kf, idx, nthreads);
    return;
  }
  if (a.presearch) {
    propagate_presearch(a, slot_of, slot_kf, idx, nthreads);
    return;
  }
#endif
  // -- pack the candidates: normalised float32 panels -------------------------------------------------
  auto Kn = aligned_buffer<float>(size_t(std::max<int64_t>(n_slots, 1) * S * C));
  auto Bp = aligned_buffer<float>(size_t(std::max<int64_t>(n_slots, 1) * NP * C * NR));
  normalise_candidates(a, slot_kf, Kn.get(), nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t sp = 0; sp < n_slots * NP; ++sp)
    panelize(Kn.get() + (sp / NP) * S * C, S, C, sp % NP, Bp.get() + sp * C * NR);

  // -- search: per (frame, block of MC rows), every candidate keyframe of that frame ------------------
  const int64_t n_blocks = (S + MC - 1) / MC;
#pragma omp parallel num_threads(nthreads)
  {
    auto Ap = aligned_buffer<float>(size_t(MC) * size_t(C));
    auto row = aligned_buffer<float>(size_t(C));
    auto bestv = aligned_buffer<float>(size_t(MC) * NR);
    auto besti = aligned_buffer<int32_t>(size_t(MC) * NR);
    auto row_acc = aligned_buffer<float>(size_t(C));  // gather-blend scratch
    auto row_tmp = aligned_buffer<float>(size_t(C));
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < F * n_blocks; ++unit) {
      int64_t n_micro = 0;
      auto pack = [&](int64_t f, int64_t r0, int64_t rows) {  // once per unit, shared by its J keyframes
        n_micro = (rows + MR - 1) / MR;
        for (int64_t i = 0; i < n_micro * MR; ++i) {
          float* dst = Ap.get() + (i / MR) * C * MR + (i % MR);
          if (i < rows) {
            load_row(a.x, a.feat_dtype, f * feat_frame + (r0 + i) * C, C, row.get());
            for (int64_t c = 0; c < C; ++c) dst[c * MR] = row[c];
          } else {
            for (int64_t c = 0; c < C; ++c) dst[c * MR] = 0.f;  // padding rows, results dropped
          }
        }
      };
      auto search = [&](int64_t kf, int64_t* out_idx, int64_t rows) {
        std::fill(bestv.get(), bestv.get() + n_micro * MR * NR, -std::numeric_limits<float>::infinity());
        std::fill(besti.get(), besti.get() + n_micro * MR * NR, int32_t(0));
        const float* Bk = Bp.get() + slot_of[size_t(kf)] * NP * C * NR;
        // Panel outer, micro-rows inner: one candidate panel (NR x C) is reused from L1/L2 by all the
        // unit's micro-rows, and the unit's Ap stays in L2 across panels.
        for (int64_t p = 0; p < NP; ++p) {
          const float* b = Bk + p * C * NR;
          const int valid = int(std::min<int64_t>(NR, S - p * NR));
          for (int64_t m = 0; m < n_micro; ++m) {
            vf acc[MR][NV];
            micro_kernel(Ap.get() + m * C * MR, b, C, acc);
            fold_tile(acc, bestv.get() + m * MR * NR, besti.get() + m * MR * NR, int32_t(p * NR), valid);
          }
        }
        for (int64_t i = 0; i < rows; ++i) out_idx[i] = reduce_row(bestv.get() + i * NR, besti.get() + i * NR);
      };
      run_unit(a, unit, MC, idx, pack, search, row_acc.get(), row_tmp.get());
    }
  }
}

}  // namespace detail
}  // namespace tokenflow

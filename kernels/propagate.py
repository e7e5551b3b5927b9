"""Triton kernel of TokenFlow's propagation: cosine nearest neighbour, gather of keyframe outputs, blend.

Contract: `tokenflow.ops.propagate` / `tokenflow.ops.cosine_argmax` (shapes in its symbols:
F frames, K keyframes, S tokens, C channels, R branches, J candidate keyframes per frame).

One program owns BLOCK_M query tokens of one frame f. For each candidate j (which[f, j] >= 0) it walks the
S candidate tokens of keyframe which[f, j] in BLOCK_N tiles, each tile a BLOCK_M x BLOCK_N x C matmul in
BLOCK_K channel slices accumulated in fp32, scaled per column by the candidate's inverse norm (the query's
norm does not change an argmax over candidates), and folds the tile into a running max/argmax held in
registers. The [F*S, S] similarity matrix is never written.

The winning index of candidate j for each of the program's rows is kept in registers: column j of a
[BLOCK_M, BLOCK_J] int32 tile (BLOCK_J = next power of two >= J, a compile-time bound). The gather-blend
epilogue of the same program reads its own rows' indices from that tile, never from memory:
out = residual + sum_j w[f, j] * key_out[r, which[f, j], idx], fp32 accumulation over j in registers,
one store per output element in key_out's dtype. Moving the indices from the matmul accumulator's layout
to the gather's layout is the compiler's convert_layout (through shared memory, with the barriers it
inserts), so no thread reads a global write of another thread. The [F, J, S] int64 index buffer (the
`cosine_argmax` result) is written only when asked for (STORE_IDX) and never read by the kernel.

Ties: `tl.max(..., return_indices=True, return_indices_tie_break_left=True)` breaks ties inside a tile to
the lowest column and tiles are scanned in increasing order with a strict `>`, so the lowest index wins
overall, as `torch.argmax`. Columns past S are -inf, never 0: with all-negative similarities a 0 would win.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# TRITON_INTERPRET is read when a kernel is defined (triton.jit), so this is fixed at import time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
NORM_EPS = 1e-12  # as torch.nn.functional.normalize and tokenflow.ops.reference

# Shipped GPU configs (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_C, num_warps, num_stages), each compiled for sm_90
# by tests/test_propagate.py (wgmma, no spills; ptxas -v) for aligned pointers with S, C % 16 == 0 (every
# SD level) and for the generic specialisation. BLOCK_K = 64 spills at BLOCK_M = 128, measured; "small"
# with BLOCK_C = 64 spills 8 bytes in the generic specialisation (84 registers when aligned), so 32.
GPU_CONFIGS = {
    "large": (128, 128, 32, 32, 8, 3),  # fp16/bf16, S >= 512: the 64x64 and 32x32 levels
    "small": (64, 64, 32, 32, 4, 2),    # fp16/bf16, S < 512: more programs for the 16x16 and 8x8 levels
    "fp32": (64, 64, 8, 32, 4, 1),      # ieee fp32 on CUDA cores (exactness, not speed); BLOCK_K = 16 spills when aligned
}
# The interpreter does not autotune, and its speed scales with tile area: one small fixed config.
INTERPRET_CONFIG = (32, 32, 32, 32, 1, 1)


@triton.jit
def _propagate_kernel(
    x_ptr, kf_ptr, inv_ptr, ko_ptr, which_ptr, w_ptr, res_ptr, out_ptr, idx_ptr,
    S, C, K, J, R,
    IS_FP32: tl.constexpr, HAS_OUT: tl.constexpr, HAS_RES: tl.constexpr, STORE_IDX: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    f = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_J)
    x_base = x_ptr + f * S * C
    # Column j: this program's winning candidate index of keyframe which[f, j], per query row (J <= BLOCK_J).
    idx_j = tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.int32)

    for j in range(0, J):
        kf = tl.load(which_ptr + f * J + j)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
        if kf >= 0:
            k_base = kf_ptr + kf * S * C
            for n0 in range(0, S, BLOCK_N):
                cols = n0 + offs_n
                col_ok = cols < S
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for c0 in range(0, C, BLOCK_K):
                    ch = c0 + offs_k
                    ch_ok = ch < C
                    a = tl.load(x_base + rows[:, None] * C + ch[None, :],
                                mask=row_ok[:, None] & ch_ok[None, :], other=0.0)
                    # Candidate tile loaded row-major ([BLOCK_N, BLOCK_K], contiguous in C), transposed in registers.
                    b = tl.load(k_base + cols[:, None] * C + ch[None, :],
                                mask=col_ok[:, None] & ch_ok[None, :], other=0.0)
                    if IS_FP32:
                        # tf32 would round features to 10 mantissa bits and flip near-argmaxes.
                        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(a, tl.trans(b), acc)
                inv = tl.load(inv_ptr + kf * S + cols, mask=col_ok, other=0.0)
                sim = acc * inv[None, :]
                sim = tl.where(col_ok[None, :], sim, float("-inf"))
                tile_max, tile_arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
                better = tile_max > best  # strict: an earlier tile keeps a tie
                best_idx = tl.where(better, n0 + tile_arg, best_idx)
                best = tl.where(better, tile_max, best)
        if STORE_IDX:
            tl.store(idx_ptr + (f * J + j) * S + rows, best_idx.to(tl.int64), mask=row_ok)
        if HAS_OUT:
            idx_j = tl.where(offs_j[None, :] == j, best_idx[:, None], idx_j)

    if HAS_OUT:
        # Gather-blend for this program's own rows with the indices in registers (idx_j): no global round trip.
        offs_c = tl.arange(0, BLOCK_C)
        for r in range(0, R):
            for c0 in range(0, C, BLOCK_C):
                ch = c0 + offs_c
                m2 = row_ok[:, None] & (ch < C)[None, :]
                o_off = ((r * tl.num_programs(1) + f) * S + rows[:, None]) * C + ch[None, :]
                if HAS_RES:
                    acc = tl.load(res_ptr + o_off, mask=m2, other=0.0).to(tl.float32)
                else:
                    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
                for j in range(0, J):
                    kf = tl.load(which_ptr + f * J + j)
                    if kf >= 0:
                        w = tl.load(w_ptr + f * J + j)
                        src = tl.sum(tl.where(offs_j[None, :] == j, idx_j, 0), axis=1)  # column j, exact (one term)
                        g = tl.load(ko_ptr + ((r * K + kf) * S + src[:, None]) * C + ch[None, :], mask=m2, other=0.0)
                        acc += w * g.to(tl.float32)
                tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=m2)


def inverse_norms(key_feats: torch.Tensor) -> torch.Tensor:
    """[K, S] float32 1 / max(||key_feats[k, s]||, 1e-12); a [K, S, C] reduction, negligible next to the search."""
    return key_feats.float().norm(dim=-1).clamp_min(NORM_EPS).reciprocal().contiguous()


def pick_config(S: int, dtype: torch.dtype):
    """The launch config: fixed under the interpreter; on a GPU a shipped config chosen by shape.

    Not `triton.autotune`: the interpreter cannot run it, and a heuristic keeps both paths one code path.
    """
    if INTERPRET:
        return INTERPRET_CONFIG
    if dtype == torch.float32:
        return GPU_CONFIGS["fp32"]
    return GPU_CONFIGS["large"] if S >= 512 else GPU_CONFIGS["small"]


def propagate(x, key_feats, which, key_out=None, weights=None, residual=None, *, out=None, idx=None,
              config=None, return_idx=True):
    """Launch the fused search (+ gather-blend when key_out is given). Returns (out or None, idx or None).

    Inputs as `tokenflow.ops.propagate`, already validated; made contiguous here (a copy only when not).
    `out` / `idx` may be preallocated ([R, F, S, C] in key_out's dtype / [F, J, S] int64). With key_out
    given and return_idx=False (and no `idx`), the indices stay in registers: nothing is allocated or
    written besides `out`, and idx is returned as None.
    """
    F_, S, C = x.shape
    K, J = key_feats.shape[0], which.shape[1]
    dev = x.device
    x = x.contiguous()
    key_feats = key_feats.contiguous()
    which64 = which.to(torch.int64).contiguous()
    inv = inverse_norms(key_feats)
    has_out = key_out is not None
    store_idx = not has_out or return_idx or idx is not None
    if store_idx and idx is None:
        idx = torch.empty(F_, J, S, dtype=torch.int64, device=dev)
    R = key_out.shape[0] if has_out else 0
    if has_out:
        key_out = key_out.contiguous()
        w32 = weights.to(device=dev, dtype=torch.float32).contiguous()
        res = residual.contiguous() if residual is not None else None
        if out is None:
            out = torch.empty(R, F_, S, C, dtype=key_out.dtype, device=dev)
    else:
        w32 = res = None
    BM, BN, BK, BC, warps, stages = config or pick_config(S, x.dtype)
    if F_ == 0 or J == 0 and not has_out:
        return out, idx
    grid = (triton.cdiv(S, BM), F_)
    _propagate_kernel[grid](
        x, key_feats, inv, key_out if has_out else x, which64, w32 if has_out else inv,
        res if res is not None else x, out if has_out else x, idx if store_idx else which64,
        S, C, K, J, R,
        IS_FP32=x.dtype == torch.float32, HAS_OUT=has_out, HAS_RES=res is not None, STORE_IDX=store_idx,
        BLOCK_J=block_j(J),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_C=BC, num_warps=warps, num_stages=stages)
    return out, idx


def block_j(J: int) -> int:
    """Compile-time bound on J for the in-register index tile (J = 2 in TokenFlow: one specialisation)."""
    return triton.next_power_of_2(max(J, 1))


def cosine_argmax(x, key_feats, which, *, idx=None, config=None):
    """Indices only: [F, J, S] int64 (0 where which is -1)."""
    return propagate(x, key_feats, which, idx=idx, config=config)[1]


def sm90_report(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int,
                divisible: tuple = ()) -> dict:
    """Compile one kernel config for sm_90 without a GPU and report what the hardware would run.

    `divisible`: names of integer arguments to specialise as multiples of 16; when non-empty, every pointer
    is also taken as 16-byte aligned: the specialisation Triton's launcher picks at run time for such
    values (torch allocations are aligned); it decides vector widths and register use. The generic
    compile (no hints) is what odd shapes or offset views get.

    Returns {"mma": tensor-core instructions found in the PTX, "regs": registers, "spill_bytes": spill
    stores + loads from `ptxas -v`}. Needs a process where TRITON_INTERPRET is unset (kernels compiled,
    not interpreted); the ptxas that ships with the triton wheel does the register allocation.
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    attrs = {}
    if divisible:
        names = fn.arg_names
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
                 if n in signature and (n in divisible or signature[n].startswith("*"))}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    mma = sorted(set(re.findall(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True, check=True)
    log = r.stderr + r.stdout
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    regs = re.search(r"Used (\d+) registers", log)
    return {"mma": mma, "regs": int(regs.group(1)) if regs else None, "spill_bytes": spills}


def sm90_signature(feat: str = "fp16", out: str | None = None) -> dict:
    """Argument types of `_propagate_kernel` for `sm90_report` (features `feat`, key_out/out `out`)."""
    out = out or feat
    return {"x_ptr": f"*{feat}", "kf_ptr": f"*{feat}", "inv_ptr": "*fp32", "ko_ptr": f"*{out}", "which_ptr": "*i64",
            "w_ptr": "*fp32", "res_ptr": f"*{out}", "out_ptr": f"*{out}", "idx_ptr": "*i64",
            "S": "i32", "C": "i32", "K": "i32", "J": "i32", "R": "i32"}

"""Triton flash-attention kernel of TokenFlow's keyframe pass (extended attention).

Contract: `tokenflow.ops.extended_attention`: q, k, v [R, K, S, C] (q, k [1, K, S, C] with shared_qk),
channels head-major (C = heads * d). Branch 0 attends within its own frame (S keys); branch r >= 1
attends from every frame to the K*S keys of branch r. Because a branch's K frames are contiguous in
memory, "all keyframes of the branch" is just one key sequence of length K*S: no K/V copies, no logits.

One program owns BLOCK_M queries of one (frame, head) of one task, and walks its keys in BLOCK_N tiles
with the online softmax (running row max m, row sum l, base-2 exponentials, fp32 statistics and
accumulator). Tasks (grid axis 2): task 0 is branch 0; then either one task per branch r >= 1, or with
shared_qk one task per PAIR of branches >= 1: the probabilities come from the source q and k once and are
applied to both branches' V (two accumulators), which halves the exponentials, the part that costs as
much as the matmuls at d = 64 (for d > 128 the two accumulators would spill, so each branch gets its own
program there, still on the source q and k). Head dims that are not powers of two run as two chunks, the
largest power of two below d and the rest rounded up to a power of two >= 16 (40 = 32 + 16 with 8 lanes
masked, 80 = 64 + 16, 160 = 128 + 32): the QK^T products of the chunks are summed, and each chunk has its
own output accumulator, so d = 160 does no MMA work on padding and fits in registers.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tokenflow.kernels.propagate import INTERPRET

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256

# Shipped GPU configs per (head dim padded to a power of two, V count): (BLOCK_M, BLOCK_N, num_warps,
# num_stages). tests/test_extended_attention.py compiles each for sm_90 (ptxas -v), both for aligned
# pointers with C % 16 == 0 (what every SD layer launches) and for the generic specialisation, and checks
# wgmma and no spills (4 warps at BLOCK_M = 128 spill, measured).
GPU_CONFIGS = {
    (64, False): (128, 128, 8, 3),  # d = 40 (32 + 16 chunks), 64
    (64, True): (128, 64, 8, 3),
    (128, False): (128, 64, 8, 3),  # d = 80 (64 + 16)
    (128, True): (64, 32, 8, 2),
    # d = 160 runs as 128 + 32 chunks (it used to pad to 256 and spill 56 bytes): 138 registers with C % 16
    # == 0, 254 generic, no spills. (128, 64, 8, 2) is spill-free only with C % 16 == 0 (always true at
    # d = 160, but the generic compile spills): a candidate to time on a GPU. Shared probabilities with
    # two 160-wide accumulators sit at 254-255 registers, so d > 128 still runs one V per task.
    (256, False): (64, 64, 8, 1),
}
INTERPRET_CONFIG = (32, 32, 1, 1)


@triton.jit
def _ext_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    S, K, H, C, R, qk_scale,
    TASK0, D: tl.constexpr, SHARED: tl.constexpr, TWO_V: tl.constexpr, IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # The head dim runs in two chunks: lanes [0, BLOCK_D0) (a power of two <= D) and, when D is not a
    # power of two (SPLIT), lanes [BLOCK_D0, BLOCK_D0 + BLOCK_D1) masked at D; without SPLIT the second
    # chunk is never loaded and compiles away. Scores are the sum of the two chunks' QK^T products; each
    # chunk has its own V tiles and output accumulators, so no MMA work goes to lanes past 16-rounding.
    pid_m = tl.program_id(0)
    kh = tl.program_id(1)
    task = tl.program_id(2) + TASK0
    kf = (kh // H).to(tl.int64)
    h = kh % H

    # Which q/k branch, which keys, which V branch(es) this task uses (arithmetic, not `if`, so every
    # variable keeps one type). Task 0 is branch 0 in both modes: own frame only.
    is_src = task == 0
    key_start = tl.where(is_src, kf * S, 0)
    n_keys = tl.where(is_src, S, K * S)
    if SHARED:
        qk_b = task * 0
        if TWO_V:  # task t >= 1 owns branches 2t - 1 and 2t
            va = tl.maximum(2 * task - 1, 0)
        else:
            va = task
    else:
        qk_b = task
        va = task
    vb = va + 1
    vb_keys = tl.where(vb < R, n_keys, 0)  # an odd last pair has no second V: load nothing, store nothing
    vb_rows = tl.where(vb < R, S, 0)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    offs_d0 = tl.arange(0, BLOCK_D0)
    d0_ok = offs_d0 < D
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    d1_ok = offs_d1 < D
    offs_n = tl.arange(0, BLOCK_N)

    q_off = (qk_b.to(tl.int64) * K + kf) * S * C + h * D
    q0 = tl.load(q_ptr + q_off + rows[:, None] * C + offs_d0[None, :], mask=row_ok[:, None] & d0_ok[None, :], other=0.0)
    if SPLIT:
        q1 = tl.load(q_ptr + q_off + rows[:, None] * C + offs_d1[None, :], mask=row_ok[:, None] & d1_ok[None, :], other=0.0)
    k_base = k_ptr + (qk_b.to(tl.int64) * K * S + key_start) * C + h * D
    va_base = v_ptr + (va.to(tl.int64) * K * S + key_start) * C + h * D
    vb_base = v_ptr + (vb.to(tl.int64) * K * S + key_start) * C + h * D

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    acc_b0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    acc_a1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    acc_b1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    for n0 in range(0, n_keys, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < n_keys
        # K tiles loaded row-major ([BLOCK_N, BLOCK_D*], contiguous along d), transposed in registers.
        kt0 = tl.trans(tl.load(k_base + cols[:, None] * C + offs_d0[None, :], mask=col_ok[:, None] & d0_ok[None, :], other=0.0))
        if IS_FP32:
            qk = tl.dot(q0, kt0, input_precision="ieee")
        else:
            qk = tl.dot(q0, kt0)
        if SPLIT:
            kt1 = tl.trans(tl.load(k_base + cols[:, None] * C + offs_d1[None, :],
                    mask=col_ok[:, None] & d1_ok[None, :], other=0.0))
            if IS_FP32:
                qk = tl.dot(q1, kt1, qk, input_precision="ieee")
            else:
                qk = tl.dot(q1, kt1, qk)
        # Padded key columns are -inf (their probability is exactly 0); the first tile always holds a real key.
        qk = tl.where(col_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        va_rows = va_base + cols[:, None] * C
        v_a0 = tl.load(va_rows + offs_d0[None, :], mask=col_ok[:, None] & d0_ok[None, :], other=0.0)
        p_v = p.to(v_a0.dtype)
        if IS_FP32:
            acc_a0 = tl.dot(p_v, v_a0, acc_a0 * alpha[:, None], input_precision="ieee")
        else:
            acc_a0 = tl.dot(p_v, v_a0, acc_a0 * alpha[:, None])
        if SPLIT:
            v_a1 = tl.load(va_rows + offs_d1[None, :], mask=col_ok[:, None] & d1_ok[None, :], other=0.0)
            if IS_FP32:
                acc_a1 = tl.dot(p_v, v_a1, acc_a1 * alpha[:, None], input_precision="ieee")
            else:
                acc_a1 = tl.dot(p_v, v_a1, acc_a1 * alpha[:, None])
        if TWO_V:
            vb_ok = cols < vb_keys
            vb_rows_p = vb_base + cols[:, None] * C
            v_b0 = tl.load(vb_rows_p + offs_d0[None, :], mask=vb_ok[:, None] & d0_ok[None, :], other=0.0)
            if IS_FP32:
                acc_b0 = tl.dot(p_v, v_b0, acc_b0 * alpha[:, None], input_precision="ieee")
            else:
                acc_b0 = tl.dot(p_v, v_b0, acc_b0 * alpha[:, None])
            if SPLIT:
                v_b1 = tl.load(vb_rows_p + offs_d1[None, :], mask=vb_ok[:, None] & d1_ok[None, :], other=0.0)
                if IS_FP32:
                    acc_b1 = tl.dot(p_v, v_b1, acc_b1 * alpha[:, None], input_precision="ieee")
                else:
                    acc_b1 = tl.dot(p_v, v_b1, acc_b1 * alpha[:, None])

    inv_l = 1.0 / l_i
    o_rows = rows[:, None] * C
    oa = o_ptr + (va.to(tl.int64) * K + kf) * S * C + h * D + o_rows
    tl.store(oa + offs_d0[None, :], (acc_a0 * inv_l[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d0_ok[None, :])
    if SPLIT:
        tl.store(oa + offs_d1[None, :], (acc_a1 * inv_l[:, None]).to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d1_ok[None, :])
    if TWO_V:
        ob = o_ptr + (vb.to(tl.int64) * K + kf) * S * C + h * D + o_rows
        ob_ok = rows < vb_rows
        tl.store(ob + offs_d0[None, :], (acc_b0 * inv_l[:, None]).to(o_ptr.dtype.element_ty),
            mask=ob_ok[:, None] & d0_ok[None, :])
        if SPLIT:
            tl.store(ob + offs_d1[None, :], (acc_b1 * inv_l[:, None]).to(o_ptr.dtype.element_ty),
                mask=ob_ok[:, None] & d1_ok[None, :])


def block_d(d: int) -> int:
    """The head dim padded to a power of two: the GPU_CONFIGS key (the kernel itself runs `d_chunks(d)`)."""
    return max(16, triton.next_power_of_2(d))


def d_chunks(d: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): the largest power of two <= d (at least 16), then the rest padded to a power of
    two >= 16, or 0 when one chunk covers d. 40 -> 32 + 16, 64 -> 64, 80 -> 64 + 16, 160 -> 128 + 32."""
    d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def chunk_constexprs(d: int) -> dict:
    """The kernel's head-dim constexprs for head dim d (BLOCK_D1 is a 16-lane dummy when not SPLIT)."""
    d0, d1 = d_chunks(d)
    return dict(BLOCK_D0=d0, BLOCK_D1=max(d1, 16), SPLIT=d1 > 0)


def two_v_ok(d: int) -> bool:
    """Whether shared probabilities run two V's per program (see GPU_CONFIGS: not for d > 128)."""
    return block_d(d) <= 128


def pick_config(d: int, two_v: bool):
    if INTERPRET:
        return INTERPRET_CONFIG
    return GPU_CONFIGS[(block_d(d), two_v)]


def extended_attention(q, k, v, heads, *, shared_qk=False, scale=None, out=None, config=None):
    """Launch the kernel; inputs as `tokenflow.ops.extended_attention`, already validated.

    Made contiguous here (a copy only when not). Returns out [R, K, S, C] in v's dtype (`out` may be given).
    One launch without shared_qk (all branches); with shared_qk two: branch 0, then the pairs of branches >= 1.
    """
    R, K, S, C = v.shape
    d = C // heads
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} > {MAX_HEAD_DIM} is not supported by the triton kernel")
    scale = d ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if out is None:
        out = torch.empty(R, K, S, C, dtype=v.dtype, device=v.device)
    common = dict(IS_FP32=v.dtype == torch.float32, **chunk_constexprs(d))
    args = (q, k, v, out, S, K, heads, C, R, scale * LOG2E)

    def launch(task0, n_tasks, two_v):
        BM, BN, warps, stages = config or pick_config(d, two_v)
        grid = (triton.cdiv(S, BM), K * heads, n_tasks)
        _ext_attn_kernel[grid](*args, task0, D=d, SHARED=shared_qk, TWO_V=two_v, BLOCK_M=BM, BLOCK_N=BN,
                               num_warps=warps, num_stages=stages, **common)

    if not shared_qk or not two_v_ok(d):
        launch(0, R, False)
    else:
        launch(0, 1, False)
        if R > 1:
            launch(1, math.ceil((R - 1) / 2), True)
    return out


def sm90_signature(dtype: str = "fp16") -> dict:
    """Argument types of `_ext_attn_kernel` for `tokenflow.kernels.propagate.sm90_report`."""
    return {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "o_ptr": f"*{dtype}",
            "S": "i32", "K": "i32", "H": "i32", "C": "i32", "R": "i32", "qk_scale": "fp32", "TASK0": "i32"}

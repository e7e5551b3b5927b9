"""The `cpu` backend (csrc/propagate_cpu.cpp through tokenflow._C) against the PyTorch reference.

Shapes are chosen to hit the kernel's edges: S not a multiple of the micro-tile (rows or candidates), a
single keyframe, frames with which = -1, C of 32 / 33 / 40 / 320, all-negative similarities, J = 0.
Indices are checked against the float64 truth and outputs against the float64 blend of the kernel's own
indices, with the cpu backend's tolerances (tests/opcheck.py, tokenflow.ops.accuracy).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from opcheck import assert_close, assert_indices, best_similarity, blend, exact_features, similarity, tolerance
from opcheck import propagate_inputs
from tokenflow.ops import backends, cosine_argmax, propagate, reference

pytestmark = pytest.mark.skipif(backends.why_unavailable("cpu") is not None,
                                reason=f"cpu backend unavailable: {backends.why_unavailable('cpu')}")

# (F, K, S, C, J, R)
SHAPES = [
    (3, 2, 37, 40, 2, 3),    # S below one micro-tile of candidates; C = 40 not a multiple of 16
    (2, 1, 100, 32, 1, 1),   # one keyframe
    (4, 3, 257, 320, 2, 3),  # S = 256 + 1: a one-candidate last panel, one-row last micro-row
    (1, 1, 1, 32, 1, 2),     # S = 1
    (5, 3, 130, 40, 3, 2),   # J = 3
    (9, 2, 97, 320, 2, 3),   # more units than threads, ragged everything
    (3, 2, 150, 33, 2, 2),   # odd C: the bf16 dot-product path pads the last channel pair
]


make = functools.partial(propagate_inputs, none_rate=0.25)


def assert_indices_match(x, key_feats, which, got, exact: bool):
    """Indices reach the float64 best to float32 rounding (`exact`) or to half-precision rounding."""
    assert_indices(x, key_feats, which, got, tolerance("cpu", "cosine_argmax", torch.float32 if exact else torch.float16))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "F{}K{}S{}C{}J{}R{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cosine_argmax_matches_reference(shape, dtype):
    x, key_feats, _, which, _, _ = make(*shape, dtype)
    got = cosine_argmax(x, key_feats, which, backend="cpu")
    assert_indices_match(x, key_feats, which, got, exact=dtype == torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "F{}K{}S{}C{}J{}R{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
def test_propagate_matches_reference(shape, dtype, with_residual):
    x, key_feats, key_out, which, weights, residual = make(*shape, dtype, seed=1)
    residual = residual if with_residual else None
    got = propagate(x, key_feats, key_out, which, weights, residual, backend="cpu")
    want = reference.propagate(x, key_feats, key_out, which, weights, residual)
    assert got.dtype == key_out.dtype and got.shape == want.shape
    idx = cosine_argmax(x, key_feats, which, backend="cpu")
    # The blend of the kernel's own indices, computed in float64.
    assert_close(got, blend(key_out, which, weights, residual, idx), tolerance("cpu", "propagate", dtype))
    if dtype == torch.float32:
        agree = (idx == reference.cosine_argmax(x, key_feats, which)).all(dim=(1, 2))
        # Frames whose indices all agree give the reference's output to float32 rounding.
        assert_close(got[:, agree], want[:, agree], tolerance("cpu", "propagate", dtype))


def test_all_negative_similarities():
    # Every similarity is negative: padded (zero) candidates of the last panel must never win.
    F_, K, S, C = 3, 2, 45, 40
    g = torch.Generator().manual_seed(3)
    key_feats = torch.rand(K, S, C, generator=g) + 0.1
    x = -(torch.rand(F_, S, C, generator=g) + 0.1)
    which = torch.tensor([[0, 1], [1, -1], [1, 0]])
    got = cosine_argmax(x, key_feats, which, backend="cpu")
    assert_indices_match(x, key_feats, which, got, exact=True)
    assert (similarity(x, key_feats, which, got)[which >= 0] < 0).all()


def test_ties_go_to_the_lowest_index():
    # Duplicate candidates: torch.argmax returns the first, so must the kernel, across panels and lanes. The
    # features make every score exact in any summation order, so ties (planted, and between the five base
    # tokens' integer scores) are exact ties everywhere and the float64 argmax is the answer.
    S, C = 70, 32
    g = torch.Generator().manual_seed(4)
    base = exact_features(1, 5, C, g)[0]
    key_feats = base[torch.arange(S) % 5].unsqueeze(0)  # candidate t equals candidate t % 5
    x = exact_features(2, S, C, g)
    which = torch.tensor([[0], [0]])
    got = cosine_argmax(x, key_feats, which, backend="cpu")
    _, want = best_similarity(x, key_feats, which)
    assert (want < 5).all()
    assert torch.equal(got, want)
    assert torch.equal(reference.cosine_argmax(x, key_feats, which), want)


def test_frames_without_keyframes_get_the_residual():
    x, key_feats, key_out, which, weights, residual = make(3, 2, 40, 32, 2, 2, torch.float32)
    which[1] = -1
    out = propagate(x, key_feats, key_out, which, weights, residual, backend="cpu")
    torch.testing.assert_close(out[:, 1], residual[:, 1], atol=0, rtol=0)
    out0 = propagate(x, key_feats, key_out, which, weights, None, backend="cpu")
    assert (out0[:, 1] == 0).all()


def test_no_candidates_at_all():
    # J = 0: out is the residual; no keyframe is read.
    x, key_feats, key_out, _, _, residual = make(2, 1, 33, 32, 1, 2, torch.float32)
    which = torch.empty(2, 0, dtype=torch.long)
    weights = torch.empty(2, 0)
    out = propagate(x, key_feats, key_out, which, weights, residual, backend="cpu")
    torch.testing.assert_close(out, residual, atol=0, rtol=0)
    assert cosine_argmax(x, key_feats, which, backend="cpu").shape == (2, 0, 33)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_output_element_is_written(dtype):
    # Output and index buffers poisoned with NaN / -7 before the kernel: none may survive.
    from tokenflow import _C
    from tokenflow.ops.backend_cpu import DTYPE_CODES

    F_, K, S, C, J, R = 4, 2, 77, 40, 2, 3
    x, key_feats, key_out, which, weights, residual = make(F_, K, S, C, J, R, dtype, seed=5)
    which[0, 1] = -1
    out = torch.full((R, F_, S, C), float("nan"), dtype=dtype)
    idx = torch.full((F_, J, S), -7, dtype=torch.int64)
    w32 = weights.float().contiguous()
    _C.propagate_cpu(x.data_ptr(), key_feats.data_ptr(), key_out.data_ptr(), which.data_ptr(), w32.data_ptr(),
                     residual.data_ptr(), out.data_ptr(), idx.data_ptr(), F_, J, K, R, S, C,
                     DTYPE_CODES[dtype], DTYPE_CODES[dtype], DTYPE_CODES[dtype], 2)
    assert not out.isnan().any()
    assert (idx >= 0).all()
    assert_close(out, blend(key_out, which, weights, residual, idx), tolerance("cpu", "propagate", dtype))


def test_mixed_dtypes_and_threads():
    # bf16 features with float32 outputs and a float16 residual; thread count does not change the result.
    x, key_feats, key_out, which, weights, residual = make(3, 2, 50, 40, 2, 2, torch.bfloat16, seed=6)
    key_out = key_out.float()
    residual = residual.half()
    got = propagate(x, key_feats, key_out, which, weights, residual, backend="cpu")
    assert got.dtype == torch.float32
    idx = cosine_argmax(x, key_feats, which, backend="cpu")
    assert_close(got, blend(key_out, which, weights, residual, idx), tolerance("cpu", "propagate", torch.float32))
    threads = torch.get_num_threads()  # the test command runs with one thread: compare 1 with 3 explicitly
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(propagate(x, key_feats, key_out, which, weights, residual, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], got) and torch.equal(results[1], got)


def test_non_contiguous_inputs_are_handled():
    x, key_feats, key_out, which, weights, residual = make(3, 2, 41, 32, 2, 2, torch.float32, seed=7)
    want = propagate(x, key_feats, key_out, which, weights, residual, backend="cpu")
    # The same values behind strided views: transposed storage, and a slice of a wider tensor.
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    ko = torch.cat([key_out, key_out], dim=-1)[..., :32]
    wt = weights.t().contiguous().t()
    assert not (xt.is_contiguous() or ko.is_contiguous() or wt.is_contiguous())
    got = propagate(xt, key_feats, ko, which, wt, residual, backend="cpu")
    assert torch.equal(got, want)


class _NoKernel:
    """Stands in for tokenflow._C: any kernel call fails the test (validation must come first)."""

    def __getattr__(self, name):
        raise AssertionError(f"the kernel ({name}) ran before validation rejected the inputs")


@pytest.fixture
def no_kernel(monkeypatch):
    import tokenflow.ops.backend_cpu as backend_cpu

    monkeypatch.setattr(backend_cpu, "_C", _NoKernel())
    return backend_cpu


def test_validation_runs_before_the_kernel(no_kernel):
    x, key_feats, key_out, which, weights, residual = make(2, 2, 20, 32, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        propagate(x.to(torch.int32), key_feats, key_out, which, weights, residual, backend="cpu")
    with pytest.raises(ValueError, match="differ"):
        propagate(x[:, :10], key_feats, key_out, which, weights, residual, backend="cpu")
    with pytest.raises(ValueError, match="key_out"):
        propagate(x, key_feats, key_out[:, :1], which, weights, residual, backend="cpu")
    with pytest.raises(ValueError, match="residual"):
        propagate(x, key_feats, key_out, which, weights, residual[:, :1], backend="cpu")
    with pytest.raises(ValueError, match="which"):
        propagate(x, key_feats, key_out, which + 5, weights, residual, backend="cpu")
    with pytest.raises(ValueError, match="weights"):
        propagate(x, key_feats, key_out, which, weights[:, :1], residual, backend="cpu")
    # Device: the declared capabilities refuse non-CPU tensors (meta tensors stand in for a GPU here).
    meta = {k: v.to("meta") for k, v in dict(x=x, key_feats=key_feats, key_out=key_out, which=which,
                                             weights=weights, residual=residual).items()}
    assert "meta" in backends.get("cpu").why_not("propagate", **meta)
    assert "CPU tensors" in backends.explain("cosine_argmax", x=meta["x"], key_feats=meta["key_feats"],
                                             which=meta["which"])["cpu"]


def test_raw_binding_checks_its_arguments():
    # The pointer-level entry point guards itself against callers other than backend_cpu.py.
    from tokenflow import _C

    x, key_feats, key_out, which, weights, residual = make(2, 2, 20, 32, 2, 1, torch.float32)
    idx = torch.empty(2, 2, 20, dtype=torch.int64)
    args = dict(x=x.data_ptr(), key_feats=key_feats.data_ptr(), key_out=0, which=which.data_ptr(), weights=0,
                residual=0, out=0, idx=idx.data_ptr(), F=2, J=2, K=2, R=0, S=20, C=32, feat_dtype=0, out_dtype=0,
                res_dtype=0, num_threads=1)
    _C.propagate_cpu(**args)  # well-formed: runs
    with pytest.raises(ValueError, match="dtype code"):
        _C.propagate_cpu(**{**args, "feat_dtype": 9})
    with pytest.raises(ValueError, match="outside"):
        _C.propagate_cpu(**{**args, "K": 1})  # which holds keyframe 1
    with pytest.raises(ValueError, match="non-null"):
        _C.propagate_cpu(**{**args, "x": 0})
    with pytest.raises(ValueError, match="nothing to compute"):
        _C.propagate_cpu(**{**args, "idx": 0})
    with pytest.raises(ValueError, match="S, C >= 1"):
        _C.propagate_cpu(**{**args, "C": 0})
    with pytest.raises(ValueError, match="non-null"):
        _C.propagate_cpu(**{**args, "out": residual.data_ptr(), "R": 1})  # out without key_out / weights


def test_cpu_backend_accepts_cpu_tensors():
    # `explain` is what `auto` consults: the cpu backend must accept every float dtype on CPU tensors.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, key_feats, key_out, which, weights, residual = make(2, 2, 20, 32, 2, 1, dtype)
        reasons = backends.explain("propagate", x=x, key_feats=key_feats, key_out=key_out, which=which,
                                   weights=weights, residual=residual)
        assert reasons["cpu"] is None, reasons
        assert "cuda" in reasons["cuda"] or "CUDA" in reasons["cuda"]


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


ISAS = ["generic", "avx2", "avx512", "avx512bf16"]


def test_widest_isa_is_dispatched():
    # The avx512bf16 variant (vdpbf16ps search for bf16 features) runs exactly where the CPU has it, unless
    # TOKENFLOW_CPU_ISA caps the choice (to run an AVX2-only machine's paths on a wider one).
    from tokenflow import _C

    info = _C.build_info()
    flags = _cpu_flags()
    cap = os.environ.get("TOKENFLOW_CPU_ISA") or "avx512bf16"
    if cap != "avx512bf16":
        assert ISAS.index(info["cpu_isa"]) <= ISAS.index(cap), (info["cpu_isa"], cap)
    elif "avx512bf16" in info["cpu_isas_built"].split(",") and {"avx512f", "avx512bw", "avx512vl", "avx512dq",
                                                                "avx512_bf16"} <= flags:
        assert info["cpu_isa"] == "avx512bf16"
    if info["cpu_isa"] == "avx512bf16" and "avx512_bf16" not in flags:
        pytest.fail(f"avx512bf16 variant chosen on a CPU without avx512_bf16: {sorted(flags)}")


def test_isa_cap_is_applied_and_checked():
    # In a fresh process (the choice is made once per process): a cap picks at most that variant; a bad
    # value is a clear error naming the variable.
    import subprocess
    import sys
    code = "from tokenflow import _C; print(_C.build_info()['cpu_isa'])"
    env = dict(os.environ, TOKENFLOW_CPU_ISA="generic")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "generic", r.stderr
    env["TOKENFLOW_CPU_ISA"] = "sse9"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "TOKENFLOW_CPU_ISA='sse9'" in r.stderr


@pytest.mark.parametrize("C", [1, 2, 31, 64, 641])
def test_bf16_search_channel_counts(C):
    # bf16 pairs of channels: every C parity, a single channel, more channels than one cache line.
    F_, K, S = 2, 2, 70
    x, key_feats, _, which, _, _ = make(F_, K, S, C, 2, 1, torch.bfloat16, seed=C, none_rate=0.0)
    got = cosine_argmax(x, key_feats, which, backend="cpu")
    assert_indices_match(x, key_feats, which, got, exact=False)
    # On the bf16 values themselves the search is float32-exact (bf16 products are exact in float32).
    assert_indices_match(x.float(), key_feats.float(), which, got, exact=True)


def test_bf16_ties_go_to_the_lowest_index():
    S, C = 70, 32
    g = torch.Generator().manual_seed(8)
    base = exact_features(1, 5, C, g)[0]
    key_feats = base[torch.arange(S) % 5].unsqueeze(0).bfloat16()
    x = exact_features(2, S, C, g).bfloat16()
    which = torch.tensor([[0], [0]])
    got = cosine_argmax(x, key_feats, which, backend="cpu")
    assert (got < 5).all()
    assert torch.equal(got, best_similarity(x, key_feats, which)[1])
    assert torch.equal(got, cosine_argmax(x.float(), key_feats.float(), which, backend="cpu"))


# -- the bf16 pre-search for float32/float16 features (csrc/propagate_cpu.cpp, propagate_presearch) ----------
# It must give the float32 search's indices and outputs bit for bit: it only decides which candidates the
# float32 similarity is computed for. Each case also checks, through the kernel's counters, that the
# branch it is about (rescoring, or the float32 fallback of an overflowing window) really ran.

def _native(x, key_feats, key_out, which, weights, presearch):
    from tokenflow import _C
    from tokenflow.ops.backend_cpu import DTYPE_CODES

    F_, S, C = x.shape
    R, K = key_out.shape[:2]
    idx = torch.empty(F_, which.shape[1], S, dtype=torch.int64)
    out = torch.empty(R, F_, S, C, dtype=key_out.dtype)
    stats = torch.zeros(3, dtype=torch.int64)
    w32 = weights.float().contiguous()
    _C.propagate_cpu(x.data_ptr(), key_feats.data_ptr(), key_out.data_ptr(), which.data_ptr(), w32.data_ptr(),
                     0, out.data_ptr(), idx.data_ptr(), F_, which.shape[1], K, R, S, C,
                     DTYPE_CODES[x.dtype], DTYPE_CODES[key_out.dtype], 0, 2,
                     presearch=presearch, stats=stats.data_ptr())
    return idx, out, stats.tolist()


def _presearch_cases():
    g = torch.Generator().manual_seed(21)
    S, C = 300, 64
    base = torch.randn(C, generator=g)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, k = rnd(3, S, C), rnd(2, S, C)
    # A smooth field over a 16x20 grid, frames shifted and noisy: near-duplicate tokens, as in video.
    field = torch.nn.functional.interpolate(rnd(2, C, 4, 5), size=(15, 20), mode="bicubic", align_corners=False)
    field = field.flatten(2).transpose(1, 2).contiguous()
    frames = torch.roll(field[[0, 1, 0]], shifts=1, dims=1) + 0.05 * rnd(3, S, C)
    # Clusters of 6 candidates closer than bf16 resolves (1e-3 relative): the bf16 winner is a guess among
    # them, and only a window of the right width finds the float32 one.
    centres = rnd(2, 50, C)
    clustered = (centres.repeat_interleave(6, dim=1) * (1 + 1e-3 * rnd(2, S, C))).contiguous()
    near = centres[[0, 1, 0]].repeat_interleave(6, dim=1) + 0.3 * rnd(3, S, C)
    # Candidates 0-31 nearly one vector (they fill a row's window), candidate 40 the best match: the window
    # must be compacted when 40 arrives, keeping the best and dropping what it rules out.
    full = rnd(2, S, C)
    full[:, :32] = base + 0.3 * rnd(C) + 1e-4 * rnd(2, 32, C)
    full[:, 40] = base
    return {  # name: (x, key_feats, the counter that must be non-zero: 1 rescored, 2 fell back)
        "full window, then a better candidate": (base + 0.5 * rnd(3, S, C), full, 1),
        "random": (x, k, 1),
        "clustered below bf16 resolution": (near, clustered, 1),
        "video-like": (frames, field, 1),
        "random C=33": (rnd(3, 77, 33), rnd(2, 77, 33), 1),
        "near-identical candidates": (base + 1e-4 * rnd(3, S, C), base + 1e-4 * rnd(2, S, C), 2),
        "identical candidates": (x, base.expand(2, S, C).contiguous(), 2),
        "huge query": (x * 1e25, k, 1),
        "denormal query": (x * 1e-39, k, 2),
        "denormal candidates": (x, k * 1e-39, 1),
        "scales 1e-30..1e30": (x * torch.logspace(-30, 30, C), k, 2),
        "quantised, exact ties": ((rnd(3, S, C) * 4).round() / 4, (rnd(2, S, C) * 2).round() / 2, 1),
        "C=1": (rnd(3, S, 1), rnd(2, S, 1), 2),
    }


@pytest.fixture(scope="module")
def presearch_active():
    from tokenflow import _C

    if _C.build_info()["cpu_isa"] != "avx512bf16":
        pytest.skip("the bf16 pre-search needs a CPU with AVX512-BF16 (vdpbf16ps)")


_FLOAT32_ONLY = {"huge query", "denormal query", "denormal candidates", "scales 1e-30..1e30"}  # inf / 0 in fp16


@pytest.mark.parametrize("case,dtype", [(c, d) for c in _presearch_cases() for d in (torch.float32, torch.float16)
                                        if d == torch.float32 or c not in _FLOAT32_ONLY],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_presearch_equals_float32_search(presearch_active, case, dtype):
    x, key_feats, counter = _presearch_cases()[case]
    x, key_feats = x.to(dtype), key_feats.to(dtype)
    F_, S, C = x.shape
    g = torch.Generator().manual_seed(5)
    key_out = torch.randn(2, 2, S, C, generator=g)
    which = torch.tensor([[1, 0], [0, -1], [1, 1]])
    weights = torch.rand(3, 2, generator=g)
    idx, out, stats = _native(x, key_feats, key_out, which, weights, presearch=True)
    idx32, out32, none = _native(x, key_feats, key_out, which, weights, presearch=False)
    assert none == [0, 0, 0]
    assert stats[0] == F_ * S * 2 - S  # every row of every (frame, keyframe) pair but the which = -1 one
    assert stats[counter] > 0, f"the branch under test did not run: {stats}"
    assert torch.equal(idx, idx32)
    assert torch.equal(out, out32)


def test_presearch_flag_is_read_per_call(presearch_active, monkeypatch):
    # TOKENFLOW_CPU_PRESEARCH=0 selects the float32 search alone; both give the same indices.
    x, key_feats, _ = _presearch_cases()["random"]
    which = torch.tensor([[0, 1]] * 3)
    on = cosine_argmax(x, key_feats, which, backend="cpu")
    monkeypatch.setenv("TOKENFLOW_CPU_PRESEARCH", "0")
    from tokenflow.ops.backend_cpu import presearch_enabled

    assert not presearch_enabled()
    assert torch.equal(on, cosine_argmax(x, key_feats, which, backend="cpu"))

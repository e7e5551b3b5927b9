"""`tokenflow.ops.propagate` / `cosine_argmax` on every loaded backend against the PyTorch reference.

Without a GPU the `triton` backend runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET):
shapes are tiny but awkward (S not a multiple of the 32 / 64 / 128 tiles, one keyframe, which = -1,
C of 32 / 40 / 320). A backend that refuses an input (wrong device, dtype) is skipped with its reason.
Indices are checked against the float64 truth with the dtype's tolerance (tests/opcheck.py: at a near-tie
either index is right, since summation order differs between correct backends). Outputs are checked in
float64 against the formula applied to the backend's own indices, so a gather-blend bug cannot hide behind
a search bug.
"""
from __future__ import annotations


import pytest
import torch

import tokenflow.ops as ops
from opcheck import assert_close, assert_indices, blend, exact_features, tolerance, use
from opcheck import attention_inputs
from opcheck import propagate_inputs as make
from sm90 import run_sm90
from tokenflow.ops import backends, reference

BACKENDS = ops.available()
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (F, K, S, C, J, R)
SHAPES = [
    (3, 2, 37, 40, 2, 3),   # S below one tile; C = 40 not a multiple of the channel slice
    (2, 1, 70, 32, 1, 2),   # one keyframe; S = 64 + 6
    (2, 2, 45, 320, 2, 3),  # C = 320 (the 64x64 level's width)
    (1, 1, 1, 32, 1, 1),    # S = 1
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"F{s[0]}K{s[1]}S{s[2]}C{s[3]}J{s[4]}R{s[5]}" for s in SHAPES])
@pytest.mark.parametrize("negative", [False, True], ids=["randn", "allneg"])
def test_cosine_argmax_matches_reference(backend, dtype, shape, negative):
    x, key_feats, _, which, _, _ = make(*shape, dtype, negative=negative)
    use(backend, "cosine_argmax", x=x, key_feats=key_feats, which=which)
    got = ops.cosine_argmax(x, key_feats, which, backend=backend)
    assert_indices(x, key_feats, which, got, tolerance(backend, "cosine_argmax", dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"F{s[0]}K{s[1]}S{s[2]}C{s[3]}J{s[4]}R{s[5]}" for s in SHAPES])
@pytest.mark.parametrize("with_residual", [True, False], ids=["res", "nores"])
def test_propagate_matches_reference(backend, dtype, shape, with_residual):
    x, key_feats, key_out, which, weights, residual = make(*shape, dtype, seed=1, negative=with_residual)
    residual = residual if with_residual else None
    use(backend, "propagate", x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights,
        residual=residual)
    out = ops.propagate(x, key_feats, key_out, which, weights, residual, backend=backend)
    assert out.dtype == key_out.dtype and out.shape == (shape[5], shape[0], shape[2], shape[3])
    assert not out.isnan().any()
    idx = ops.cosine_argmax(x, key_feats, which, backend=backend)
    assert_indices(x, key_feats, which, idx, tolerance(backend, "cosine_argmax", dtype))
    assert_close(out, blend(key_out, which, weights, residual, idx), tolerance(backend, "propagate", dtype))
    if dtype == torch.float32:  # frames whose indices agree with the reference's give its output
        agree = (idx.cpu() == reference.cosine_argmax(x, key_feats, which).cpu()).all(dim=(1, 2))
        want = reference.propagate(x, key_feats, key_out, which, weights, residual)
        torch.testing.assert_close(out[:, agree], want[:, agree])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tokenflow_groups_and_self_propagation(backend, dtype):
    """Two groups of B = 3 as the editor lays them out: group 0 has no previous keyframe (which = -1);
    frames identical to their keyframe must find themselves (idx = s) and copy its outputs."""
    B, K, S, C, R = 3, 2, 41, 40, 3
    x, key_feats, key_out, _, _, residual = make(B * K, K, S, C, 2, R, dtype, seed=2)
    which = torch.tensor([[0, -1]] * B + [[1, 0]] * B)
    weights = torch.tensor([[1.0, 0.0]] * B + [[0.7, 0.3]] * B)
    x[1], x[B + 2] = key_feats[0], key_feats[1]  # frame 1 is keyframe 0, frame 5 is keyframe 1
    use(backend, "propagate", x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights,
        residual=residual)
    idx = ops.cosine_argmax(x, key_feats, which, backend=backend)
    ar = torch.arange(S)
    assert torch.equal(idx[1, 0].cpu(), ar) and torch.equal(idx[B + 2, 0].cpu(), ar)
    assert (idx[:B, 1] == 0).all()
    out = ops.propagate(x, key_feats, key_out, which, weights, None, backend=backend)
    torch.testing.assert_close(out[:, 1], key_out[:, 0])  # weight 1 on its own keyframe, nothing else
    out = ops.propagate(x, key_feats, key_out, which, weights, residual, backend=backend)
    assert_close(out, blend(key_out, which, weights, residual, idx), tolerance(backend, "propagate", dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_ties_resolve_to_the_lowest_index(backend, dtype):
    """Exact duplicate candidates, in the same tile and in later tiles: the lowest index wins (torch.argmax).
    The features make every score exact in any summation order (opcheck.exact_features), so duplicates
    tie exactly on every machine and the rule, not the rounding, decides."""
    S, C = 150, 40
    key_feats = exact_features(1, S, C, torch.Generator().manual_seed(6))
    key_feats[0, 5] = key_feats[0, 3]                 # within one tile
    key_feats[0, 100:150] = key_feats[0, 0:50]        # 100 and more: in later tiles of every tile size
    assert len(torch.unique(key_feats[0, :100], dim=0)) == 99  # no tie but the planted ones
    x = key_feats.clone().to(dtype)
    key_feats = key_feats.to(dtype)
    which = torch.tensor([[0]])
    use(backend, "cosine_argmax", x=x, key_feats=key_feats, which=which)
    idx = ops.cosine_argmax(x, key_feats, which, backend=backend)[0, 0].cpu()
    want = torch.arange(S)
    want[5], want[100:150] = 3, torch.arange(50)
    want[want == 5] = 3
    assert torch.equal(idx, want), (idx != want).nonzero().flatten().tolist()


# --- the triton launcher itself: poisoned outputs, no stray writes ---------------------------------------

triton_only = pytest.mark.skipif("triton" not in BACKENDS, reason=f"triton backend: {backends.why_unavailable('triton')}")


@triton_only
@pytest.mark.parametrize("residual", [True, False])
def test_triton_launcher_writes_every_output(residual):
    from tokenflow.kernels import propagate as kprop
    F_, K, S, C, J, R = 3, 2, 37, 40, 2, 3
    x, key_feats, key_out, which, weights, res = make(F_, K, S, C, J, R, torch.float32, seed=3, unambiguous=True)
    if not kprop.INTERPRET:
        x, key_feats, key_out, which, weights, res = (t.cuda() for t in (x, key_feats, key_out, which, weights, res))
    out = torch.full((R, F_, S, C), float("nan"), device=x.device)
    idx = torch.full((F_, J, S), -7, dtype=torch.int64, device=x.device)
    kprop.propagate(x, key_feats, which, key_out, weights, res if residual else None, out=out, idx=idx)
    assert not out.isnan().any() and (idx >= 0).all()
    torch.testing.assert_close(out.cpu(), reference.propagate(x, key_feats, key_out, which, weights,
                                                              res if residual else None).cpu())


@triton_only
def test_triton_propagate_keeps_indices_in_registers():
    """return_idx=False: no index buffer at all (the epilogue uses the indices the program holds), same
    output; with J = 3 and 5 the in-register index tile is wider than J (BLOCK_J = 4, 8)."""
    from tokenflow.kernels import propagate as kprop
    for F_, K, S, C, J, R in [(3, 2, 37, 40, 2, 3), (2, 3, 33, 32, 3, 2), (2, 2, 20, 32, 5, 1)]:
        x, key_feats, key_out, which, weights, res = make(F_, K, S, C, J, R, torch.float32, seed=7, unambiguous=True)
        if not kprop.INTERPRET:
            x, key_feats, key_out, which, weights, res = (t.cuda() for t in (x, key_feats, key_out, which, weights, res))
        out, idx = kprop.propagate(x, key_feats, which, key_out, weights, res, return_idx=False)
        assert idx is None
        torch.testing.assert_close(out.cpu(), reference.propagate(x, key_feats, key_out, which, weights, res).cpu())


@triton_only
def test_triton_backend_declares_what_it_runs():
    from tokenflow.ops.backend_triton import INTERPRET
    b = backends.get("triton")
    x, key_feats, key_out, which, weights, _ = make(2, 1, 8, 32, 1, 1, torch.bfloat16)
    reason = b.why_not("propagate", x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights,
                       residual=None)
    if INTERPRET:
        assert "TRITON_INTERPRET=1" in b.why_not_auto()  # auto dispatch never chooses the interpreter
        assert "bfloat16" in reason
        x32 = x.float()
        assert backends.choose("cosine_argmax", None, x=x32, key_feats=key_feats.float(), which=which).name != "triton"
    else:
        assert "TRITON_INTERPRET is not set" in reason and "cpu" in reason


def test_validation_names_shapes_before_any_launch(monkeypatch):
    """Wrong shapes / dtypes / devices raise ValueError naming them, and no backend runs."""
    def boom(*a, **k):
        raise AssertionError("a backend ran on invalid inputs")
    monkeypatch.setattr(backends, "choose", boom)
    x, key_feats, key_out, which, weights, residual = make(2, 2, 10, 32, 2, 3, torch.float32)
    cases = [
        (dict(x=x[:, :, :16]), r"\(2, 10, 16\)"),                     # C mismatch with key_feats
        (dict(key_out=key_out[:, :1]), r"\(3, 1, 10, 32\)"),          # key_out for another K
        (dict(weights=weights[:, :1]), r"\(2, 1\)"),                  # weights vs which
        (dict(residual=residual[:2]), r"\(2, 2, 10, 32\)"),           # residual for another R
        (dict(which=which.float()), r"torch.float32"),                # which must be integer
        (dict(which=which + 5), r"outside \[-1, 1\]"),                # keyframe index out of range
        (dict(x=x.to(torch.int32)), r"torch.int32"),                  # integer features
        (dict(x=x.to("meta")), r"different devices"),                 # device mismatch
    ]
    base = dict(x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights, residual=residual)
    for change, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ops.propagate(**{**base, **change})
    with pytest.raises(ValueError, match=r"\(2, 10, 32\).*\(2, 10, 16\)"):
        ops.cosine_argmax(x, key_feats[:, :, :16], which)


def test_torch_compile_traces_the_ops_without_graph_breaks():
    backend = "triton" if "triton" in BACKENDS else "torch"
    x, key_feats, key_out, which, weights, residual = make(2, 2, 12, 32, 2, 3, torch.float32, seed=4, unambiguous=True)
    if backends.explain("propagate", x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights,
                        residual=residual)[backend]:
        backend = "torch"

    def f(x, residual):
        idx = torch.ops.tokenflow.cosine_argmax(x, key_feats, which, backend)
        out = torch.ops.tokenflow.propagate(x * 2, key_feats, key_out, which, weights, residual, backend)
        return out + 1, idx

    explanation = torch._dynamo.explain(f)(x, residual)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out, idx = compiled(x, residual)
    torch.testing.assert_close(out, reference.propagate(x * 2, key_feats, key_out, which, weights, residual) + 1)
    assert torch.equal(idx, reference.cosine_argmax(x, key_feats, which))


# --- shipped GPU configs compile for sm_90 without a GPU -------------------------------------------------

SM90_SCRIPT = r"""
import json
from tokenflow.kernels import propagate as P
rows = []
for name, (BM, BN, BK, BC, warps, stages) in P.GPU_CONFIGS.items():
    for feat in (["fp32"] if name == "fp32" else ["fp16", "bf16"]):
        # propagate (indices kept in registers, not stored) and cosine_argmax (indices stored, no epilogue)
        for has_out, store_idx in ((True, False), (False, True)):
            # aligned pointers with S, C % 16 == 0 (every SD level), then the generic specialisation
            for divisible in (("S", "C"), ()):
                r = P.sm90_report(P._propagate_kernel, P.sm90_signature(feat),
                                  dict(IS_FP32=feat == "fp32", HAS_OUT=has_out, HAS_RES=has_out, STORE_IDX=store_idx,
                                       BLOCK_J=2, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_C=BC), warps, stages,
                                  divisible=divisible)
                rows.append(dict(config=name, dtype=feat, has_out=has_out, aligned=bool(divisible), **r))
print("JSON" + json.dumps(rows))
"""




def test_shipped_configs_compile_for_sm90_with_tensor_cores_and_no_spills():
    rows = run_sm90(SM90_SCRIPT)
    assert rows
    for row in rows:
        if row["dtype"] != "fp32":  # ieee fp32 is CUDA-core FMA by design
            assert any(m.startswith("wgmma") for m in row["mma"]), row
        assert row["spill_bytes"] == 0, row


# --- on a GPU: the real SD 2.1-base 512x512 levels -------------------------------------------------------

LEVELS = [(4096, 320), (1024, 640), (256, 1280), (64, 1280)]


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("S,C", LEVELS)
def test_propagate_at_sd21_levels_on_gpu(backend, dtype, S, C):
    B, K, R = 8, 5, 3
    x, key_feats, key_out, _, _, residual = make(B, K, S, C, 2, R, dtype, seed=5, device="cuda")
    which = torch.tensor([[3, 2]] * B, device="cuda")  # group 3: its keyframe and group 2's
    w = torch.tensor([0.622, 0.651, 0.679, 0.706, 0.731, 0.711, 0.697, 0.687], device="cuda")
    weights = torch.stack([w, 1 - w], 1)
    use(backend, "propagate", x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights,
        residual=residual)
    idx = ops.cosine_argmax(x, key_feats, which, backend=backend)
    want = reference.cosine_argmax(x, key_feats, which)
    sub = slice(0, 2)  # the float64 similarity check on two frames keeps the test fast
    assert_indices(x[sub], key_feats, which[sub], idx[sub], tolerance(backend, "cosine_argmax", dtype))
    out = ops.propagate(x, key_feats, key_out, which, weights, residual, backend=backend)
    want_out = reference.propagate(x, key_feats, key_out, which, weights, residual)
    same = (idx == want).all(dim=1)  # tokens whose indices agree must agree in output
    assert_close(out[:, same], want_out[:, same], tolerance(backend, "propagate", dtype))


def test_selfcheck_rejects_a_wrong_gpu_backend_and_accepts_the_reference():
    """The first-use check `auto` runs on CUDA inputs, exercised here on the CPU with planted bugs: wrong
    everywhere, wrong only with the large tiles (S >= 512), wrong only with shared Q/K."""
    from tokenflow.ops import selfcheck
    from tokenflow.ops.backends import Backend
    from tokenflow.ops.capabilities import OPS, Capabilities

    class Right(Backend):
        name = "right"
        caps = Capabilities(ops=OPS)
        extended_attention = staticmethod(reference.extended_attention)
        propagate = staticmethod(reference.propagate)
        cosine_argmax = staticmethod(reference.cosine_argmax)

    class Wrong(Right):
        name = "wrong"
        extended_attention = staticmethod(lambda q, k, v, heads, shared_qk=False, scale=None: v.clone())
        propagate = staticmethod(lambda *a, **kw: reference.propagate(*a, **kw) * 1.5)
        cosine_argmax = staticmethod(lambda x, kf, w: reference.cosine_argmax(x, kf, w).flip(-1))

    class WrongLargeTiles(Right):  # a bug only in the S >= 512 configuration
        name = "wrong_large"

        @staticmethod
        def propagate(x, *a, **kw):
            return reference.propagate(x, *a, **kw) + (1e-2 if x.shape[1] >= selfcheck.LARGE_S else 0)

        @staticmethod
        def cosine_argmax(x, kf, w):
            idx = reference.cosine_argmax(x, kf, w)
            return (idx + 1) % x.shape[1] if x.shape[1] >= selfcheck.LARGE_S else idx

    class WrongShared(Right):  # a bug only in the shared-probability kernel (Q/K injection)
        name = "wrong_shared"

        @staticmethod
        def extended_attention(q, k, v, heads, shared_qk=False, scale=None):
            out = reference.extended_attention(q, k, v, heads, shared_qk=shared_qk, scale=scale)
            return out.flip(0) if shared_qk else out

    def search(S, op):
        x, key_feats, key_out, which, weights, residual = make(2, 2, S, 32, 2, 3, torch.float32)
        inputs = dict(x=x, key_feats=key_feats, which=which)
        return inputs if op == "cosine_argmax" else dict(inputs, key_out=key_out, weights=weights, residual=residual)

    def attention(shared):
        q, k, v = attention_inputs(3, 2, 20, 2, 40, torch.float32, shared)
        return dict(q=q, k=k, v=v, heads=2, shared_qk=shared)

    for op in ("propagate", "cosine_argmax"):
        for S in (100, 1030):
            assert selfcheck.check(Wrong(), op, search(S, op)) is not None
            assert selfcheck.check(Right(), op, search(S, op)) is None
        assert selfcheck.check(WrongLargeTiles(), op, search(100, op)) is None
        assert selfcheck.check(WrongLargeTiles(), op, search(1030, op)) is not None
    for shared in (False, True):
        assert selfcheck.check(Wrong(), "extended_attention", attention(shared)) is not None
        assert selfcheck.check(Right(), "extended_attention", attention(shared)) is None
    assert selfcheck.check(WrongShared(), "extended_attention", attention(False)) is None
    assert selfcheck.check(WrongShared(), "extended_attention", attention(True)) is not None
    assert selfcheck.verified(Wrong(), "propagate", search(100, "propagate"))  # CPU inputs: the tests check them


def test_selfcheck_sizes_keep_the_kernel_configuration():
    """The check runs a small S of the call's configuration: the same size class (large tiles from
    S = 512 on, as kernels/propagate.py picks them) and the same S % 16 (Triton's divisibility
    specialisation); one check covers every S of a class."""
    from tokenflow.ops import selfcheck

    for S in (1, 63, 64, 65, 100, 511, 512, 1024, 4096, 4100):
        small = selfcheck.small_like(S, selfcheck.LARGE_S)
        assert small <= max(S, selfcheck.LARGE_S + 15) and small % 16 == S % 16
        assert (small >= selfcheck.LARGE_S) == (S >= selfcheck.LARGE_S)
    key = lambda S: selfcheck.check_shape("cosine_argmax", dict(  # noqa: E731
        x=torch.zeros(2, S, 32), key_feats=torch.zeros(2, S, 32), which=torch.zeros(2, 2, dtype=torch.long)))
    assert key(1024) == key(4096) != key(4100) and key(256) != key(1024)
    if "triton" in BACKENDS:
        from tokenflow.kernels import propagate as kprop
        configs = []
        for S in (selfcheck.LARGE_S - 1, selfcheck.LARGE_S):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(kprop, "INTERPRET", False)  # the GPU choice, asked without a GPU
                configs.append(kprop.pick_config(S, torch.float16))
        assert configs == [kprop.GPU_CONFIGS["small"], kprop.GPU_CONFIGS["large"]]

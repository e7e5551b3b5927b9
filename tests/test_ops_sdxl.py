"""The ops backends at SDXL's shapes: head dim 64 in 10 and 20 heads (C = 640, 1280), 4096 and 1024 tokens
per frame (its two attention levels at 1024 x 1024).

On the CPU the torch and cpu (C++) backends run at the full token counts, checked on a sample of query
tokens against float64 truths over all keys (a full float64 check would cost minutes): extended attention
against an explicit softmax, the search against the best float64 similarity within the dtype's tolerance
(tests/opcheck.py), the output against the blend of the backend's own indices. Triton runs in its
interpreter (no GPU) at SDXL's head layout with few tokens.
"""
from __future__ import annotations

import pytest
import torch

import tokenflow.ops as ops
from opcheck import tolerance
from tokenflow.ops import backends

# (S tokens per frame, C channels, heads, K keyframes) at 1024 x 1024; K kept small to bound CPU time.
LEVELS = [(4096, 640, 10, 1), (1024, 1280, 20, 2)]
IDS = [f"S{s}C{c}h{h}" for s, c, h, _ in LEVELS]
SAMPLE = 24  # query tokens checked per (branch, frame)


def accepts(name, op, **inputs):
    reason = backends.explain(op, **inputs)[name]
    if reason:
        pytest.skip(f"{name}: {reason}")


def sampled(S, g):
    return torch.randperm(S, generator=g)[:SAMPLE]


def naive_rows(q, k, v, heads, shared, r, f, rows):
    """Extended attention of query tokens `rows` of frame f, branch r: explicit float64 softmax."""
    R, K, S, C = v.shape
    d = C // heads
    qb = 0 if shared else r
    keys = k[qb, f:f + 1] if r == 0 else k[qb]
    vals = v[r, f:f + 1] if r == 0 else v[r]
    keys, vals = keys.reshape(-1, heads, d).double(), vals.reshape(-1, heads, d).double()
    qs = q[qb, f, rows].reshape(-1, heads, d).double()
    p = torch.softmax(torch.einsum("qhd,khd->hqk", qs, keys) * d ** -0.5, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, vals).reshape(len(rows), C)


def check_extended_attention(backend, S, C, heads, K, shared, g):
    R = 3
    q = torch.randn(1 if shared else R, K, S, C, generator=g)
    k = torch.randn(1 if shared else R, K, S, C, generator=g)
    v = torch.randn(R, K, S, C, generator=g)
    accepts(backend, "extended_attention", q=q, k=k, v=v, heads=heads, shared_qk=shared)
    out = ops.extended_attention(q, k, v, heads, shared_qk=shared, backend=backend)
    assert out.shape == v.shape and out.isfinite().all()
    for r in range(R):
        for f in range(K):
            rows = sampled(S, g)
            torch.testing.assert_close(out[r, f, rows].double(), naive_rows(q, k, v, heads, shared, r, f, rows),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", [n for n in ops.available() if n not in ("triton", "cuda")
                                     and "extended_attention" in backends.get(n).ops])
@pytest.mark.parametrize("S,C,heads,K", LEVELS, ids=IDS)
def test_extended_attention_at_sdxl_levels(backend, S, C, heads, K):
    check_extended_attention(backend, S, C, heads, K, shared=K == 1, g=torch.Generator().manual_seed(S))


@pytest.mark.skipif("triton" not in ops.available(), reason="triton not installed")
@pytest.mark.parametrize("C,heads", [(640, 10), (1280, 20)])
def test_triton_extended_attention_with_sdxl_heads(C, heads):
    from tokenflow.kernels.propagate import INTERPRET
    if not INTERPRET:
        pytest.skip("on a GPU the full-size GPU tests cover Triton")
    for shared in (False, True):
        check_extended_attention("triton", 9, C, heads, 2, shared, torch.Generator().manual_seed(C))


def check_propagate(backend, S, C, g, F_=2, K=2, R=3):
    x = torch.randn(F_, S, C, generator=g)
    key_feats = torch.randn(K, S, C, generator=g)
    key_out = torch.randn(R, K, S, C, generator=g)
    residual = torch.randn(R, F_, S, C, generator=g)
    which = torch.tensor([[1, 0], [0, -1]])[:F_]
    weights = torch.rand(F_, 2, generator=g)
    accepts(backend, "cosine_argmax", x=x, key_feats=key_feats, which=which)
    idx = ops.cosine_argmax(x, key_feats, which, backend=backend)
    assert idx.shape == (F_, 2, S) and idx.dtype == torch.int64
    xs = torch.nn.functional.normalize(x.double(), dim=-1)
    ks = torch.nn.functional.normalize(key_feats.double(), dim=-1)
    for f in range(F_):
        rows = sampled(S, g)
        for j in range(2):
            kf = int(which[f, j])
            if kf < 0:
                assert (idx[f, j] == 0).all()
                continue
            sims = xs[f, rows] @ ks[kf].T  # [SAMPLE, S]: every candidate of the keyframe
            got = sims.gather(1, idx[f, j, rows].unsqueeze(1)).squeeze(1)
            assert (sims.max(dim=1).values - got).max() <= tolerance(backend, "cosine_argmax", torch.float32).atol
    if "propagate" not in backends.get(backend).ops:
        return
    accepts(backend, "propagate", x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights,
            residual=residual)
    out = ops.propagate(x, key_feats, key_out, which, weights, residual, backend=backend)
    idx = ops.cosine_argmax(x, key_feats, which, backend=backend)
    for f in range(F_):
        rows = sampled(S, g)
        want = residual[:, f, rows].double().clone()
        for j in range(2):
            kf = int(which[f, j])
            if kf >= 0:
                want += weights[f, j].double() * key_out[:, kf, idx[f, j, rows]].double()
        torch.testing.assert_close(out[:, f, rows].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [n for n in ("torch", "cpu") if n in ops.available()])
@pytest.mark.parametrize("S,C", [(s, c) for s, c, _, _ in LEVELS], ids=IDS)
def test_search_and_propagation_at_sdxl_token_counts(backend, S, C):
    # a frame searching two keyframes (and, at 1024 tokens, one searching one, which = -1 beside it)
    check_propagate(backend, S, C, torch.Generator().manual_seed(C), F_=1 if S > 1024 else 2)


@pytest.mark.skipif("triton" not in ops.available(), reason="triton not installed")
@pytest.mark.parametrize("C", [640, 1280])
def test_triton_propagation_at_sdxl_widths(C):
    from tokenflow.kernels.propagate import INTERPRET
    if not INTERPRET:
        pytest.skip("on a GPU the full-size GPU tests cover Triton")
    check_propagate("triton", 11, C, torch.Generator().manual_seed(C + 1))

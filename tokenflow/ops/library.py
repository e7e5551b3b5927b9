"""`tokenflow.ops` as PyTorch operators, so `torch.compile` traces through them without a graph break.

    torch.ops.tokenflow.propagate(x, key_feats, key_out, which, weights, residual=None, backend=None)
    torch.ops.tokenflow.extended_attention(q, k, v, heads, shared_qk=False, scale=None, backend=None)
    torch.ops.tokenflow.cosine_argmax(x, key_feats, which, backend=None)

Same contracts as the functions of `tokenflow.ops`, which they call (validation and backend choice
included). The plain functions cannot be traced themselves: validation reads `which`'s values and the
dispatcher picks a backend in Python, both data-dependent. Each op has a fake (meta) implementation
that gives the output's shape, dtype and device, so the compiled graph holds one opaque node per call.

Why `torch.library.custom_op` and not `torch.library.triton_op` + `wrap_triton`: these ops dispatch at
run time to whichever backend accepts the inputs (the C++/CUDA extension, faiss, torch or Triton), so
the operator has to be opaque; a triton_op must consist of Triton launches only. A Triton-only op would
let Inductor see the kernel, but gains little here (the kernels are whole operations with nothing to
fuse into), and it cannot be exercised on CPU: under TRITON_INTERPRET=1 a wrapped kernel is an
interpreted function that reads data pointers while Dynamo traces with fake tensors (measured with
torch 2.13 / triton 3.9: "Cannot access data pointer of Tensor"), so it would ship untested here.
"""
from __future__ import annotations

import torch

import tokenflow.ops as _ops


@torch.library.custom_op("tokenflow::propagate", mutates_args=())
def propagate(x: torch.Tensor, key_feats: torch.Tensor, key_out: torch.Tensor, which: torch.Tensor,
              weights: torch.Tensor, residual: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    return _ops.propagate(x, key_feats, key_out, which, weights, residual, backend=backend)


@propagate.register_fake
def _(x, key_feats, key_out, which, weights, residual=None, backend=None):
    F_, S, C = x.shape
    return key_out.new_empty(key_out.shape[0], F_, S, C)


@torch.library.custom_op("tokenflow::extended_attention", mutates_args=())
def extended_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, shared_qk: bool = False,
                       scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    return _ops.extended_attention(q, k, v, heads, shared_qk=shared_qk, scale=scale, backend=backend)


@extended_attention.register_fake
def _(q, k, v, heads, shared_qk=False, scale=None, backend=None):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("tokenflow::cosine_argmax", mutates_args=())
def cosine_argmax(x: torch.Tensor, key_feats: torch.Tensor, which: torch.Tensor,
                  backend: str | None = None) -> torch.Tensor:
    return _ops.cosine_argmax(x, key_feats, which, backend=backend)


@cosine_argmax.register_fake
def _(x, key_feats, which, backend=None):
    return x.new_empty(x.shape[0], which.shape[1], x.shape[1], dtype=torch.int64)

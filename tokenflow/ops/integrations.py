"""One call that makes the published TokenFlow implementation (and its forks) run on `tokenflow.ops`.

The reference keeps its TokenFlow logic in one module, `tokenflow_utils`: `register_extended_attention_pnp`
(and `register_extended_attention`, for SDEdit) replace the `forward` of the UNet's self-attention
modules with a per-head extended attention and mark which of them inject the source's Q/K at which
timesteps (`injection_schedule`, read against the `t` that `register_time` sets); `set_tokenflow` turns
every `BasicTransformerBlock` into the class `make_tokenflow_attention_block` makes, whose `forward`
records the keyframes' features and attention outputs in the keyframe pass (`pivotal_pass`) and, in the
group passes (`batch_idx`), replaces self-attention with nearest-neighbour propagation from the group's
keyframe and the previous one, blended with w = sigmoid(d2 / (d1 + d2)).

`patch_reference(tokenflow_utils)` wraps those three functions so that what they install calls
`tokenflow.ops`:

- the self-attention modules the reference's register function patched (its choice of layers and its
  schedule stay: they are module attributes it sets) get `extended_attention_forward`, one
  `ops.extended_attention` call (shared Q/K while injecting, `scale=attn.scale`);
- the blocks get `tokenflow_block(...)`: diffusers' own block forward, in which self-attention records
  (keyframe pass) or becomes one `ops.propagate` call (group pass), with the reference's blend weights
  (`reference_weights`). The block's own code then applies an ada-LN-zero gate (`gate_msa`), when the
  block has one, to the propagated output and adds the residual, as it does to an attention output.

In run_tokenflow_pnp.py, before its `from tokenflow_utils import *`:

    import tokenflow_utils
    from tokenflow.ops.integrations import patch_reference
    patch_reference(tokenflow_utils)

Numerics. Under half precision the reference's blend multiplies by float32 weights, so its group passes
return float32 (a float32 residual stream from the first propagated block on, but not for the first
group, whose single keyframe needs no weight); `reference_dtypes=True` (the default) reproduces those
dtypes, `False` keeps the model's dtype throughout (half the memory of that stream). The reference's
search runs in the features' dtype (under fp16 autocast its similarity matmul is fp16); `ops` compares
in float32, so where two candidates tie within fp16 rounding the chosen token may differ (either is a
nearest neighbour at that precision).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

import tokenflow.ops as ops

HOOKED = ("register_extended_attention_pnp", "register_extended_attention", "make_tokenflow_attention_block")


def _forced(backend: str | None):
    """`ops.use_backend(backend)`: it runs the operations it implements, auto the others."""
    return ops.use_backend(backend) if backend else contextlib.nullcontext()


def injecting(attn) -> bool:
    """Whether `attn` injects the source's Q/K now: the reference's rule, `t` in the module's
    `injection_schedule` (a list or tensor of timesteps), or t == 1000."""
    schedule, t = getattr(attn, "injection_schedule", None), getattr(attn, "t", None)
    if schedule is None or t is None:
        return False
    return bool(t in schedule or t == 1000)


def extended_attention_forward(attn, *, backend: str | None = None) -> Callable:
    """A `forward` for a diffusers self-attention module (`attn1`) of a keyframe pass: rows are
    [source | uncond | cond], n frames each; the source attends within its frame, uncond and cond to all
    n frames of their branch; while `injecting(attn)`, all three use the source's q and k."""
    plain = type(attn).forward

    def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None:  # cross-attention is not extended
            return plain(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        rows, S, C = hidden_states.shape
        n = rows // 3
        shared = injecting(attn)
        qk_rows = hidden_states[:n] if shared else hidden_states  # injected q, k: the source's, computed once
        q = attn.to_q(qk_rows).view(-1, n, S, C)
        k = attn.to_k(qk_rows).view(-1, n, S, C)
        v = attn.to_v(hidden_states).view(3, n, S, C)
        with _forced(backend):
            out = ops.extended_attention(q, k, v, attn.heads, shared_qk=shared, scale=attn.scale)
        to_out = attn.to_out[0] if isinstance(attn.to_out, torch.nn.ModuleList) else attn.to_out
        return to_out(out.view(rows, S, C))  # the reference applies the projection only (no dropout)

    return forward


def reference_weights(batch_idx: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(which [n, 2], weights [n, 2]) of the reference's group pass `batch_idx` over the stacked keyframes
    (keyframe b for group b): the group's own keyframe and the previous group's, w = sigmoid(d2 / (d1 + d2))
    with d1, d2 a frame's distances to the two groups' centres; group 0 has no previous keyframe."""
    if batch_idx == 0:
        which = torch.tensor([[0, -1]] * n, device=device)
        return which, torch.tensor([[1.0, 0.0]] * n, device=device)
    frame = torch.arange(n, device=device) + batch_idx * n
    d1 = (frame - (batch_idx * n + n // 2)).abs()
    d2 = (frame - ((batch_idx - 1) * n + n // 2)).abs()
    w = torch.sigmoid(d2 / (d1 + d2))
    which = torch.tensor([[batch_idx, batch_idx - 1]] * n, device=device)
    return which, torch.stack([w, 1 - w], 1)


def tokenflow_block(block_class: type, base: type | None = None, *, backend: str | None = None,
                    weights: Callable = reference_weights, reference_dtypes: bool = True) -> type:
    """A subclass of `block_class` (the reference's TokenFlow block) whose `forward` is `base`'s (the
    diffusers block it wraps; default: the first base of `block_class` that is not itself made by a
    TokenFlow wrapper) with self-attention replaced: in the keyframe pass (`self.pivotal_pass`) it runs
    attn1 and records its input's source rows (`pivot_hidden_states`, [3, n, S, C]) and its output
    (`kf_attn_output`); in group pass `self.batch_idx` it returns `ops.propagate` of the keyframes'
    recorded outputs (no residual: the block adds it, after its gate if it has one)."""
    base = base or next(c for c in block_class.__mro__[1:] if "forward" in vars(c) and c.__name__ != block_class.__name__)
    blends = {}  # (batch_idx, n, device) -> (which, w, promote): made once, on the host, so no call syncs a GPU

    def blend(batch_idx: int, n: int, device):
        key = (batch_idx, n, device)
        if key not in blends:
            which, w = weights(batch_idx, n, "cpu")
            promote = reference_dtypes and bool((which[:, 1:] >= 0).any())  # the reference's float32 weights promote
            blends[key] = which.to(device), w.to(device), promote
        return blends[key]

    def attn1_call(self, attn1, norm_hidden_states, *args, **kwargs):
        rows, S, C = norm_hidden_states.shape
        n = rows // 3
        if self.pivotal_pass:
            out = attn1(norm_hidden_states, *args, **kwargs)
            self.pivot_hidden_states = norm_hidden_states.view(3, n, S, C)
            self.kf_attn_output = out
            return out
        key_feats = self.pivot_hidden_states[0]                       # [K, S, C], keyframe b of group b
        key_out = self.kf_attn_output.view(3, -1, S, C)
        which, w, promote = blend(int(self.batch_idx), n, norm_hidden_states.device)
        if promote:
            key_out = key_out.to(torch.promote_types(key_out.dtype, w.dtype))
        with _forced(backend):
            out = ops.propagate(norm_hidden_states[:n], key_feats, key_out, which, w)
        return out.view(rows, S, C)

    def forward(self, hidden_states, *args, **kwargs):
        # For this call only, `self.attn1` is the function above: an instance attribute shadows the submodule.
        self.__dict__["attn1"] = functools.partial(attn1_call, self, self._modules["attn1"])
        try:
            return base.forward(self, hidden_states, *args, **kwargs)
        finally:
            self.__dict__.pop("attn1", None)

    return type(block_class.__name__, (block_class,), {"forward": forward, "__module__": __name__,
                                                        "__doc__": tokenflow_block.__doc__})


class Patch:
    """What `patch_reference` changed; `restore()` (or leaving a `with` block) puts the originals back
    (modules already patched keep their new forwards)."""

    def __init__(self):
        self._undo: list[tuple[object, str, object]] = []

    def _set(self, target, name, value):
        if isinstance(target, dict):
            self._undo.append((target, name, target[name]))
            target[name] = value
        else:
            self._undo.append((target, name, getattr(target, name)))
            setattr(target, name, value)

    def restore(self) -> None:
        for target, name, value in reversed(self._undo):
            if isinstance(target, dict):
                target[name] = value
            else:
                setattr(target, name, value)
        self._undo.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def _repatch_attention(register: Callable, backend) -> Callable:
    def wrapper(model, *args, **kwargs):
        unet = getattr(model, "unet", model)
        before = {id(m): m.__dict__.get("forward") for m in unet.modules()}
        result = register(model, *args, **kwargs)
        for m in unet.modules():  # the modules the reference gave a new forward: its choice of layers
            if m.__dict__.get("forward") is not before.get(id(m)) and hasattr(m, "to_q"):
                m.forward = extended_attention_forward(m, backend=backend)
        return result

    wrapper.__wrapped__ = register
    wrapper.__doc__ = f"{register.__name__}, with its self-attention forwards calling tokenflow.ops"
    return wrapper


def patch_reference(tokenflow_utils, *namespaces, backend: str | None = None,
                    weights: Callable = reference_weights, reference_dtypes: bool = True) -> Patch:
    """Make the reference's `tokenflow_utils` (a module, or any object or dict defining its functions)
    install `tokenflow.ops`-based forwards: see the module docstring. `namespaces` (e.g. a script's
    `globals()` after `from tokenflow_utils import *`) get the same replacements for names bound to the
    originals. `backend` forces one for these calls, for the operations it implements (`ops.use_backend`;
    default: auto); `weights(batch_idx, n, device)` gives
    (which, weights) of a group pass; `reference_dtypes` keeps the reference's float32 promotion.
    Returns a `Patch` (`restore()`)."""
    get = tokenflow_utils.get if isinstance(tokenflow_utils, dict) else (lambda n: getattr(tokenflow_utils, n, None))
    found = {name: get(name) for name in HOOKED if get(name) is not None}
    if not found:
        raise ValueError(f"patch_reference: {getattr(tokenflow_utils, '__name__', tokenflow_utils)!r} defines none "
                         f"of {', '.join(HOOKED)}; pass the reference's tokenflow_utils module")
    new = {}
    for name, fn in found.items():
        if getattr(fn, "_tokenflow_ops", False):
            continue  # patched already
        if name == "make_tokenflow_attention_block":
            def make(block_class, _make=fn):
                return tokenflow_block(_make(block_class), block_class, backend=backend, weights=weights,
                                       reference_dtypes=reference_dtypes)
            make.__wrapped__ = fn
            new[name] = make
        else:
            new[name] = _repatch_attention(fn, backend)
        new[name]._tokenflow_ops = True
    patch = Patch()
    for target in (tokenflow_utils, *namespaces):
        for name, fn in new.items():
            current = target.get(name) if isinstance(target, dict) else getattr(target, name, None)
            if current is found[name]:
                patch._set(target, name, fn)
    return patch

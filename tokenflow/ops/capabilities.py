"""What a backend can run, declared as data, and the one function that turns a mismatch into a reason.

Each backend declares one frozen `Capabilities` (xformers' fmha operators declare the same things as class
attributes): the operations it implements, the devices and feature dtypes it takes, its size limits,
whether `auto` may pick it, and its error tolerances. `why_not` reads the declaration against a call's
inputs and says, in one line, the first thing that does not fit; `why_not_auto` says why automatic
choice passes it over; `doc_table` renders every declaration as the table of docs/backend.md.
These run after `tokenflow.ops` validated the inputs, so shapes are well formed here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Mapping

import torch

from tokenflow.ops.accuracy import TOLERANCES, Tolerance

OPS = ("extended_attention", "propagate", "cosine_argmax")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# The inputs whose dtype is the operation's "feature dtype" (the other float inputs, key_out, residual
# and weights, may be any float dtype on every backend).
FEATURES = {"extended_attention": ("q", "k", "v"), "propagate": ("x", "key_feats"),
            "cosine_argmax": ("x", "key_feats")}
_DEVICE_WORDS = {"cpu": "CPU", "cuda": "CUDA"}


@dataclass(frozen=True)
class Capabilities:
    ops: tuple[str, ...]
    devices: tuple[str, ...] = ()                    # device types of the inputs; () = any device
    dtypes: tuple[torch.dtype, ...] = FLOATS         # feature dtypes (q/k/v; x/key_feats)
    op_dtypes: Mapping[str, tuple[torch.dtype, ...]] = field(default_factory=dict)  # per op, where they differ
    min_sm: Mapping[torch.dtype, tuple[int, int]] = field(default_factory=dict)     # CUDA capability per dtype
    max_head_dim: int | None = None                  # extended_attention: C // heads
    channel_multiple: int = 1                        # C % channel_multiple == 0
    max_frames: int | None = None                    # F per call (search ops)
    max_keyframes_per_frame: int | None = None       # J (search ops)
    max_tokens: int | None = None                    # S
    auto: bool = True                                # whether `auto` may pick it at all
    auto_cpu_isas: tuple[str, ...] | None = None     # unmeasured auto: only with these tokenflow._C CPU kernels
    auto_note: str = ""                              # why auto passes it over (when it does)
    device_note: str = ""                            # appended to a device mismatch
    dtype_note: str = ""                             # appended to a dtype mismatch
    tolerances: Mapping[str, Mapping[torch.dtype, Tolerance]] = field(default_factory=lambda: TOLERANCES)

    def dtypes_for(self, op: str) -> tuple[torch.dtype, ...]:
        return self.op_dtypes.get(op, self.dtypes)

    def tolerance(self, op: str, dtype: torch.dtype) -> Tolerance:
        return self.tolerances[op][dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _names(dtypes) -> str:
    names = [_dtype_name(d) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=1)
def cpu_isa() -> str | None:
    """The instruction-set variant tokenflow._C's CPU kernel runs in this process (None: not built)."""
    from tokenflow.ops.native import _C
    return _C.build_info()["cpu_isa"] if _C is not None else None


def device_words(devices) -> str:
    return " or ".join(_DEVICE_WORDS.get(d, d) for d in devices)


def _device_rule(caps: Capabilities, backend: str, what: str, device: torch.device) -> str | None:
    if not caps.devices or device.type in caps.devices:
        return None
    words = device_words(caps.devices)
    note = f" ({caps.device_note})" if caps.device_note else ""
    return f"{what} is on {device}; the {backend} backend takes {words} tensors{note}"


def _dtype_rule(caps: Capabilities, backend: str, op: str, what: str, dtype: torch.dtype,
                device: torch.device) -> str | None:
    allowed = caps.dtypes_for(op)
    if dtype not in allowed:
        note = f" ({caps.dtype_note})" if caps.dtype_note else ""
        return f"{what} has dtype {dtype}; the {backend} backend takes {_names(allowed)}{note}"
    sm = caps.min_sm.get(dtype)
    if sm and device.type == "cuda":
        have = _capability(device)
        if have < sm:
            return (f"{_dtype_name(dtype)} needs sm_{sm[0]}{sm[1]} or newer on the {backend} backend; "
                    f"{device} is sm_{have[0]}{have[1]}")
    return None


def _limits(caps: Capabilities, backend: str, op: str, inputs: dict) -> str | None:
    if op == "extended_attention":
        v, heads = inputs.get("v"), inputs.get("heads")
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            return None
        S, C = v.shape[2], v.shape[3]
        if caps.max_head_dim is not None and heads and C // heads > caps.max_head_dim:
            return (f"head dim {C // heads} (C = {C}, heads = {heads}) exceeds the {backend} backend's "
                    f"{caps.max_head_dim}")
        F_ = J = None
    else:
        x, which = inputs.get("x"), inputs.get("which")
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            return None
        F_, S, C = x.shape
        J = which.shape[1] if isinstance(which, torch.Tensor) and which.dim() == 2 else None
    if C % caps.channel_multiple:
        return f"C = {C} is not a multiple of {caps.channel_multiple}, which the {backend} backend needs"
    if caps.max_tokens is not None and S > caps.max_tokens:
        return f"S = {S} tokens exceed the {backend} backend's {caps.max_tokens}"
    if caps.max_frames is not None and F_ is not None and F_ > caps.max_frames:
        return f"F = {F_} frames exceed the {backend} backend's {caps.max_frames} per call"
    if caps.max_keyframes_per_frame is not None and J is not None and J > caps.max_keyframes_per_frame:
        return f"J = {J} keyframes per frame exceed the {backend} backend's {caps.max_keyframes_per_frame}"
    return None


def why_not(caps: Capabilities, backend: str, op: str, inputs: dict) -> str | None:
    """None if a backend declaring `caps` can run `op` on `inputs`, else the first reason it cannot."""
    if op not in caps.ops:
        return f"does not implement {op}"
    tensors = {n: t for n, t in inputs.items() if isinstance(t, torch.Tensor)}
    for name, t in tensors.items():
        reason = _device_rule(caps, backend, name, t.device)
        if reason:
            return reason
    for name in FEATURES[op]:
        t = tensors.get(name)
        reason = t is not None and _dtype_rule(caps, backend, op, name, t.dtype, t.device)
        if reason:
            return reason
    return _limits(caps, backend, op, inputs)


def why_not_here(caps: Capabilities, backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The device and dtype part of `why_not`, without inputs: can `op` run on `device` in `dtype` at all."""
    if op not in caps.ops:
        return f"does not implement {op}"
    return (_device_rule(caps, backend, "the model", device)
            or _dtype_rule(caps, backend, op, "the model", dtype, device))


def why_not_auto(caps: Capabilities, measured: bool = False) -> str | None:
    """None if `auto` may pick the backend in this process, else why it passes it over. `measured`: auto
    times the candidates (autotune.py), so the CPU-kernel rule, a measurement made elsewhere, is moot."""
    if not caps.auto:
        return f"auto never picks it ({caps.auto_note})" if caps.auto_note else "auto never picks it"
    if not measured and caps.auto_cpu_isas is not None and cpu_isa() not in caps.auto_cpu_isas:
        return (f"auto skips it with the {cpu_isa() or 'unbuilt'} CPU kernel (it needs "
                f"{' or '.join(caps.auto_cpu_isas)}): {caps.auto_note}")
    return None


def _limit_words(caps: Capabilities, op: str) -> str:
    words = []
    if op == "extended_attention" and caps.max_head_dim:
        words.append(f"head dim <= {caps.max_head_dim}")
    if caps.channel_multiple > 1:
        words.append(f"C % {caps.channel_multiple} == 0")
    if op != "extended_attention":
        if caps.max_keyframes_per_frame:
            words.append(f"J <= {caps.max_keyframes_per_frame}")
        if caps.max_frames:
            words.append(f"F <= {caps.max_frames}")
    if caps.max_tokens:
        words.append("S < 2^31" if caps.max_tokens == 2**31 - 1 else f"S <= {caps.max_tokens}")
    return ", ".join(words) or "-"


def _dtype_words(caps: Capabilities, op: str) -> str:
    out = []
    for d in caps.dtypes_for(op):
        sm = caps.min_sm.get(d)
        out.append(_dtype_name(d) + (f" (sm_{sm[0]}{sm[1]}+)" if sm else ""))
    return ", ".join(out)


def _auto_words(caps: Capabilities) -> str:
    if not caps.auto:
        return "no"
    if caps.auto_cpu_isas is not None:
        return "yes; unmeasured, only with the " + " or ".join(caps.auto_cpu_isas) + " CPU kernel"
    return "yes"


def doc_table(declarations: list[tuple[str, Capabilities]]) -> str:
    """The backend x op x device x dtype table of docs/backend.md, one row per (backend, op); `label` is
    markdown (`Backend.declarations()`)."""
    rows = ["| backend | op | devices | feature dtypes | limits | auto |", "|---|---|---|---|---|---|"]
    for label, caps in declarations:
        devices = ", ".join(_DEVICE_WORDS.get(d, d) for d in caps.devices) or "any"
        for op in OPS:
            if op in caps.ops:
                rows.append(f"| {label} | `{op}` | {devices} | {_dtype_words(caps, op)} | "
                            f"{_limit_words(caps, op)} | {_auto_words(caps)} |")
    return "\n".join(rows) + "\n"

"""What the TokenFlow processors and hooks share during an edit: run settings, per-call state, records.

Diffusers drops unknown `cross_attention_kwargs`, so the processors read what they need from objects they
hold: `RunSettings` (set once per edit), `CallState` (which pass runs, injection on or off, which keyframes
each frame blends; changes every UNet call) and `KeyframeRecords` (what the keyframe pass recorded for the
group passes of the same step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

OFF, KEYFRAME, GROUP = "off", "keyframe", "group"


class KeyframeRecords:
    """What the keyframe pass records in every transformer block, for the group passes of the same step.

    Per layer: `feats` [K, S, C], the source branch's self-attention input (norm1 output), and
    `out` [3, K, S, C], the self-attention outputs of the three branches. Lifetime: cleared at the
    start of each step's keyframe pass, read by that step's group passes. With `offload`, records
    live in (pinned) host memory and `take()` copies just the keyframes one UNet call needs.
    `lead` keyframes are reserved in front of the recorded ones and filled by `fill_lead` (a rank of a
    distributed edit puts the previous rank's last keyframe there: tokenflow.distributed), so `take()`
    still returns one contiguous window.
    """

    def __init__(self, offload: bool = False, lead: int = 0):
        self.offload = offload
        self.lead = lead
        self._feats: dict[str, torch.Tensor] = {}
        self._out: dict[str, torch.Tensor] = {}
        self._pinned: dict[tuple[str, str], torch.Tensor] = {}  # reused every step: pinning is slow

    def clear(self) -> None:
        self._feats.clear()
        self._out.clear()

    def _keep(self, key: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        if self.lead:
            dim = 0 if key[1] == "feats" else 1  # feats [K, S, C], out [3, K, S, C]
            shape = list(t.shape)
            shape[dim] += self.lead
            if self.offload and t.device.type != "cpu":
                host = self._pinned.get(key)
                if host is None or list(host.shape) != shape or host.dtype != t.dtype:
                    host = self._pinned[key] = torch.empty(shape, dtype=t.dtype, pin_memory=True)
            else:
                host = t.new_empty(shape)
            host.narrow(dim, self.lead, t.shape[dim]).copy_(t, non_blocking=True)
            return host
        if not self.offload or t.device.type == "cpu":
            # A slice (feats are the source rows of norm1's [3K, S, C] output) would keep its whole
            # storage alive for the rest of the step: keep a compact copy instead.
            whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            return t if whole else t.clone(memory_format=torch.contiguous_format)
        host = self._pinned.get(key)
        if host is None or host.shape != t.shape or host.dtype != t.dtype:
            host = self._pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        # Same stream as the kernels that later read the records back, so the copy is ordered before them.
        return host.copy_(t, non_blocking=True)

    def put_feats(self, layer: str, feats: torch.Tensor) -> None:
        self._feats[layer] = self._keep((layer, "feats"), feats)

    def put_out(self, layer: str, out: torch.Tensor) -> None:
        self._out[layer] = self._keep((layer, "out"), out)

    def layers(self) -> list[str]:
        """The layers recorded, in the order the keyframe pass ran them (the same on every rank)."""
        return list(self._feats)

    def last(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(feats [1, S, C], out [3, 1, S, C]) of the last recorded keyframe of `layer`."""
        return self._feats[layer][-1:], self._out[layer][:, -1:]

    def fill_lead(self, layer: str, feats: torch.Tensor, out: torch.Tensor) -> None:
        """Put `feats` [lead, S, C] and `out` [3, lead, S, C] in the rows reserved in front of `layer`'s records."""
        f, o = self._feats[layer], self._out[layer]
        f[:self.lead].copy_(feats.to(f.device, non_blocking=True))
        o[:, :self.lead].copy_(out.to(o.device, non_blocking=True))

    def take(self, layer: str, lo: int, hi: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(feats[lo:hi], out[:, lo:hi]) on `device`."""
        if layer not in self._feats:
            raise RuntimeError(f"no keyframe record for {layer}: a group pass ran before its keyframe pass")
        f, o = self._feats[layer][lo:hi], self._out[layer][:, lo:hi]
        return f.to(device, non_blocking=True), o.to(device, non_blocking=True)

    def nbytes(self) -> int:
        """Bytes the records hold (their storages: what they keep alive)."""
        return sum(t.untyped_storage().nbytes() for d in (self._feats, self._out) for t in d.values())


@dataclass
class RunSettings:
    """What one edit asks of the hooks. The keyframe pass's OOM handling lowers `keyframes_per_chunk`."""

    backends: dict[str, str | None] = field(default_factory=dict)  # op -> forced backend (absent: auto)
    keyframe_window: int | None = None  # opt-in windowed extended attention (tokenflow.windowed)
    keyframes_per_chunk: int | None = None  # per-row modules of the keyframe pass in chunks (tokenflow.chunking)
    # Replaces the keyframe pass's extended attention, same arguments as tokenflow.windowed's (a rank of a
    # distributed edit attends over every rank's keyframes: tokenflow.distributed); None: this process's own.
    keyframe_attention: Callable | None = None


@dataclass
class CallState:
    """What the current UNet call is. `reset()` returns to plain UNet calls (kind off)."""

    kind: str = OFF  # off (plain UNet, e.g. inversion) | keyframe | group
    t: int = -1
    step: int = -1
    qk_inject: bool = False
    conv_inject: bool = False
    # Group pass: keyframes [key_lo, key_hi) of the records, and per frame of the call the record-local
    # indices of its candidate keyframes ([F, 2], -1 = none) and their blend weights ([F, 2]).
    key_lo: int = 0
    key_hi: int = 0
    which: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def reset(self) -> None:
        for name, f in self.__dataclass_fields__.items():
            setattr(self, name, f.default)

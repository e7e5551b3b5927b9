"""Run the keyframe pass in chunks of keyframes, except self-attention, which sees all keyframes.

Every UNet module but self-attention is independent per row (convolutions, group norms, cross-attention,
feed-forward), so the keyframe pass can push each of them through in chunks of keyframes: their
temporary activations then scale with the chunk, not with K. Self-attention (the TokenFlow processor)
still gets every keyframe's rows and attends over all their keys, so the result is exact.

A chunk takes the same keyframes from each of the three branches ([source | uncond | cond] rows), so
hooks that mix branches inside a chunked module (the conv injection) still see whole triples.
Installed with diffusers' hook registry on the per-row modules (by `tokenflow.processors.install`); active
only in keyframe passes with `settings.keyframes_per_chunk` set and smaller than K.
"""
from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

from tokenflow.state import KEYFRAME, CallState, RunSettings

HOOK = "tokenflow_keyframe_chunks"


def branch_chunks(K: int, chunk: int):
    """Row indices of each chunk: keyframes [a, b) of each of the three branches."""
    for a in range(0, K, chunk):
        b = min(a + chunk, K)
        r = torch.arange(a, b)
        yield torch.cat([r, r + K, r + 2 * K])


class KeyframeChunks(ModelHook):
    def __init__(self, state: CallState, settings: RunSettings):
        super().__init__()
        self.state, self.settings = state, settings

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        chunk = self.settings.keyframes_per_chunk
        x = args[0] if args else next(iter(kwargs.values()))
        n = x.shape[0]
        if self.state.kind != KEYFRAME or not chunk or n // 3 <= chunk:
            return forward(*args, **kwargs)
        out = None
        for idx in branch_chunks(n // 3, chunk):
            pick = lambda v: v[idx.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v  # noqa: E731
            y = forward(*[pick(a) for a in args], **{k: pick(v) for k, v in kwargs.items()})
            if out is None:
                out = y.new_empty((n, *y.shape[1:]))
            out[idx.to(y.device)] = y
        return out


def install(unet, state: CallState, settings: RunSettings) -> None:
    """Hook every per-row module (removed with the registry's `remove_hook(HOOK)`)."""
    targets = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, Downsample2D, Upsample2D))]
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            assert isinstance(block.ff, FeedForward)
            targets += [block.attn2, block.ff] if block.attn2 is not None else [block.ff]
    for m in targets:
        HookRegistry.check_if_exists_or_initialize(m).register_hook(KeyframeChunks(state, settings), HOOK)

"""The attention processor and hooks that make a diffusers UNet run TokenFlow, installed and removed as one.

Attached from outside through diffusers' processor and hook mechanisms: no `forward` is copied, so the
engine follows diffusers' own block code. In a `BasicTransformerBlock`, attn1 receives norm1(hidden)
and its return value is added to the residual stream, which is exactly the feature the
nearest-neighbour search needs and the output the keyframe pass records and the group pass replaces.

    with install(unet, RunSettings(...)) as hooks:   # hooks.settings, hooks.state, hooks.records
        ...                                          # UNet calls, steered through hooks.state
    # removed: the UNet's processors and forwards are the ones it had before
"""
from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import AttnProcessor2_0

from tokenflow import chunking, ops
from tokenflow.layers import conv_injection_module, self_attention_layers
from tokenflow.state import GROUP, KEYFRAME, CallState, KeyframeRecords, RunSettings
from tokenflow.windowed import windowed_extended_attention

CONV_HOOK = "tokenflow_conv_injection"


class TokenFlowSelfAttention:
    """attn1 processor: plain attention (state.kind == off), extended attention (keyframe pass) or
    token propagation (group pass). Rows of a call are [source | uncond | cond], F frames each."""

    def __init__(self, hooks: "TokenFlowHooks", layer: str, qk_injection: bool):
        self.hooks, self.layer, self.qk_injection = hooks, layer, qk_injection
        self._plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        kind = self.hooks.state.kind
        if kind == KEYFRAME:
            return self._keyframe(attn, hidden_states)
        if kind == GROUP:
            return self._group(hidden_states)
        return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def _keyframe(self, attn, h: torch.Tensor) -> torch.Tensor:
        settings, records = self.hooks.settings, self.hooks.records
        n, S, C = h.shape
        K = n // 3
        records.put_feats(self.layer, h[:K])
        shared = self.qk_injection and self.hooks.state.qk_inject
        # Q/K injection: uncond and cond use the source's q and k, so only the source rows need them.
        qk_rows = h[:K] if shared else h
        q = attn.to_q(qk_rows).view(-1, K, S, C)
        k = attn.to_k(qk_rows).view(-1, K, S, C)
        v = attn.to_v(h).view(3, K, S, C)
        backend = settings.backends.get("extended_attention")
        if settings.keyframe_attention is not None:
            out = settings.keyframe_attention(q, k, v, attn.heads, shared_qk=shared, scale=attn.scale,
                                              window=settings.keyframe_window, backend=backend)
        elif settings.keyframe_window:
            out = windowed_extended_attention(q, k, v, attn.heads, shared_qk=shared, scale=attn.scale,
                                              window=settings.keyframe_window, backend=backend)
        else:
            out = ops.extended_attention(q, k, v, attn.heads, shared_qk=shared, scale=attn.scale, backend=backend)
        out = attn.to_out[1](attn.to_out[0](out.view(n, S, C)))
        records.put_out(self.layer, out.view(3, K, S, C))
        return out

    def _group(self, h: torch.Tensor) -> torch.Tensor:
        st = self.hooks.state
        n, S, C = h.shape
        F = n // 3
        feats, outs = self.hooks.records.take(self.layer, st.key_lo, st.key_hi, h.device)
        out = ops.propagate(h[:F], feats, outs, st.which, st.weights,
                            backend=self.hooks.settings.backends.get("propagate"))
        return out.view(n, S, C)


class ConvInjection(ModelHook):
    """Replace the uncond and cond rows of the residual branch (conv2 output) with the source rows."""

    def __init__(self, state: CallState):
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        st = self.state
        if st.kind in (KEYFRAME, GROUP) and st.conv_inject:
            F = output.shape[0] // 3
            output = output[:F].repeat(3, 1, 1, 1)
        return output


class TokenFlowHooks:
    """The installed processors and hooks of one UNet, with what they share; `remove()` undoes `install`."""

    def __init__(self, unet, settings: RunSettings, records: KeyframeRecords):
        self.unet, self.settings, self.records = unet, settings, records
        self.state = CallState()
        self._processors = dict(unet.attn_processors)
        procs = dict(self._processors)  # every other processor as it is
        for layer in self_attention_layers(unet):
            procs[f"{layer.name}.processor"] = TokenFlowSelfAttention(self, layer.name, layer.qk_injection)
        unet.set_attn_processor(procs)
        self._hook_names = [CONV_HOOK, chunking.HOOK]
        HookRegistry.check_if_exists_or_initialize(conv_injection_module(unet)).register_hook(
            ConvInjection(self.state), CONV_HOOK)
        chunking.install(unet, self.state, settings)

    def remove(self) -> None:
        self.state.reset()
        self.records.clear()
        registry = HookRegistry.check_if_exists_or_initialize(self.unet)
        for name in self._hook_names:
            registry.remove_hook(name, recurse=True)
        self.unet.set_attn_processor(self._processors)

    def __enter__(self) -> "TokenFlowHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def install(unet, settings: RunSettings | None = None, records: KeyframeRecords | None = None) -> TokenFlowHooks:
    """Route every self-attention of `unet` through TokenFlow, hook the conv-injection layer and the
    keyframe pass's per-row modules. Returns the handle (a context manager) whose `remove()` undoes it."""
    return TokenFlowHooks(unet, settings or RunSettings(), records or KeyframeRecords())

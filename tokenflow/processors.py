"""The attention processor and hook that make a diffusers UNet run TokenFlow.

Installed from outside through diffusers' processor and hook mechanisms: no `forward` is copied, so
the engine follows diffusers' own block code. In a `BasicTransformerBlock`, attn1 receives
norm1(hidden) and its return value is added to the residual stream, which is exactly the feature the
nearest-neighbour search needs and the output the keyframe pass records and the group pass replaces.
"""
from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import AttnProcessor2_0

from tokenflow import chunking, ops
from tokenflow.layers import conv_injection_module, self_attention_layers
from tokenflow.state import GROUP, KEYFRAME, StepState
from tokenflow.windowed import windowed_extended_attention

CONV_HOOK = "tokenflow_conv_injection"


class TokenFlowSelfAttention:
    """attn1 processor: plain attention (state.kind == off), extended attention (keyframe pass) or
    token propagation (group pass). Rows of a call are [source | uncond | cond], F frames each."""

    def __init__(self, state: StepState, layer: str, qk_injection: bool):
        self.state, self.layer, self.qk_injection = state, layer, qk_injection
        self._plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        st = self.state
        if st.kind == KEYFRAME:
            return self._keyframe(attn, hidden_states)
        if st.kind == GROUP:
            return self._group(hidden_states)
        return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def _keyframe(self, attn, h: torch.Tensor) -> torch.Tensor:
        st = self.state
        n, S, C = h.shape
        K = n // 3
        st.records.put_feats(self.layer, h[:K])
        shared = self.qk_injection and st.qk_inject
        # Q/K injection: uncond and cond use the source's q and k, so only the source rows need them.
        qk_rows = h[:K] if shared else h
        q = attn.to_q(qk_rows).view(-1, K, S, C)
        k = attn.to_k(qk_rows).view(-1, K, S, C)
        v = attn.to_v(h).view(3, K, S, C)
        if st.keyframe_window:
            out = windowed_extended_attention(q, k, v, attn.heads, shared_qk=shared, scale=attn.scale,
                                              window=st.keyframe_window, backend=st.backends.get("extended_attention"))
        else:
            out = ops.extended_attention(q, k, v, attn.heads, shared_qk=shared, scale=attn.scale,
                                         backend=st.backends.get("extended_attention"))
        out = attn.to_out[1](attn.to_out[0](out.view(n, S, C)))
        st.records.put_out(self.layer, out.view(3, K, S, C))
        return out

    def _group(self, h: torch.Tensor) -> torch.Tensor:
        st = self.state
        n, S, C = h.shape
        F = n // 3
        feats, outs = st.records.window(self.layer, st.key_lo, st.key_hi, h.device)
        out = ops.propagate(h[:F], feats, outs, st.which, st.weights, backend=st.backends.get("propagate"))
        return out.view(n, S, C)


class ConvInjection(ModelHook):
    """Replace the uncond and cond rows of the residual branch (conv2 output) with the source rows."""

    def __init__(self, state: StepState):
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        st = self.state
        if st.kind in (KEYFRAME, GROUP) and st.conv_inject:
            F = output.shape[0] // 3
            output = output[:F].repeat(3, 1, 1, 1)
        return output


def install(unet, state: StepState) -> None:
    """Route every self-attention of `unet` through TokenFlow and hook the conv-injection layer."""
    procs = dict(unet.attn_processors)  # keeps every other processor as it is
    for layer in self_attention_layers(unet):
        procs[f"{layer.name}.processor"] = TokenFlowSelfAttention(state, layer.name, layer.qk_injection)
    unet.set_attn_processor(procs)
    registry = HookRegistry.check_if_exists_or_initialize(conv_injection_module(unet))
    if registry.get_hook(CONV_HOOK) is None:
        registry.register_hook(ConvInjection(state), CONV_HOOK)
    chunking.install(unet, state)

"""Where TokenFlow acts in the UNet, found by structure so any SD-1.x/2.x-shaped UNet works.

- Every transformer block's self-attention (`attn1`): extended attention in the keyframe pass,
  token propagation in group passes.
- Q/K injection (Plug-and-Play): the self-attention of the decoder's cross-attention up blocks,
  except the first transformer of the first one: up_blocks[1].attentions[1:], up_blocks[2:].attentions.
- Conv injection: the residual branch (conv2 output) of up_blocks[1].resnets[1].
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenflow.errors import TokenFlowError


@dataclass(frozen=True)
class SelfAttentionLayer:
    name: str  # module path of the Attention module, e.g. "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
    level: int  # resolution level: tokens per frame are (h >> level) * (w >> level) for latents h x w
    channels: int  # C at this layer
    qk_injection: bool


def self_attention_layers(unet) -> list[SelfAttentionLayer]:
    """Every transformer block's self-attention, in module order, with where it sits in the UNet (the one
    place module paths are parsed: down_blocks[i] run at level i, up_blocks[j] at level 3 - j, the mid block
    at level 3)."""
    from diffusers.models.attention import BasicTransformerBlock

    layers = []
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            parts = name.split(".")
            inject = (parts[0] == "up_blocks" and parts[2] == "attentions"
                      and (int(parts[1]) >= 2 or (int(parts[1]) == 1 and int(parts[3]) >= 1)))
            level = 3 if parts[0] == "mid_block" else int(parts[1]) if parts[0] == "down_blocks" else 3 - int(parts[1])
            attn = module.attn1
            layers.append(SelfAttentionLayer(f"{name}.attn1", level, attn.to_q.in_features, inject))
            if attn.is_cross_attention or attn.spatial_norm is not None or attn.group_norm is not None \
                    or attn.residual_connection or attn.rescale_output_factor != 1.0:
                raise TokenFlowError(f"{name}.attn1 is not a plain SD self-attention; this UNet is not SD-1.x/2.x-shaped")
    if not layers:
        raise TokenFlowError("the UNet has no transformer blocks; it is not SD-1.x/2.x-shaped")
    return layers


def conv_injection_module(unet):
    try:
        return unet.up_blocks[1].resnets[1].conv2
    except (AttributeError, IndexError):
        raise TokenFlowError("the UNet has no up_blocks[1].resnets[1]; it is not SD-1.x/2.x-shaped") from None

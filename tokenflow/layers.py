"""Where TokenFlow acts in the UNet, found by structure so SD 1.x/2.x- and SDXL-shaped UNets work alike.

A UNet of n resolution levels has n down blocks (level i = down_blocks[i]), a mid block (level n - 1) and
n up blocks (up_blocks[j] at level n - 1 - j). SD 1.x/2.x: n = 4, attention at levels 0-2; SDXL: n = 3,
attention at levels 1 and 2 only, with 2 and 10 transformer blocks per attention module.

- Propagation: every transformer block's self-attention (`attn1`), at every level: extended attention in
  the keyframe pass, token propagation in group passes. A self-attention left per-frame would compute its
  output from its own frame alone and bring the flicker back, whatever the depth of the stack.
- Q/K injection (Plug-and-Play): the self-attentions of the decoder's attention up blocks, except those of
  the first attention module of the first of them. SD: up_blocks[1].attentions[1:], up_blocks[2:]
  (the reference's 8 layers); SDXL: up_blocks[0].attentions[1:] (20 blocks), up_blocks[1] (6 blocks).
- Conv injection: the residual branch (conv2 output) of resnets[1] of the first up block with attention:
  SD up_blocks[1], SDXL up_blocks[0]. Both sit at 1/32 of the image size (16x16 at 512, 32x32 at 1024).
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


def _first_attention_up_block(unet) -> int:
    for j, block in enumerate(unet.up_blocks):
        if getattr(block, "attentions", None):
            return j
    raise TokenFlowError("the UNet's decoder has no attention blocks; it is not SD-shaped")


def self_attention_layers(unet) -> list[SelfAttentionLayer]:
    """Every transformer block's self-attention, in module order, with where it sits in the UNet (the one
    place module paths are parsed; see the module docstring for the levels and the injection rule)."""
    from diffusers.models.attention import BasicTransformerBlock

    n = len(unet.up_blocks)
    first = _first_attention_up_block(unet)
    layers = []
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            parts = name.split(".")
            inject = (parts[0] == "up_blocks" and parts[2] == "attentions"
                      and (int(parts[1]) > first or (int(parts[1]) == first and int(parts[3]) >= 1)))
            level = n - 1 if parts[0] == "mid_block" else int(parts[1]) if parts[0] == "down_blocks" \
                else n - 1 - int(parts[1])
            attn = module.attn1
            layers.append(SelfAttentionLayer(f"{name}.attn1", level, attn.to_q.in_features, inject))
            if attn.is_cross_attention or attn.spatial_norm is not None or attn.group_norm is not None \
                    or attn.residual_connection or attn.rescale_output_factor != 1.0:
                raise TokenFlowError(f"{name}.attn1 is not a plain SD self-attention; this UNet is not SD-shaped")
    if not layers:
        raise TokenFlowError("the UNet has no transformer blocks; it is not SD-shaped")
    return layers


def conv_injection_module(unet):
    """conv2 of resnets[1] of the first up block with attention (see the module docstring)."""
    block = unet.up_blocks[_first_attention_up_block(unet)]
    try:
        return block.resnets[1].conv2
    except (AttributeError, IndexError):
        raise TokenFlowError("the UNet's first attention up block has fewer than 2 resnets; it is not SD-shaped") from None

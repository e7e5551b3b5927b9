"""The analytic cost model, the one place benchmarks and docs take FLOP counts from.

2 FLOP per multiply-add. Defaults are SD 2.1-base at 512 x 512: the self-attention levels below. SDXL base
at 1024 x 1024 is `SDXL` (pass `model=SDXL`). The UNet counts are torch's FlopCounterMode over one UNet
call on the meta device (`unet_flops` recounts them for any UNet config; tests check the constants):
"full" is a plain call, "group" the same call without its self-attention modules, which a group pass
replaces by propagation.
"""
from __future__ import annotations

from dataclasses import dataclass

# (S tokens per frame, C channels, number of self-attention layers) per UNet level at 512 x 512.
SD21_LEVELS = ((4096, 320, 5), (1024, 640, 5), (256, 1280, 5), (64, 1280, 1))
# UNet FLOP per frame and branch: with its own per-frame self-attention, and in a group pass (attn1 replaced).
UNET_FLOPS_FULL = 804e9
UNET_FLOPS_GROUP = 630e9
# SDXL base at 1024 x 1024: no attention at the first level; 10 layers at 64 x 64, 60 at 32 x 32.
SDXL_LEVELS = ((4096, 640, 10), (1024, 1280, 60))
SDXL_UNET_FLOPS_FULL = 6761e9
SDXL_UNET_FLOPS_GROUP = 5070e9


@dataclass(frozen=True)
class UNetCost:
    """A UNet's costs at its reference size (scaled by pixels / reference pixels)."""

    levels: tuple  # (S, C, layers) per self-attention level
    full: float  # FLOP of a plain call, per frame and branch
    group: float  # FLOP of a group-pass call (self-attention modules removed), per frame and branch
    pixels: int  # the reference size, height x width


SD21 = UNetCost(SD21_LEVELS, UNET_FLOPS_FULL, UNET_FLOPS_GROUP, 512 * 512)
SDXL = UNetCost(SDXL_LEVELS, SDXL_UNET_FLOPS_FULL, SDXL_UNET_FLOPS_GROUP, 1024 * 1024)


def attention_sum(levels=SD21_LEVELS, scale: float = 1.0) -> float:
    """A = sum over self-attention layers of S^2 * C (3.06e10 at 512 x 512). `scale` = pixels / 512^2."""
    return sum(n * (S * scale) ** 2 * C for S, C, n in levels)


def extended_attention_flops(S: int, C: int, K: int, branches: int = 3) -> float:
    """One layer of the keyframe pass: the source branch per frame (2 matmuls of S x S x C per frame)
    and `branches - 1` branches attending from K*S queries to K*S keys."""
    return 4 * S * S * C * K + (branches - 1) * 4 * (K * S) ** 2 * C


def propagate_flops(S: int, C: int, frames: int, candidates: int = 2) -> float:
    """Nearest-neighbour search of one layer: `frames` x S queries against S tokens of each candidate keyframe."""
    return 2 * frames * S * S * C * candidates


def edit_step_flops(N: int, B: int = 8, levels=SD21_LEVELS, scale: float = 1.0,
                    model: UNetCost | None = None) -> dict[str, float]:
    """FLOP of one denoising step of the edit, by part (about 97 TFLOP at N = 40, SD 2.1-base 512x512).
    `model` (e.g. SDXL) replaces `levels` and the UNet counts; `scale` is pixels / its reference pixels."""
    group = UNET_FLOPS_GROUP if model is None else model.group
    levels = levels if model is None else model.levels
    K = -(-N // B)
    A = attention_sum(levels, scale)
    parts = {
        "unet_keyframe_pass": 3 * K * group * scale,
        "unet_group_passes": 3 * N * group * scale,
        "extended_attention": 4 * A * (K + 2 * K * K),
        "nn_search": 2 * A * (2 * N - B),
    }
    parts["total"] = sum(parts.values())
    return parts


def inversion_flops(N: int, steps: int, scale: float = 1.0, model: UNetCost | None = None) -> float:
    """DDIM inversion: one single-branch UNet pass per frame per step."""
    return N * steps * (UNET_FLOPS_FULL if model is None else model.full) * scale


def edit_flops(N: int, steps: int = 50, B: int = 8, scale: float = 1.0, model: UNetCost | None = None) -> float:
    return steps * edit_step_flops(N, B, scale=scale, model=model)["total"]


def levels_of(unet, h: int, w: int) -> tuple:
    """(S, C, layers) per self-attention level of `unet` for latents h x w (tokenflow.layers)."""
    from collections import Counter

    from tokenflow.layers import self_attention_layers

    count = Counter(((h >> layer.level) * (w >> layer.level), layer.channels) for layer in self_attention_layers(unet))
    return tuple((S, C, n) for (S, C), n in sorted(count.items(), reverse=True))


def unet_flops(unet_config, h: int, w: int) -> tuple[float, float]:
    """(full, group) FLOP of one UNet call per frame and branch on latents h x w, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tokenflow.memsim import meta_prompts, meta_unet

    unet = meta_unet(unet_config)
    x = torch.empty(1, unet.config.in_channels, h, w, device="meta", dtype=torch.float16)
    kw = meta_prompts(unet.config, torch.float16, 1).unet_kwargs(1, torch.device("meta"), torch.float16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, 500, **kw)
    attn1 = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(".attn1"))
    total = counter.get_total_flops()
    return float(total), float(total - attn1)


def vae_flops(vae_config, height: int, width: int) -> dict[str, float]:
    """FLOP of encoding and of decoding one height x width frame, counted on the meta device."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from tokenflow.memsim import META, _meta_model

    vae = _meta_model(AutoencoderKL, vae_config, torch.float16)
    x = torch.empty(1, 3, height, width, device=META, dtype=torch.float16)
    z = torch.empty(1, vae.config.latent_channels, height // 8, width // 8, device=META, dtype=torch.float16)
    out = {}
    for name, run in (("encode", lambda: vae.encode(x)), ("decode", lambda: vae.decode(z))):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
        out[name] = float(counter.get_total_flops())
    return out


def rank_step_flops(frames: int, keyframes: int, all_keyframes: int, first: bool = True, B: int = 8,
                    levels=SD21_LEVELS, scale: float = 1.0, model: UNetCost | None = None) -> float:
    """FLOP of one denoising step on one rank of a distributed edit (tokenflow.distributed): its `frames` and its
    `keyframes` through the UNet, its keyframes' extended attention over all `all_keyframes`, its search (the
    `first` rank's first group has one candidate keyframe). With one rank (frames = N, keyframes = all_keyframes
    = K) this is edit_step_flops(N)["total"]. `model`, `scale`: as in edit_step_flops."""
    group = UNET_FLOPS_GROUP if model is None else model.group
    A = attention_sum(levels if model is None else model.levels, scale)
    return (3 * (keyframes + frames) * group * scale + 4 * A * (keyframes + 2 * keyframes * all_keyframes)
            + 2 * A * (2 * frames - (B if first else 0)))

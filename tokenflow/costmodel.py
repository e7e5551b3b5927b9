"""The analytic cost model, the one place benchmarks and docs take FLOP counts from.

2 FLOP per multiply-add. Defaults are SD 2.1-base at 512 x 512: the self-attention levels below.
"""
from __future__ import annotations

# (S tokens per frame, C channels, number of self-attention layers) per UNet level at 512 x 512.
SD21_LEVELS = ((4096, 320, 5), (1024, 640, 5), (256, 1280, 5), (64, 1280, 1))
# UNet FLOP per frame and branch: with its own per-frame self-attention, and in a group pass (attn1 replaced).
UNET_FLOPS_FULL = 804e9
UNET_FLOPS_GROUP = 630e9


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


def edit_step_flops(N: int, B: int = 8, levels=SD21_LEVELS, scale: float = 1.0) -> dict[str, float]:
    """FLOP of one denoising step of the edit, by part (about 97 TFLOP at N = 40, SD 2.1-base 512x512)."""
    K = -(-N // B)
    A = attention_sum(levels, scale)
    parts = {
        "unet_keyframe_pass": 3 * K * UNET_FLOPS_GROUP * scale,
        "unet_group_passes": 3 * N * UNET_FLOPS_GROUP * scale,
        "extended_attention": 4 * A * (K + 2 * K * K),
        "nn_search": 2 * A * (2 * N - B),
    }
    parts["total"] = sum(parts.values())
    return parts


def inversion_flops(N: int, steps: int, scale: float = 1.0) -> float:
    """DDIM inversion: one single-branch UNet pass per frame per step."""
    return N * steps * UNET_FLOPS_FULL * scale


def edit_flops(N: int, steps: int = 50, B: int = 8, scale: float = 1.0) -> float:
    return steps * edit_step_flops(N, B, scale=scale)["total"]


def rank_step_flops(frames: int, keyframes: int, all_keyframes: int, first: bool = True, B: int = 8,
                    levels=SD21_LEVELS, scale: float = 1.0) -> float:
    """FLOP of one denoising step on one rank of a distributed edit (tokenflow.distributed): its `frames` and its
    `keyframes` through the UNet, its keyframes' extended attention over all `all_keyframes`, its search (the
    `first` rank's first group has one candidate keyframe). With one rank (frames = N, keyframes = all_keyframes
    = K) this is edit_step_flops(N)["total"]."""
    A = attention_sum(levels, scale)
    return (3 * (keyframes + frames) * UNET_FLOPS_GROUP * scale + 4 * A * (keyframes + 2 * keyframes * all_keyframes)
            + 2 * A * (2 * frames - (B if first else 0)))

"""Groups, keyframe draws and blend weights, as the reference implementation makes them."""
from __future__ import annotations

import torch

from tokenflow.errors import TokenFlowError


def make_groups(n_frames: int, batch_size: int, match_reference: bool) -> list[range]:
    """Consecutive groups of B frames. The reference drops the frames past the last multiple of B;
    otherwise a trailing partial group keeps them (with a keyframe of its own)."""
    if n_frames < 1:
        raise TokenFlowError("the video has no frames")
    if match_reference:
        if n_frames < batch_size:
            raise TokenFlowError(f"{n_frames} frames are fewer than one group (batch size {batch_size}); "
                                 f"lower --batch-size or give more frames")
        n_frames -= n_frames % batch_size
    return [range(s, min(s + batch_size, n_frames)) for s in range(0, n_frames, batch_size)]


def split_groups(n_groups: int, ranks: int, batch_size: int) -> list[range]:
    """Contiguous ranges of group indices, one per rank, as even as possible (the first ranks take one more).
    Every rank needs a group: its keyframe is its share of the keyframe pass."""
    if n_groups < ranks:
        raise TokenFlowError(f"{ranks} ranks share {n_groups} group(s) of {batch_size} frames: every rank needs at "
                             f"least one group (a keyframe of its own); use at most {n_groups} ranks, a smaller "
                             f"--batch-size, or more frames", key="batch_size")
    base, extra = divmod(n_groups, ranks)
    bounds = [r * base + min(r, extra) for r in range(ranks + 1)]
    return [range(bounds[r], bounds[r + 1]) for r in range(ranks)]


def draw_keyframes(groups: list[range], batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """One keyframe per group, as the reference: randint(B, (K,)) + group starts, one draw per step.

    A trailing partial group of L < B frames maps its draw r to floor(r * L / B), so full groups get
    exactly the reference's keyframes from the same generator state."""
    r = torch.randint(batch_size, (len(groups),), generator=generator)
    lengths = torch.tensor([len(g) for g in groups])
    starts = torch.tensor([g.start for g in groups])
    return starts + torch.div(r * lengths, batch_size, rounding_mode="floor")


def blend_weights(groups: list[range], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every frame: its candidate keyframes (group g, group g-1; -1 for none) and blend weights.

    Frame f of group g > 0 blends w * (from keyframe g) + (1 - w) * (from keyframe g-1), with
    w = sigmoid(d2 / (d1 + d2)), d1, d2 the distances to the CENTRES of groups g and g-1 (the
    reference's rule, not the drawn keyframe positions). Group 0 takes its own keyframe alone.
    Returns which [N, 2] int64 (group indices) and weights [N, 2] float32.
    """
    n = groups[-1].stop
    which = torch.full((n, 2), -1, dtype=torch.long)
    weights = torch.zeros(n, 2, dtype=torch.float32)
    centres = [g.start + min(batch_size, len(g)) // 2 for g in groups]
    for gi, g in enumerate(groups):
        f = torch.arange(g.start, g.stop, dtype=torch.float32)
        which[g.start:g.stop, 0] = gi
        if gi == 0:
            weights[g.start:g.stop, 0] = 1.0
            continue
        d1 = (f - centres[gi]).abs()
        d2 = (f - centres[gi - 1]).abs()
        w = torch.sigmoid(d2 / (d1 + d2))
        which[g.start:g.stop, 1] = gi - 1
        weights[g.start:g.stop, 0] = w
        weights[g.start:g.stop, 1] = 1 - w
    return which, weights

"""Warp error: how far an edit departs from the source video's own motion.

For each pair of consecutive frames t, t+1: the flow from t to t+1 is estimated on the SOURCE frames,
the EDITED frame t+1 is warped back to t along it (bilinear), and the mean absolute difference to the
edited frame t is taken over the pixels the flow can be trusted at, in [0, 1] (pixel values / 255,
averaged over channels). Untrusted pixels are those that leave the frame or fail the forward-backward
consistency check of Sundaram et al. (ECCV 2010), as Ruder et al. (GCPR 2016) use it for video:
|f + b'|^2 > 0.01 (|f|^2 + |b'|^2) + 0.5, with f the forward flow and b' the backward flow at x + f.
The video's warp error is the mean over its pairs. The same measure of the source against itself
(`warp_error_source`) is the floor set by flow errors and compression: an edit that follows the
source's motion comes close to it.
"""
from __future__ import annotations

import numpy as np
import torch

# Sundaram et al.'s constants (alpha_1 = 0.01, alpha_2 = 0.5 px^2)
FB_ALPHA, FB_BETA = 0.01, 0.5


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx, yy


def warp_back(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image (frame t+1, [H, W, C] float32) sampled at x + flow(x): frame t+1 brought back to frame t."""
    import cv2

    xx, yy = _grid(*flow.shape[:2])
    return cv2.remap(image, xx + flow[..., 0], yy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def trusted(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """bool [H, W]: where the forward flow lands inside the frame and agrees with the backward flow."""
    h, w = forward.shape[:2]
    xx, yy = _grid(h, w)
    tx, ty = xx + forward[..., 0], yy + forward[..., 1]
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    back = warp_back(backward, forward)
    err = ((forward + back) ** 2).sum(-1)
    bound = FB_ALPHA * ((forward ** 2).sum(-1) + (back ** 2).sum(-1)) + FB_BETA
    return inside & (err <= bound)


def _hwc(frame: torch.Tensor) -> np.ndarray:
    return frame.permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255.0


def pair_error(a: torch.Tensor, b: torch.Tensor, forward: np.ndarray, mask: np.ndarray) -> float:
    """Masked mean |a - warp_back(b)| in [0, 1] for uint8 [3, H, W] frames a (t) and b (t+1)."""
    if not mask.any():
        return float("nan")
    diff = np.abs(_hwc(a) - warp_back(_hwc(b), forward)).mean(-1)
    return float(diff[mask].mean())


class WarpError:
    """Accumulates the warp error chunk by chunk: `update(source, edited)` with consecutive chunks of
    uint8 [n, 3, H, W] frames (the pair across a chunk boundary is included), then `compute()`."""

    def __init__(self, flow):
        self.flow = flow
        self.edit: list[float] = []  # per pair
        self.source: list[float] = []
        self.trusted: list[float] = []  # fraction of pixels used, per pair
        self._last = None

    def update(self, source: torch.Tensor, edited: torch.Tensor) -> None:
        if source.shape != edited.shape:
            raise ValueError(f"source {tuple(source.shape)} and edited {tuple(edited.shape)} frames differ in shape")
        if self._last is not None:
            source, edited = torch.cat([self._last[0], source]), torch.cat([self._last[1], edited])
        for t in range(len(source) - 1):
            fwd = self.flow(source[t], source[t + 1])
            mask = trusted(fwd, self.flow(source[t + 1], source[t]))
            self.edit.append(pair_error(edited[t], edited[t + 1], fwd, mask))
            self.source.append(pair_error(source[t], source[t + 1], fwd, mask))
            self.trusted.append(float(mask.mean()))
        self._last = (source[-1:], edited[-1:])

    def compute(self) -> dict[str, float | None]:
        def mean(v):
            v = [x for x in v if x == x]  # pairs with no trusted pixel (nan) do not count
            return float(np.mean(v)) if v else None

        return {"warp_error": mean(self.edit), "warp_error_source": mean(self.source),
                "warp_trusted_fraction": mean(self.trusted)}

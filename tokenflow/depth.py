"""Depth maps for SD2-depth: given by the user or estimated, at latent resolution, in [-1, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenflow.errors import TokenFlowError


def normalise(depth: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[N, 1, H', W'] -> [N, 1, h, w], each map scaled to [-1, 1] as diffusers' depth pipeline does."""
    d = F.interpolate(depth.float(), size=(h, w), mode="bicubic", align_corners=False)
    lo = d.amin(dim=(1, 2, 3), keepdim=True)
    hi = d.amax(dim=(1, 2, 3), keepdim=True)
    return 2.0 * (d - lo) / (hi - lo).clamp_min(1e-8) - 1.0


@torch.no_grad()
def predict(estimator, frames: torch.Tensor, chunk: int, device, dtype, batches=None):
    """The DPT estimator's raw depth of uint8 frames [N, 3, H, W], `chunk` frames per call: [N, 1, h', w'] float32,
    on the host. `batches`: the chunk starts to run (default all; e.g. wrapped in a progress bar)."""
    model, proc = estimator
    out = []
    for a in batches if batches is not None else range(0, len(frames), chunk):
        px = proc(images=list(frames[a:a + chunk].permute(0, 2, 3, 1).numpy()), return_tensors="pt").pixel_values
        out.append(model(pixel_values=px.to(device, dtype)).predicted_depth.float().cpu().unsqueeze(1))
    return torch.cat(out)


@torch.no_grad()
def depth_maps(models, frames: torch.Tensor, given: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """Depth at latent resolution for frames [N, 3, H, W] uint8: from `given` ([N, 1|3, H', W']) or the
    model's DPT estimator. Returned on the host, float32."""
    n, _, H, W = frames.shape
    h, w = H // 8, W // 8
    if given is not None:
        if len(given) < n:
            raise TokenFlowError(f"the depth video has {len(given)} frames but the input has {n}; give one depth map "
                                 f"per frame", key="depth")
        return normalise(given[:n, :1].float(), h, w)
    if models.depth_estimator is None:
        raise TokenFlowError("mode 'depth' needs depth maps: give a depth video or frame folder, or use a depth "
                             "model folder that ships its estimator (depth_estimator/ and feature_extractor/)", key="depth")
    pred = predict(models.depth_estimator, frames, chunk, models.device, models.dtype)
    return normalise(pred, h, w)

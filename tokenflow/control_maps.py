"""ControlNet condition maps made from the source frames: uint8 [N, 3, H, W] RGB at the processing size.

- `canny`: OpenCV's Canny edges (thresholds 100 / 200, the values of diffusers' ControlNet examples) on
  each frame, white on black, as lllyasviel's canny ControlNets were trained on.
- `softedge`: a soft edge map without weights: OpenCV's Sobel gradient magnitude of the Gaussian-smoothed
  grey frame, scaled by the video's 99.5th percentile and clipped. It stands in for the HED / PiDiNet
  annotators the softedge ControlNets were trained on (those need their own weights); for their exact
  maps, compute them elsewhere and pass the maps as a video.
- `depth`: the engine's DPT depth estimator (the one an SD2-depth model ships, or a DPT in the Hugging Face
  cache, `Intel/dpt-hybrid-midas` or `Intel/dpt-large`), inverse relative depth (near is bright) scaled by
  the video's largest value: one scale for the whole video, since a per-frame scale would make the
  condition flicker whenever the nearest object moves.
- a video or folder of frames: given maps, read with the input's frame selection and size (resized
  here when they come at another size).
The ControlNet sees them in [0, 1] (`as_input`), as diffusers' ControlNet pipelines pass them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tokenflow.errors import TokenFlowError
from tokenflow.progress import bar

KINDS = ("canny", "depth", "softedge")
CANNY_THRESHOLDS = (100, 200)
# DPT depth estimators looked for in the Hugging Face cache when the model ships none (never downloaded).
DPT_REPOS = ("Intel/dpt-hybrid-midas", "Intel/dpt-large")


def _cv2():
    try:
        import cv2
    except ImportError:
        raise TokenFlowError("canny and softedge condition maps need OpenCV: pip install opencv-python-headless "
                             "(or pip install -e '.[controlnet]')", key="control") from None
    return cv2


def _rgb(frame: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(frame.permute(1, 2, 0).numpy())


def canny(frames: torch.Tensor, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1],
          progress: bool = False) -> torch.Tensor:
    """Canny edges of uint8 frames [N, 3, H, W] -> uint8 [N, 3, H, W] (0 or 255, the same in every channel)."""
    cv2 = _cv2()
    out = torch.empty_like(frames)
    for i in bar(range(len(frames)), "canny maps", progress, unit="frame"):
        edges = cv2.Canny(cv2.cvtColor(_rgb(frames[i]), cv2.COLOR_RGB2GRAY), low, high)
        out[i] = torch.from_numpy(edges).expand(3, -1, -1)
    return out


def softedge(frames: torch.Tensor, sigma: float = 1.5, progress: bool = False) -> torch.Tensor:
    """Soft edges of uint8 frames [N, 3, H, W] -> uint8 [N, 3, H, W] (see the module docstring)."""
    cv2 = _cv2()
    mags = []
    for i in bar(range(len(frames)), "softedge maps", progress, unit="frame"):
        grey = cv2.GaussianBlur(cv2.cvtColor(_rgb(frames[i]), cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), sigma)
        mags.append(cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)))
    mag = torch.from_numpy(np.stack(mags))
    top = float(torch.quantile(mag.flatten()[::max(1, mag.numel() // 1_000_000)], 0.995)) or 1.0
    return (mag / top).clamp(0, 1).mul(255).round().to(torch.uint8).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def depth_estimator(models):
    """(DPT model, image processor): the model's own, else one in the Hugging Face cache (kept on `models`)."""
    if models.depth_estimator is not None:
        return models.depth_estimator
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    for repo in DPT_REPOS:
        try:
            model = DPTForDepthEstimation.from_pretrained(repo, local_files_only=True)
            proc = DPTImageProcessor.from_pretrained(repo, local_files_only=True)
        except (OSError, ValueError):
            continue
        model = model.to(models.device, models.dtype).eval().requires_grad_(False)
        models.depth_estimator = (model, proc)
        return models.depth_estimator
    raise TokenFlowError(f"control 'depth' needs a depth estimator: model {models.name} ships none and no DPT is in "
                         f"the Hugging Face cache. Run `hf download {DPT_REPOS[0]}` on a connected machine, or give "
                         f"precomputed depth maps as a video or frame folder (--control depth.mp4)", key="control")


@torch.no_grad()
def depth(models, frames: torch.Tensor, chunk: int, progress: bool = False) -> torch.Tensor:
    """DPT depth of uint8 frames [N, 3, H, W] -> uint8 [N, 3, H, W], near bright, one scale per video."""
    from tokenflow.depth import predict

    n, _, H, W = frames.shape
    pred = predict(depth_estimator(models), frames, chunk, models.device, models.dtype,
                   bar(range(0, n, chunk), "depth maps", progress, unit="batch"))
    d = F.interpolate(pred, size=(H, W), mode="bicubic", align_corners=False).clamp_min(0)
    top = float(d.max())
    d = d / top if top > 0 else d
    return d.mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def fit(maps: torch.Tensor, n: int, size: tuple[int, int], what: str) -> torch.Tensor:
    """Given maps [M, C, H', W'] (any numeric dtype; 1 or 3 channels) -> uint8 [n, 3, H, W]."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or maps.shape[1] not in (1, 3):
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise TokenFlowError(f"{what}: condition maps must be a tensor [N, 1 or 3, H, W]; got {got}", key="control")
    if len(maps) < n:
        raise TokenFlowError(f"{what} has {len(maps)} frames but the input has {n}; give one condition map per frame",
                             key="control")
    maps = maps[:n]
    if maps.dtype != torch.uint8:
        maps = (maps.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if tuple(maps.shape[2:]) != tuple(size):
        maps = F.interpolate(maps.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        maps = maps.round().clamp(0, 255).to(torch.uint8)
    return maps.expand(-1, 3, -1, -1).contiguous()


def make(kind: str, models, frames: torch.Tensor, given: torch.Tensor | None, chunk: int,
         progress: bool = False, resize: str = "crop") -> torch.Tensor:
    """The condition maps of one ControlNet: `kind` (canny, depth, softedge) made from `frames`, or the
    `given` maps of a video; any other `kind` is a video or frame folder, read from its first frame and
    brought to the frames' size by `resize` (the CLI reads it itself, with the input's selection)."""
    size = tuple(frames.shape[2:])
    if given is not None:
        return fit(given, len(frames), size, f"control video {kind}")
    if kind == "canny":
        return canny(frames, progress=progress)
    if kind == "softedge":
        return softedge(frames, progress=progress)
    if kind == "depth":
        return depth(models, frames, chunk, progress)
    from tokenflow.video import probe, read_frames, resize_for
    info = probe(kind)
    r = resize_for(info.width, info.height, width=size[1], height=size[0], resize=resize)
    return fit(read_frames(info.path, count=len(frames), resize=r), len(frames), size, f"control video {kind}")


def as_input(maps: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 maps -> the ControlNet's conditioning image in [0, 1]."""
    return maps.to(device).to(dtype) / 255.0

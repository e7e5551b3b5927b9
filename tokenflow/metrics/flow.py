"""Optical flow between consecutive frames, for the warp error.

`DISFlow` (OpenCV's dense inverse search) needs no weights and runs anywhere; on the bundled sample,
whose true motion is known, its end-point error is in the README. `RAFTFlow` (torchvision's RAFT-large)
runs only when torchvision imports and RAFT's weights are already in the torch hub cache: they are never
downloaded here. Both take uint8 [3, H, W] frames and return the flow from the first frame to the
second as float32 [H, W, 2] (dx, dy): pixel (x, y) of `a` shows what `b` shows at (x + dx, y + dy).
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from tokenflow.metrics.models import MetricModelMissing
from tokenflow.metrics.names import FLOWS


def _gray(frame: torch.Tensor) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(frame.permute(1, 2, 0).cpu().numpy()), cv2.COLOR_RGB2GRAY)


class DISFlow:
    name = "dis"

    def __init__(self, preset: str = "medium"):
        import cv2

        presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                   "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
        self.dis = cv2.DISOpticalFlow_create(presets[preset])

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        # no initial flow: every pair is estimated on its own, so chunking cannot change a result
        return self.dis.calc(_gray(a), _gray(b), None)


class RAFTFlow:
    name = "raft"

    def __init__(self, device: str = "cpu"):
        try:
            from torchvision.models.optical_flow import Raft_Large_Weights, raft_large
        except Exception as e:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
            why = " ".join(str(e).split())[:160] or type(e).__name__
            raise MetricModelMissing(f"RAFT flow: torchvision does not import here ({why}); install the torchvision "
                                     f"built for this torch, or use --flow dis") from None
        weights = Raft_Large_Weights.DEFAULT
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
        if not path.is_file():
            raise MetricModelMissing(
                f"RAFT flow: its weights are not in the torch hub cache ({path}); fetch them once with `python -c "
                f"\"from torchvision.models.optical_flow import raft_large; raft_large(weights='DEFAULT')\"` "
                f"(or copy the file there), or use --flow dis")
        model = raft_large(weights=None)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.model = model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        H, W = a.shape[1:]
        ph, pw = -H % 8, -W % 8  # RAFT needs sides divisible by 8: pad by replication, crop after

        def prep(f):
            x = f[None].to(self.device, torch.float32) / 127.5 - 1.0  # RAFT's input range [-1, 1]
            return torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")

        flow = self.model(prep(a), prep(b))[-1][0, :, :H, :W]
        return flow.permute(1, 2, 0).float().cpu().numpy()


def make_flow(name: str, device: str = "cpu"):
    if name == "dis":
        return DISFlow()
    if name == "raft":
        return RAFTFlow(device)
    raise ValueError(f"unknown flow {name!r}; choose one of {', '.join(FLOWS)}")

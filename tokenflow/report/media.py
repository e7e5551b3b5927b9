"""Pictures of an edit for the report: a source | edit thumbnail strip (PNG) and an animated preview (GIF)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

THUMB_HEIGHT = 96  # px of one thumbnail
STRIP_FRAMES = 6
GIF_FRAMES = 32  # at most; spread evenly over the clip
GAP = 4  # px between thumbnails


def spread(n: int, k: int) -> list[int]:
    """k frame indices spread evenly over 0..n-1 (first and last included)."""
    if n <= k:
        return list(range(n))
    return [round(i * (n - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]


def thumb_size(width: int, height: int, h: int = THUMB_HEIGHT) -> tuple[int, int]:
    return max(2, round(width * h / height)), h


def _image(frame: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    im = Image.fromarray(frame.permute(1, 2, 0).contiguous().cpu().numpy())
    return im if im.size == size else im.resize(size, Image.Resampling.LANCZOS)


def strip_png(source: torch.Tensor | None, edited: torch.Tensor, k: int = STRIP_FRAMES) -> bytes:
    """Two rows of k thumbnails, source above edit (edit alone without a source), as PNG bytes."""
    size = thumb_size(edited.shape[3], edited.shape[2])
    idx = spread(len(edited), k)
    rows = [r for r in (source, edited) if r is not None]
    w, h = size
    canvas = Image.new("RGB", (len(idx) * (w + GAP) - GAP, len(rows) * (h + GAP) - GAP), "white")
    for r, frames in enumerate(rows):
        for c, i in enumerate(idx):
            canvas.paste(_image(frames[min(i, len(frames) - 1)], size), (c * (w + GAP), r * (h + GAP)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def preview_gif(source: torch.Tensor | None, edited: torch.Tensor, fps: float = 24.0, k: int = GIF_FRAMES) -> bytes:
    """Source | edit side by side, looping, at the clip's speed (frames skipped are added to the delay)."""
    size = thumb_size(edited.shape[3], edited.shape[2])
    idx = spread(len(edited), k)
    w, h = size
    frames = []
    for i in idx:
        canvas = Image.new("RGB", ((w + GAP) * (source is not None) + w, h), "white")
        if source is not None:
            canvas.paste(_image(source[min(i, len(source) - 1)], size), (0, 0))
        canvas.paste(_image(edited[i], size), ((w + GAP) * (source is not None), 0))
        frames.append(canvas)
    step = (len(edited) - 1) / max(1, len(idx) - 1) if len(idx) > 1 else 1
    delay = max(20, round(1000 * step / fps))  # ms; browsers slow down GIF delays under 20 ms
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=delay, loop=0, optimize=True)
    return buf.getvalue()


def load_frames(record: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, float, str | None]:
    """(source, edited, fps, problem) of a report record, at thumbnail size: frames in memory when the
    record has them, else decoded from its paths (each frame shrunk as it is decoded). A missing or
    unreadable file gives None and the reason, never an exception: the report still shows the rest."""
    from tokenflow.errors import TokenFlowError
    from tokenflow.video import Resize, probe, read_frames

    edited, source = record.get("edited_frames"), record.get("source_frames")
    fps = float(record.get("fps") or 24)
    problem = None
    out_path = output_path(record)
    if edited is None and out_path is not None:
        try:
            info = probe(out_path)
            fps = float(info.fps)
            w, h = thumb_size(info.width, info.height)
            edited = read_frames(out_path, resize=Resize(w, h, "stretch"))
        except TokenFlowError as e:
            problem = str(e)
    elif edited is None:
        problem = "the record names no output"
    src = record.get("input") or record.get("source") or record.get("video")
    if source is None and edited is not None and src:
        if str(src) == "sample":
            from tokenflow.sample import sample_path
            src = sample_path()
        try:
            w, h = edited.shape[3], edited.shape[2]
            if record.get("size"):  # the edit's aspect decides the framing of the source, as the edit did
                w, h = thumb_size(*record["size"])
            source = read_frames(src, start=int(record.get("first_frame") or 0), count=len(edited),
                                 stride=int(record.get("stride") or 1), resize=Resize(w, h, record.get("resize") or "crop"))
        except TokenFlowError as e:
            problem = f"source: {e}"
    return source, edited, fps, problem


def output_path(record: dict) -> Path | None:
    """The edited video (or folder of frames) of a record: `output`, or the first video in `outputs`."""
    out = record.get("output")
    if out is None:
        outs = record.get("outputs")
        if isinstance(outs, dict):
            outs = [outs.get("video")] + list(outs.values())
        for o in outs or []:
            if o and (str(o).endswith(".mp4") or Path(str(o)).is_dir()):
                out = o
                break
    return Path(str(out)).expanduser() if out else None


def as_array(png: bytes) -> np.ndarray:
    """Decoded image bytes as an array (for tests and checks)."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

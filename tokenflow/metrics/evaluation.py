"""`evaluate(edited, source, prompt)`: every metric of one edit, computed in chunks of frames."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from tokenflow.errors import TokenFlowError
from tokenflow.metrics.models import MetricModelMissing, load_clip, resolve_device
from tokenflow.metrics.names import (DEFAULT_CHUNK, DEFAULT_CLIP_MODEL, DEFAULT_PICK_MODEL, DEFAULT_PICK_PROCESSOR,
                                     FLOWS, METRICS, TINY_CLIP)
from tokenflow.progress import bar



def _frames(x, what: str, *, start=0, count=None, stride=1, resize=None, progress=False) -> tuple[torch.Tensor, str]:
    from tokenflow.video import read_frames

    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise TokenFlowError(f"{what} frames must be uint8 [N, 3, H, W]; got {x.dtype} {tuple(x.shape)}")
        return x, f"{what} frames in memory"
    if str(x) == "sample":
        from tokenflow.sample import sample_path
        x = sample_path()
    path = Path(x).expanduser()
    return read_frames(path, start=start, count=count, stride=stride, resize=resize, progress=progress), str(path)


def evaluate(edited, source=None, prompt: str | None = None, metrics=None, *, clip_model: str = DEFAULT_CLIP_MODEL,
             pick_model: str = DEFAULT_PICK_MODEL, pick_processor: str = DEFAULT_PICK_PROCESSOR, flow: str = "dis",
             device: str | None = None, chunk_frames: int = DEFAULT_CHUNK, start: int = 0, stride: int = 1,
             resize: str = "crop", progress: bool = False) -> dict:
    """The metrics of one edit.

    `edited`, `source`: uint8 [N, 3, H, W] frames, or a video file / folder of frames / `sample`. A source
    read from disk takes the frames `start, start + stride, ...` (the edit's selection), each brought to
    the edit's size by `resize` (crop | pad | stretch, as the edit did). `metrics`: names from METRICS
    (None: all that the inputs allow: the text metrics need a prompt, the warp error a source). Metric
    models come from the Hugging Face cache or a local folder, never from the network; a missing one
    skips its metrics (the reason, with the download command, is under "skipped") and the rest run.

    Returns {metric: value, ..., "frames", "size": [W, H], "models", "skipped": {metric: reason},
    "notes": [...], "seconds": {stage: s}}; the values are described in NUMBERS.
    """
    from tokenflow.video import Resize

    asked = metrics is not None
    metrics = list(METRICS if metrics is None else metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise TokenFlowError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if flow not in FLOWS:
        raise TokenFlowError(f"unknown flow {flow!r}; choose one of {', '.join(FLOWS)}")
    if chunk_frames < 1:
        raise TokenFlowError(f"chunk_frames = {chunk_frames} must be at least 1")
    prompt = prompt.strip() if prompt else None
    skipped: dict[str, str] = {}
    for m, need, what in (("clip_text", prompt, "a prompt (--prompt)"), ("pick_score", prompt, "a prompt (--prompt)"),
                          ("warp_error", source is not None, "the source video (--source)")):
        if m in metrics and not need:
            if asked:
                raise TokenFlowError(f"metric {m} needs {what}; give it, or leave {m} out of the metrics asked for")
            metrics.remove(m)
            skipped[m] = f"needs {what}"
    device = resolve_device(device)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    edit, edit_label = _frames(edited, "edited", progress=progress)
    n, (H, W) = len(edit), edit.shape[2:]
    src = src_label = None
    if "warp_error" in metrics:
        if isinstance(source, torch.Tensor):
            src, src_label = _frames(source, "source")
            src = src[:n]
        else:
            src, src_label = _frames(source, "source", start=start, count=n, stride=stride,
                                     resize=Resize(W, H, resize), progress=progress)
        if len(src) < n or src.shape[2:] != edit.shape[2:]:
            raise TokenFlowError(f"the source ({src_label}) gives {len(src)} frames of {src.shape[3]}x{src.shape[2]} "
                                 f"for the edit's {n} frames of {W}x{H}: give the source and selection the edit was "
                                 f"made from (--start, --stride)")
    seconds["read"] = time.perf_counter() - t0

    from tokenflow.metrics.clip import ClipScores, PickScore

    scorers: dict[str, object] = {}
    models: dict[str, str] = {}
    notes: list[str] = []
    if "clip_text" in metrics or "clip_frame" in metrics:
        try:
            model, proc = load_clip(clip_model, device)
            text = prompt if "clip_text" in metrics else None
            scorers["clip"] = ClipScores(model, proc, text, device)
            models["clip"] = clip_model
        except MetricModelMissing as e:
            skipped.update({m: str(e) for m in ("clip_text", "clip_frame") if m in metrics})
    if "pick_score" in metrics:
        try:
            model, proc = load_clip(pick_model, device, processor=pick_processor, what="PickScore")
            scorers["pick_score"] = PickScore(model, proc, prompt, device)
            models["pick_score"] = f"{pick_model} (processor {pick_processor})"
        except MetricModelMissing as e:
            skipped["pick_score"] = str(e)
    if "warp_error" in metrics:
        from tokenflow.metrics.flow import make_flow

        from tokenflow.metrics.warp import WarpError
        try:
            scorers["warp"] = WarpError(make_flow(flow, device))
            models["flow"] = flow
        except MetricModelMissing as e:
            skipped["warp_error"] = str(e)
    if TINY_CLIP in (models.get("clip"), pick_model if "pick_score" in models else None):
        notes.append("the tiny-random CLIP has random weights: its CLIP/PickScore numbers are MEANINGLESS")

    with bar(desc="evaluating", enabled=progress and bool(scorers), total=n, unit="frame") as pb:
        for i in range(0, n, chunk_frames):
            chunk = edit[i:i + chunk_frames]
            for name, s in scorers.items():
                t0 = time.perf_counter()
                if name == "warp":
                    s.update(src[i:i + chunk_frames], chunk)
                else:
                    s.update(chunk)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
            pb.update(len(chunk))

    out: dict = {}
    for s in scorers.values():
        out.update(s.compute())
    return {**out, "frames": n, "size": [W, H], "edited": edit_label,
            **({"source": src_label} if src_label else {}), "prompt": prompt, "models": models, "skipped": skipped,
            "notes": notes, "seconds": seconds}


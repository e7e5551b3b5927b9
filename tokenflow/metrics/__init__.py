"""Evaluation metrics of an edit: CLIP text alignment, CLIP frame consistency, PickScore, warp error.

    from tokenflow.metrics import evaluate
    result = evaluate("edit.mp4", "source.mp4", "a marble sculpture of a woman running")
    result["clip_text"], result["clip_frame"], result["warp_error"], result["skipped"]

One module per family: `clip` (CLIP text alignment and frame consistency, PickScore), `warp` (warp
error) with `flow` (optical flow), `models` (loading the metric models offline), `evaluation` (`evaluate`: all of
them over chunks of frames), `cli` (`tokenflow-edit eval`). Definitions: `NUMBERS` and the README.
"""
from tokenflow.metrics.names import (DEFAULT_CLIP_MODEL, DEFAULT_PICK_MODEL, DEFAULT_PICK_PROCESSOR, METRICS,  # noqa: F401
                                     NUMBERS, metric_values)


def __getattr__(name):  # torch, transformers and OpenCV load only when a metric is computed
    if name == "evaluate":
        from tokenflow.metrics.evaluation import evaluate
        return evaluate
    if name == "MetricModelMissing":
        from tokenflow.metrics.models import MetricModelMissing
        return MetricModelMissing
    raise AttributeError(name)


__all__ = ["evaluate", "metric_values", "METRICS", "NUMBERS", "DEFAULT_CLIP_MODEL", "DEFAULT_PICK_MODEL",
           "DEFAULT_PICK_PROCESSOR", "MetricModelMissing"]

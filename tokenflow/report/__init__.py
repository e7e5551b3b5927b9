"""The HTML report of one edit or a batch: `write_report(records, path)`.

A record is a mapping (a line of a batch's results.jsonl, or what a single edit builds); every key is
optional except a name:
  name (or id)        the item's label
  prompt              the edit's prompt
  status              done (or ok) | skipped | failed; error (or reason): why it failed
  output (or outputs) the edited video or folder of frames (outputs: a list, or a mapping with `video`)
  input (or source, video), first_frame, stride, resize
                      the source and how the edit selected and framed it (for the source thumbnails)
  frames, size [W, H], fps
  seconds (or timings) {stage: seconds}
  metrics             {name: value}, as `tokenflow.metrics.evaluation` returns them
  source_frames, edited_frames
                      uint8 [N, 3, H, W] tensors, when the caller has the frames in memory (not decoded again)

The page shows plots on top (seconds per frame against frames, time per stage, metric distributions),
a sortable summary table, then per item a source | edit thumbnail strip, an animated GIF preview, its
metrics and its time per stage. Images are inlined as data URIs (`embed`, the default up to 20 items)
or written as files to a `<name>_files/` folder beside the page (larger batches stay small to open).
"""
from __future__ import annotations

import base64
import re
from pathlib import Path

from tokenflow.progress import bar
from tokenflow.report import media, plots
from tokenflow.report.page import page

EMBED_UP_TO = 20  # items; beyond, images go to files beside the page


def _normalize(i: int, r: dict) -> dict:
    name = str(r.get("name") or r.get("id") or f"item {i + 1}")
    metrics = {k: v for k, v in (r.get("metrics") or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    seconds = {k: float(v) for k, v in (r.get("seconds") or r.get("timings") or {}).items() if isinstance(v, (int, float))}
    anchor = "item-%d-%s" % (i, re.sub(r"[^A-Za-z0-9_-]+", "-", name)[:40])
    return {**r, "name": name, "metrics": metrics, "seconds": seconds, "anchor": anchor,
            "status": str(r.get("status") or "done"), "error": r.get("error") or r.get("reason"),
            "edit_seconds": plots.edit_seconds({"seconds": seconds})}


class _Sink:
    """Where the images go: data URIs in the page, or files in a folder beside it."""

    def __init__(self, folder: Path | None, link: str | None):
        self.folder, self.link, self.n = folder, link, 0

    def __call__(self, data: bytes | None, kind: str, stem: str) -> str | None:
        if data is None:
            return None
        mime = {"png": "image/png", "gif": "image/gif"}[kind]
        if self.folder is None:
            return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        self.n += 1
        name = f"{self.n:04d}_{re.sub(r'[^A-Za-z0-9_-]+', '-', stem)[:40]}.{kind}"
        (self.folder / name).write_bytes(data)
        return f"{self.link}/{name}"


def render(records: list[dict], *, title: str = "TokenFlow report", files: Path | None = None,
           files_link: str | None = None, progress: bool = False) -> str:
    """The page as text; images as data URIs, or written into the existing folder `files` (linked from the
    page as `files_link/NAME`)."""
    sink = _Sink(files, files_link)
    items = [_normalize(i, r) for i, r in enumerate(records)]
    for it in bar(items, desc="report", enabled=progress, unit="item"):
        source, edited, fps, problem = media.load_frames(it)
        it["problem"] = problem
        if edited is not None and len(edited):
            it.setdefault("frames", len(edited))
            it["has_source"] = source is not None
            it["strip"] = sink(media.strip_png(source, edited), "png", it["name"] + "_strip")
            it["gif"] = sink(media.preview_gif(source, edited, fps), "gif", it["name"] + "_preview")
        it.pop("source_frames", None)
        it.pop("edited_frames", None)
    figs = {"time per frame": plots.seconds_per_frame(items), "time per stage": plots.stage_times(items),
            "metric distributions": plots.metric_distributions(items)}
    notes = []
    if any(str(r.get("model", "")).startswith("tiny-random") for r in records) or \
            any("tiny-random" in str((r.get("models") or {})) for r in records):
        notes.append("tiny-random models have random weights: their edits and numbers are MEANINGLESS")
    return page(items, {k: sink(v, "png", k) for k, v in figs.items()}, title, notes)


def write_report(records: list[dict], path: str | Path, *, title: str = "TokenFlow report", embed: bool | None = None,
                 progress: bool = False) -> Path:
    """Write the report of `records` (see the module doc) to `path` atomically; returns the path.
    `embed`: images inside the page (default when there are at most EMBED_UP_TO records), else in
    `<stem>_files/` beside it."""
    from tokenflow.video import atomic_output

    path = Path(path)
    embed = len(records) <= EMBED_UP_TO if embed is None else embed
    if embed:
        text = render(records, title=title, progress=progress)
        with atomic_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path
    folder = path.with_name(f"{path.stem}_files")
    with atomic_output(folder, directory=True) as tmp_dir:  # the images first: the page never links to nothing
        text = render(records, title=title, files=tmp_dir, files_link=folder.name, progress=progress)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


__all__ = ["write_report", "render", "EMBED_UP_TO"]

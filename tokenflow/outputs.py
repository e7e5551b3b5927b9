"""Writing the results of an edit: files staged under temporary names and renamed together when all are done.

Shared by single edits (`tokenflow.cli`) and batches (`tokenflow.batch`): `Staging` holds any set of files
and folders until `commit`, `Outputs` is the file set of a single edit (mp4, side YAML, optional PNG
frames and side-by-side), `write_outputs` writes it, `written_config` is the side YAML's content.
"""
from __future__ import annotations

import re
import signal
from pathlib import Path

import yaml

from tokenflow import __version__
from tokenflow.config import EditConfig
from tokenflow.errors import TokenFlowError

PROG = "tokenflow-edit"
DEFAULT_OUT_DIR = Path("tokenflow_out")
RESULT_KEY = "result"  # what a run measured (--metrics), written to the side YAML and ignored when it is read


def slug(text: str, n: int = 40) -> str:
    """A prompt as a short file-name part: `a red car!` -> `a-red-car`."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:n].rstrip("-") or "edit"


class Staging:
    """Files and folders written under hidden temporary names next to their final names (same filesystem,
    so each rename is atomic) and renamed together by `commit`, or removed by `discard`."""

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []

    def stage(self, final: Path, *, directory: bool = False) -> Path:
        from tokenflow.video import temp_path
        if final.parent == DEFAULT_OUT_DIR:
            DEFAULT_OUT_DIR.mkdir(exist_ok=True)
        tmp = temp_path(final, directory=directory)
        self._staged.append((tmp, final))
        return tmp

    def commit(self) -> None:
        from tokenflow.video import commit
        # SIGINT and SIGTERM are held off for the few renames, so the outputs appear all together or not at all
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for tmp, final in self._staged:
                commit(tmp, final)
            self._staged.clear()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def discard(self) -> None:
        from tokenflow.video import remove
        for tmp, _ in self._staged:
            remove(tmp)
        self._staged.clear()


class Outputs(Staging):
    """The files of one edit: the mp4, its side YAML, and optionally PNG frames, a side-by-side mp4 and an
    HTML report."""

    def __init__(self, video: Path, *, png: bool, side_by_side: bool, report: bool = False):
        super().__init__()
        self.video = video
        self.config = video.with_suffix(".yaml")
        self.png = video.with_name(f"{video.stem}_frames") if png else None
        self.side_by_side = video.with_name(f"{video.stem}_side_by_side.mp4") if side_by_side else None
        self.report = video.with_name(f"{video.stem}_report.html") if report else None

    def paths(self) -> list[Path]:
        return [p for p in (self.video, self.config, self.png, self.side_by_side, self.report) if p is not None]

    def check(self, overwrite: bool, input_file: Path) -> None:
        from tokenflow.video import check_output
        for p in self.paths():
            if p.parent == DEFAULT_OUT_DIR and not p.parent.exists():
                continue
            check_output(p, overwrite=overwrite)
            if p.resolve() == input_file.resolve():
                raise TokenFlowError(f"output {p} is the input; choose another output path (the input is never written)")


def written_config(cfg: EditConfig, sel: dict, src_label: str, size: tuple[int, int]) -> dict:
    """The config a rerun needs to reproduce this run: paths made absolute, the processing size filled in
    (except in reference mode, where the size given decides the reference's two-step resize)."""
    d = cfg.to_dict()
    if not cfg.match_reference:
        d["width"], d["height"] = size
    for k in ("depth", "cache_dir", "model_config"):
        if d[k] is not None:
            d[k] = str(Path(d[k]).expanduser().resolve())
    if Path(cfg.model).expanduser().exists():
        d["model"] = str(Path(cfg.model).expanduser().resolve())
    head = {"input": src_label, "first_frame": sel["first_frame"], "stride": sel["stride"]}
    if sel["fps"] is not None:
        head["fps"] = str(sel["fps"])
    return {**head, **d}


def config_text(cfg: EditConfig, sel: dict, src_label: str, size: tuple[int, int], n: int, out_fps,
                timings: dict[str, float], written: str, config_name: str, metrics: dict | None = None) -> str:
    """The side YAML (named `config_name`): a header saying what wrote it and how to rerun it as a single
    edit, then `written_config`, and with `metrics` (tokenflow.metrics.evaluate's result) what was measured."""
    data = written_config(cfg, sel, src_label, size)
    if metrics is not None:
        from tokenflow.metrics import metric_values
        data[RESULT_KEY] = {"frames": n, "size": list(size), "fps": str(out_fps), "seconds": dict(timings),
                            "metrics": metric_values(metrics)}
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    header = (f"# {PROG} {__version__}: the settings of the run that wrote {written}\n"
              f"# rerun: {PROG} --config {config_name} -o NEW.mp4\n"
              f"# result: {n} frames {size[0]}x{size[1]} at {out_fps} fps; {fmt_timings(timings)}\n")
    if cfg.model.startswith("tiny-random"):
        header += "# model tiny-random: random weights, the output is MEANINGLESS\n"
    return header + text


def fmt_timings(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}s" for k, v in t.items())


def write_outputs(outputs: Outputs, edited, frames, cfg, sel, info, src, fps, size, crf: int, timings, quiet,
                  metrics: dict | None = None) -> None:
    from tokenflow.video import encode_video, save_png_frames, side_by_side

    n = len(edited)
    out_fps = fps / sel["stride"]
    audio = dict(audio_from=None if info.is_folder else src, audio_start=float(sel["first_frame"] / fps),
                 audio_duration=float(n / out_fps))
    try:
        encode_video(outputs.stage(outputs.video), edited, out_fps, crf=crf, total=n, progress=not quiet, **audio)
        if outputs.side_by_side is not None:
            encode_video(outputs.stage(outputs.side_by_side), side_by_side(frames[:n], edited), out_fps,
                         crf=crf, total=n, progress=not quiet, **audio)
        if outputs.png is not None:
            save_png_frames(outputs.stage(outputs.png, directory=True), edited)
        label = "sample" if str(sel["input"]) == "sample" else str(src.resolve())
        outputs.stage(outputs.config).write_text(
            config_text(cfg, sel, label, size, n, out_fps, timings, outputs.video.name, outputs.config.name, metrics))
        if outputs.report is not None:
            from tokenflow.metrics.cli import edit_record
            from tokenflow.report import render
            record = edit_record(outputs.video.stem, cfg.prompt, label, outputs.video, frames[:n], edited, timings,
                                 metrics, model=cfg.model, fps=float(out_fps))
            outputs.stage(outputs.report).write_text(render([record], title=f"TokenFlow edit: {outputs.video.name}"),
                                                     encoding="utf-8")
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise

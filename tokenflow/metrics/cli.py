"""`tokenflow-edit eval`: score edits with the evaluation metrics, print a table, write JSON and a report.

    tokenflow-edit eval EDITED [EDITED ...] [--source SOURCE] [--prompt "..."] [--json OUT.json] [--report OUT.html]

EDITED: an edit (video or folder of frames). The source, the prompt and the frame selection default to
those in the edit's side YAML (EDITED with .yaml, as `tokenflow-edit` writes it); --source/--prompt
override them. Also the `--metrics`/`--report` options of single edits (`add_edit_options`,
`edit_result`), so the CLI itself only wires them in.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml

from tokenflow import __version__
from tokenflow.errors import TokenFlowError
from tokenflow.metrics.names import (DEFAULT_CHUNK, DEFAULT_CLIP_MODEL, DEFAULT_PICK_MODEL, DEFAULT_PICK_PROCESSOR,
                                     FLOWS, METRICS, NUMBERS, metric_values)

PROG = "tokenflow-edit eval"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise TokenFlowError(f"{message} (see {PROG} --help)")


def _metric_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {', '.join(bad) or text!r}; choose from {', '.join(METRICS)}")
    return names


def _chunk(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def add_model_options(g) -> None:
    """Options shared by `eval` and single edits' --metrics."""
    g.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, metavar="ID|DIR",
                   help=f"CLIP for the CLIP metrics: hub id in the Hugging Face cache, local folder, or tiny-random "
                        f"(random weights, meaningless numbers) (default: {DEFAULT_CLIP_MODEL})")
    g.add_argument("--pick-model", default=DEFAULT_PICK_MODEL, metavar="ID|DIR",
                   help=f"PickScore model (default: {DEFAULT_PICK_MODEL}; skipped when not in the cache)")
    g.add_argument("--pick-processor", default=DEFAULT_PICK_PROCESSOR, metavar="ID|DIR",
                   help=f"PickScore's processor (default: {DEFAULT_PICK_PROCESSOR})")
    g.add_argument("--flow", choices=FLOWS, default="dis",
                   help="optical flow of the warp error: OpenCV DIS, or torchvision's RAFT when its weights are in "
                        "the torch hub cache (default: dis)")
    g.add_argument("--metrics-device", dest="metrics_device", default=None, metavar="DEVICE",
                   help="device of the metric models (default: cuda when available)")
    g.add_argument("--metrics-chunk", dest="metrics_chunk", type=_chunk, default=DEFAULT_CHUNK, metavar="N",
                   help=f"frames per metric step (default: {DEFAULT_CHUNK})")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=f"{PROG}: score edited videos with CLIP text alignment, CLIP frame "
                "consistency, PickScore and warp error; print a table, optionally write JSON and an HTML report.",
                epilog="Metric models are read from the Hugging Face cache or a folder, never downloaded: a missing "
                       "one is named with its `hf download` command and the other metrics still run.")
    p.add_argument("edited", nargs="+", help="edited video(s) or folder(s) of frames; each one's side YAML "
                   "(same name, .yaml) gives its source, prompt and frame selection unless overridden")
    p.add_argument("--source", help="the video the edit was made from (`sample`: the bundled clip)")
    p.add_argument("--prompt", help="the edit's prompt (for CLIP text alignment and PickScore)")
    p.add_argument("--metrics", type=_metric_list, default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(METRICS)} (default: all the inputs allow)")
    g = p.add_argument_group("source frame selection (default: from the side YAML, else every frame)")
    g.add_argument("--start", type=int, default=None, help="first source frame of the edit")
    g.add_argument("--stride", type=int, default=None, help="source frame step of the edit")
    g.add_argument("--resize", choices=("crop", "pad", "stretch"), default=None,
                   help="how the source is brought to the edit's size, as the edit did (default: crop)")
    m = p.add_argument_group("models")
    add_model_options(m)
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="OUT", help="write the results to OUT (one object, or a list for several edits)")
    o.add_argument("--report", metavar="OUT.html", help="write an HTML report of the edits (self-contained)")
    o.add_argument("--overwrite", action="store_true", help="replace existing --json/--report files")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def side_yaml(edited: Path) -> dict:
    """The settings `tokenflow-edit` wrote beside an edit ({} when there are none)."""
    path = edited.with_suffix(".yaml") if edited.suffix else edited.with_name(edited.name + ".yaml")
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TokenFlowError(f"{path} is not valid YAML ({' '.join(str(e).split())[:120]}); fix it or give --source "
                             f"and --prompt") from None
    return data if isinstance(data, dict) else {}


def _job(args, edited: str) -> dict:
    """What to evaluate for one EDITED: flags first, then its side YAML."""
    cfg = side_yaml(Path(edited))
    resize = args.resize or ("stretch" if cfg.get("match_reference") else cfg.get("resize", "crop"))
    return dict(edited=edited, source=args.source or cfg.get("input"), prompt=args.prompt or cfg.get("prompt"),
                start=args.start if args.start is not None else int(cfg.get("first_frame", 0)),
                stride=args.stride if args.stride is not None else int(cfg.get("stride", 1)), resize=resize,
                seconds=(cfg.get("result") or {}).get("seconds") or {}, model=cfg.get("model"))


def run_eval(args, edited, source, prompt, *, start=0, stride=1, resize="crop", metrics=None) -> dict:
    from tokenflow.metrics.evaluation import evaluate

    return evaluate(edited, source, prompt, metrics, clip_model=args.clip_model, pick_model=args.pick_model,
                    pick_processor=args.pick_processor, flow=args.flow, device=args.metrics_device,
                    chunk_frames=args.metrics_chunk, start=start, stride=stride, resize=resize,
                    progress=not args.quiet)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"


def table(result: dict) -> str:
    """The metrics of one `evaluate` result as a text table (skipped metrics with their reason)."""
    rows = [(k, _fmt(result.get(k)), NUMBERS[k][1]) for k in NUMBERS if k in result]
    rows += [(k, "skipped", why) for k, why in result.get("skipped", {}).items()]
    w = max(len(r[0]) for r in rows) if rows else 6
    return "\n".join([f"{'metric':<{w}}  {'value':>8}  definition"] +
                     [f"{k:<{w}}  {v:>8}  {d}" for k, v, d in rows])


def write_text_atomic(path: Path, text: str) -> None:
    from tokenflow.video import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None) -> int:
    from tokenflow.cli import _fail  # the CLI's one-line error format and exit code

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except TokenFlowError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def _main(argv: list[str]) -> int:
    from tokenflow.video import check_output

    args = build_parser().parse_args(argv)
    outs = [Path(p).expanduser() for p in (args.json, args.report) if p]
    for p in outs:
        check_output(p, overwrite=args.overwrite)
    jobs = [_job(args, e) for e in args.edited]
    results, records = [], []
    for job in jobs:
        t0 = time.perf_counter()
        r = run_eval(args, job["edited"], job["source"], job["prompt"], start=job["start"], stride=job["stride"],
                     resize=job["resize"], metrics=args.metrics)
        r = {"edited": str(job["edited"]), **{k: v for k, v in r.items() if k != "edited"}}
        results.append(r)
        if not args.quiet:
            for line in [*r["notes"], *(f"{k} skipped: {v}" for k, v in r["skipped"].items())]:
                print(f"{PROG}: note: {line}", file=sys.stderr, flush=True)
        print(f"{job['edited']}: {r['frames']} frames {r['size'][0]}x{r['size'][1]}"
              f"{' | source ' + str(r['source']) if r.get('source') else ''}"
              f"{' | prompt ' + repr(r['prompt']) if r.get('prompt') else ''}\n{table(r)}", flush=True)
        seconds = {**job["seconds"], "eval": time.perf_counter() - t0}
        records.append(dict(name=Path(job["edited"]).stem, prompt=r.get("prompt"), status="done",
                            output=str(job["edited"]), input=job["source"], first_frame=job["start"],
                            stride=job["stride"], resize=job["resize"], frames=r["frames"], size=r["size"],
                            seconds=seconds, metrics=metric_values(r), model=job["model"], models=r["models"]))
    if not any(metric_values(r) for r in results):
        raise TokenFlowError("no metric could be computed: " + "; ".join(
            f"{k}: {v}" for r in results for k, v in r["skipped"].items()))
    if args.json:
        data = results[0] if len(results) == 1 else results
        write_text_atomic(Path(args.json).expanduser(), json.dumps(data, indent=2) + "\n")
    if args.report:
        from tokenflow.report import write_report
        write_report(records, Path(args.report).expanduser(), progress=not args.quiet)
    return 0


# -- single edits: `tokenflow-edit INPUT --prompt ... --metrics --report` ------------------------------

def add_edit_options(group) -> None:
    """--metrics and --report for single edits (and the model options of --metrics)."""
    group.add_argument("--metrics", action="store_true",
                       help="score the edit (CLIP text alignment, CLIP frame consistency, PickScore, warp error), "
                            "print the table and add the numbers to the side YAML under `result`")
    group.add_argument("--report", action="store_true",
                       help="also write OUT_report.html: source | edit strip, animated preview, metrics, time per stage")
    add_model_options(group)


def edit_result(args, edited, source, prompt: str, timings: dict, quiet: bool) -> dict | None:
    """After a single edit: its metrics (with --metrics, printed as a table), else None."""
    if not args.metrics:
        return None
    t0 = time.perf_counter()
    r = run_eval(args, edited, source, prompt)
    timings["eval"] = time.perf_counter() - t0
    if not quiet:
        for line in [*r["notes"], *(f"{k} skipped: {v}" for k, v in r["skipped"].items())]:
            print(f"tokenflow-edit: note: {line}", file=sys.stderr, flush=True)
    print(table(r), flush=True)
    return r


def edit_record(name: str, prompt: str, input_label: str, output: Path, frames, edited, timings: dict,
                metrics: dict | None, **extra) -> dict:
    """The report record of a single edit (frames in memory: nothing is decoded again)."""
    return dict(name=name, prompt=prompt, status="done", input=input_label, output=str(output), frames=len(edited),
                size=[edited.shape[3], edited.shape[2]], seconds=dict(timings),
                metrics=metric_values(metrics) if metrics else {}, models=(metrics or {}).get("models", {}),
                source_frames=frames, edited_frames=edited, **extra)

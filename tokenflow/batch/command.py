"""`tokenflow-edit batch MANIFEST... -o ROOT`: the command line of a batch."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tokenflow import __version__
from tokenflow.batch.layouts import LAYOUTS
from tokenflow.batch.runner import PROG
from tokenflow.config import EditConfig, positive_rate
from tokenflow.errors import TokenFlowError

EPILOG = """\
MANIFEST is our manifest (YAML/JSON/CSV: `defaults` and `items` of video, prompt, inversion_prompt, name and
per-item settings) or a suite's own file, used as it is: FiVE-Bench's data/edit_prompt/edit{1..6}_FiVE.json
(several at once), V2VBench's YAML index, LOVEU-TGVE 2023's LOVEU-TGVE_2023_data.xlsx (or its CSV export).
Outputs go where the suite's evaluation reads them (--layout, default: the suite's own; `plain` for a
manifest). ROOT/results.jsonl gets one line per item; a rerun skips the items already done with the same
settings. Several processes: torchrun --nproc-per-node N -m tokenflow.batch ... (or --nproc N)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise TokenFlowError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    from tokenflow.cli import _add_config_flags, _nonneg_int

    p = _Parser(prog=PROG, description=f"{PROG}: edit every item of a manifest or benchmark suite in one run "
                "(each model loaded once, each video inverted once).", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", nargs="+", type=Path, help="manifest or suite file(s), all of one kind")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="ROOT",
                   help="output folder (made if missing): the outputs, results.jsonl and summary.json")
    p.add_argument("--layout", choices=LAYOUTS, help="where outputs go (default: the suite's own layout; plain for "
                   "a manifest): plain ROOT/<name>.mp4 + .yaml; fivebench ROOT/<video_name>/<save_dir>/img_ode/; "
                   "v2vbench ROOT/<video_id>/<edit index>/; loveu ROOT/<subset>/<video>/<edit type>/")
    p.add_argument("--data", type=Path, metavar="DIR", help="the suite's source videos, where they are not in its "
                   "usual place beside the file (FiVE-Bench: the data/ folder; V2VBench: a folder of <video_id> "
                   "frame folders or videos; LOVEU-TGVE: the folder holding DAVIS_480p/ youtube_480p/ videvo_480p/)")
    p.add_argument("--config", metavar="YAML", help="settings for every item (EditConfig keys), below the manifest's "
                   "`defaults`")
    p.add_argument("--overwrite", action="store_true", help="re-edit every item, replacing its outputs")
    p.add_argument("--retry-failed", action="store_true", help="retry the items that failed in an earlier run "
                   "(otherwise they stay failed until their settings change)")
    p.add_argument("--nproc", type=int, metavar="N", help="run N processes (torch.distributed.run, one node), each "
                   "on GPU LOCAL_RANK or the CPU, taking whole videos")
    p.add_argument("--crf", type=_nonneg_int, default=18, help="H.264 quality of the plain layout (default: 18)")
    g = p.add_argument_group("input selection (every item; an item's own keys win)")
    g.add_argument("--start", "--first-frame", dest="first_frame", type=_nonneg_int, default=argparse.SUPPRESS,
                   help="first input frame to use, 0-based (config key: first_frame)")
    g.add_argument("--stride", type=int, default=argparse.SUPPRESS, help="use every STRIDE-th frame (config key: stride)")
    g.add_argument("--fps", type=positive_rate, default=argparse.SUPPRESS, help="frame rate of frame-folder inputs")
    s = p.add_argument_group("edit settings for every item (each also a config key; an item's own keys win)")
    _add_config_flags(s)
    m = p.add_argument_group("messages").add_mutually_exclusive_group()
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-item lines: errors and the "
                   "summary only")
    m.add_argument("-v", "--verbose", action="store_true", help="also the engine's log (and tracebacks of failed items)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _fail(lines: list[str]) -> int:
    for line in lines:
        print(f"{PROG}: error: {' '.join(str(line).split())}", file=sys.stderr)
    sys.stderr.flush()
    return 2


def main(argv: list[str] | None = None, *, metrics=None) -> int:
    """Exit code: 0 all done or skipped, 1 some item failed, 2 a problem of the command or manifest (nothing
    was run), 130 interrupted. `metrics`: see tokenflow.batch.runner."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except TokenFlowError as e:
        return _fail([str(e)])
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:
        from tokenflow.distributed import check_nproc, launch, without_nproc
        try:  # a count this machine cannot run, before any process starts (as tokenflow-edit --nproc)
            check_nproc(args.nproc, getattr(args, "device", None))
        except TokenFlowError as e:
            return _fail([str(e)])
        if args.nproc > 1:
            return launch(args.nproc, "tokenflow.batch", without_nproc(argv))
    _setup_logging(args)
    ranks = None
    try:
        from tokenflow.batch import plan as planning
        from tokenflow.batch.ranks import Ranks, from_env
        from tokenflow.batch.runner import Options, Runner
        from tokenflow.batch.suites import read_sources
        from tokenflow.cli import load_config_file

        config = load_config_file(args.config) if args.config else {}
        flags = {k: getattr(args, k) for k in [*EditConfig.keys(), "first_frame", "stride", "fps"] if hasattr(args, k)}
        rank_env = Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                         int(os.environ.get("LOCAL_RANK", "0")))
        source = read_sources([p.expanduser() for p in args.manifest], args.data.expanduser() if args.data else None)
        root = args.output.expanduser().resolve()
        plan = planning.build(source, root, args.layout, config, flags, args.crf, device=rank_env.device)
        if plan.problems:
            return _fail(plan.problems) if rank_env.rank == 0 else 2
        if not plan.items:
            return _fail(["the manifest has no items"]) if rank_env.rank == 0 else 2
        if rank_env.rank == 0 and any(it.cfg and it.cfg.model.startswith("tiny-random") for it in plan.items):
            from tokenflow.cli import _tiny_warning
            _tiny_warning()
        ranks = from_env()
        opts = Options(root, overwrite=args.overwrite, retry_failed=args.retry_failed, quiet=args.quiet, crf=args.crf)
        return Runner(plan, opts, ranks, metrics=metrics).run()
    except TokenFlowError as e:
        return _fail([str(e)])
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; finished items are recorded in results.jsonl and skipped by a rerun of the "
              f"same command, which resumes the item in progress from its edit checkpoint", file=sys.stderr)
        return 130
    finally:
        if ranks is not None:
            ranks.close()


def _setup_logging(args) -> None:
    log = logging.getLogger("tokenflow")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING)

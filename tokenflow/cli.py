"""`tokenflow-edit`: edit a video with a prompt from the terminal.

    tokenflow-edit INPUT --prompt "..." [-o OUT.mp4]     invert (or reuse the latent store), then edit
    tokenflow-edit invert INPUT [...]                    only the inversion, into the latent store
    tokenflow-edit edit INPUT --prompt "..." [...]       edit with the stored inversion
    tokenflow-edit cache ls|verify|rm|prune [...]        manage the latent store (tokenflow/cache_admin.py)
    tokenflow-edit eval EDITED [--source S --prompt P]   score an edit (tokenflow.metrics.cli)
    tokenflow-edit --nproc N INPUT ...                   one video on N GPUs (torchrun; tokenflow/distributed.py)

Settings come from three layers: EditConfig's defaults < a YAML file (`--config`, our keys or the
reference's) < flags. Every EditConfig field gets a flag generated from the dataclass, so flags, config
keys and defaults cannot drift apart. Outputs are staged under temporary names and renamed together
at the end: a failed or interrupted run leaves no partial output.
"""
from __future__ import annotations

import argparse
import errno
import inspect
import logging
import os
import re
import signal
import sys
import time
import typing
from dataclasses import MISSING, fields
from fractions import Fraction
from pathlib import Path

import yaml

from tokenflow import __version__
from tokenflow.config import DTYPES, MODES, RESIZE, EditConfig, check_selection, positive_rate
from tokenflow.errors import TokenFlowError
from tokenflow.outputs import DEFAULT_OUT_DIR, PROG, RESULT_KEY, Outputs, write_outputs
from tokenflow.outputs import fmt_timings as _fmt_timings
from tokenflow.outputs import slug as _slug

COMMANDS = ("run", "invert", "edit")
# Commands with a parser of their own: name -> module whose `main(argv)` runs them.
SUBCOMMANDS = {"batch": "tokenflow.batch", "cache": "tokenflow.cache_admin", "eval": "tokenflow.metrics.cli"}

# Flags whose name is not the field name: `start` is the reference's SDEdit key, so `--start` is left
# to the input's first frame, as video tools name it; `--frames` reads better than `--n-frames`.
FLAG_NAMES = {"start": ("--sdedit-start",), "n_frames": ("--frames", "--n-frames")}


def flags_of(key: str) -> tuple[str, ...]:
    """The flags of EditConfig key `key`, the first one the name the help and messages use."""
    return FLAG_NAMES.get(key, (f"--{key.replace('_', '-')}",))
CHOICES = {"mode": MODES, "resize": RESIZE, "dtype": DTYPES}
HELP = {
    "prompt": "what the edited video should show",
    "negative_prompt": "what it should not show",
    "inversion_prompt": "prompt of the DDIM inversion (the reference uses an empty one)",
    "model": "hub id, local diffusers folder, .safetensors/.ckpt checkpoint, or tiny-random "
             "(random weights: meaningless output, for smoke tests)",
    "seed": "seeds the keyframe draws and any noise",
    "guidance_scale": "classifier-free guidance scale",
    "n_frames": "number of input frames to edit (after --start and --stride); none: all",
    "height": "processing height, a multiple of 8; none: from the input (longer side 512, aspect kept)",
    "width": "processing width, a multiple of 8; none: from the input (longer side 512, aspect kept)",
    "resize": "keep the aspect ratio and crop or pad to the size, or stretch as the reference",
    "match_reference": "reproduce the reference's semantics exactly: frames stretched (square inputs to "
                       "512x512), frame count rounded down to a multiple of --batch-size",
    "depth": "depth video or folder of depth frames for a depth model (read with the same --start/--stride)",
}
# Config-file keys the CLI itself handles (the input selection); the rest are EditConfig keys.
CLI_KEYS = ("input", "first_frame", "stride", "fps")

log = logging.getLogger("tokenflow")


# -- argument parsing --------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the problem and where to look
        _fail(f"{message} (see {PROG} --help)")


def _fail(message: str, code: int = 2, error: BaseException | None = None):
    from tokenflow.distributed import current
    line = current().say(message, error)  # one rank of several says it (None: another rank does)
    if line is not None:
        print(f"{PROG}: error: {' '.join(str(line).split())}", file=sys.stderr)
    sys.exit(code)


def _field_comments() -> dict[str, str]:
    """The trailing `# ...` comment of each EditConfig field: the help text lives with the default."""
    out = {}
    for line in inspect.getsource(EditConfig).splitlines():
        m = re.match(r"\s+(\w+):[^=#]+=[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _optional(convert):
    def parse(text: str):
        if text.lower() in ("none", "auto", ""):
            return None
        return convert(text)
    parse.__name__ = convert.__name__  # argparse names the type in its error message
    return parse


def _nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise ValueError(text)
    return v


_nonneg_int.__name__ = "non-negative int"


def _crf(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 51:  # H.264's CRF scale
        raise ValueError(text)
    return v


_crf.__name__ = "H.264 CRF (0-51)"


def _scalar_or_list(convert):
    """`X` or a comma-separated `X,Y,...` (one value per ControlNet): a list only when there are several."""
    def parse(text: str):
        values = [convert(p.strip()) for p in text.split(",")]
        return values if len(values) > 1 else values[0]
    parse.__name__ = f"{convert.__name__} or comma-separated list"
    return parse


def _add_config_flags(group) -> None:
    hints = typing.get_type_hints(EditConfig)
    comments = _field_comments()
    for f in fields(EditConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if optional else hint
        lists = [typing.get_args(a)[0] for a in args if typing.get_origin(a) is list]
        if lists:  # X | list[X]: one value, or several separated by commas
            base = _scalar_or_list(lists[0])
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = HELP.get(f.name) or comments.get(f.name) or f.name.replace("_", " ")
        shown = "none" if default is None else repr(default) if isinstance(default, str) else default
        help_text = f"{help_text} (default: {shown}; config key: {f.name})".replace("%", "%%")
        names = flags_of(f.name)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if base is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        kw["type"] = _optional(base) if optional else base
        kw["metavar"] = "|".join(CHOICES[f.name]) if f.name in CHOICES else \
            f"{lists[0].__name__.upper()}[,...]" if lists else base.__name__.upper()
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        group.add_argument(*names, **kw)


def build_parser(command: str = "run") -> argparse.ArgumentParser:
    what = {"run": "invert the video (or reuse its stored inversion), then edit it with the prompt",
            "invert": "DDIM-invert the video into the latent store, so later edits skip this stage",
            "edit": "edit with the stored inversion (computed first when the store has none)"}[command]
    prog = PROG if command == "run" else f"{PROG} {command}"
    p = _Parser(
        prog=prog, description=f"{prog}: {what}.",
        epilog=f"Commands: `{PROG} INPUT ...` (invert + edit), `{PROG} invert INPUT ...`, `{PROG} edit INPUT ...`, "
               f"`{PROG} batch MANIFEST... -o ROOT` (a manifest or benchmark suite), `{PROG} eval EDITED ...` (metrics), "
               f"`{PROG} cache ls|verify|rm|prune` (the latent store); each has its own --help. "
               f"Each config key is a flag and vice versa; flags override --config. A file named like a "
               f"command or `sample` is given as ./NAME.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", default=None,
                   help="video file (mp4/mov/webm/mkv/gif), folder of image frames, or `sample` (the bundled "
                        "clip); may come from the config file's `input` (or the reference's `data_path`)")
    p.add_argument("--config", metavar="YAML", help="settings file: our keys (as written beside every output) "
                   "or the reference's config_pnp.yaml keys")
    g = p.add_argument_group("input selection")
    g.add_argument("--start", "--first-frame", dest="first_frame", type=_nonneg_int, default=argparse.SUPPRESS,
                   help="first input frame to use, 0-based (default: 0; config key: first_frame)")
    g.add_argument("--stride", type=int, default=argparse.SUPPRESS,
                   help="use every STRIDE-th frame; the output plays at input fps / STRIDE (default: 1; config key: stride)")
    g.add_argument("--fps", type=positive_rate, default=argparse.SUPPRESS,
                   help="frame rate of a folder-of-frames input (default: 24; config key: fps); videos keep their own")
    if command != "invert":
        o = p.add_argument_group("output")
        o.add_argument("-o", "--output", metavar="OUT",
                       help=f"output .mp4, or an existing folder (default: {DEFAULT_OUT_DIR}/<input>_<prompt>.mp4); "
                            f"the config used is written to OUT with .yaml")
        o.add_argument("--png", action="store_true", help="also write the frames as PNGs to OUT_frames/")
        o.add_argument("--side-by-side", action="store_true", help="also write input | edit to OUT_side_by_side.mp4")
        o.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        o.add_argument("--crf", type=_crf, default=18, help="H.264 quality, 0-51, lower is better (default: 18)")
        from tokenflow.metrics.cli import add_edit_options
        add_edit_options(p.add_argument_group("evaluation"))
    s = p.add_argument_group("edit settings (each also a config key)")
    _add_config_flags(s)
    from tokenflow.threads import THREADS_ENV, thread_count
    p.add_argument("--threads", type=thread_count, metavar="N",
                   help=f"CPU threads of a CPU run (default: ${THREADS_ENV}, else the cores this process may use "
                        f"minus the busy ones, by the load average; OMP_NUM_THREADS, when set, is left alone)")
    m = p.add_argument_group("messages").add_mutually_exclusive_group()
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes: errors and the summary line only")
    m.add_argument("-v", "--verbose", action="store_true", help="also the engine's log")
    p.add_argument("--nproc", type=int, metavar="N", help="edit the one video with N processes on this node (one GPU "
                   "each, or the CPU), started with torch.distributed.run; the same as torchrun --nproc-per-node N "
                   "-m tokenflow.cli ... (default: 1, no launcher)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """`tokenflow-edit invert ...` / `edit ...`; anything else is the default command (run)."""
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    return "run", argv


# -- settings ----------------------------------------------------------------------------------------

def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TokenFlowError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TokenFlowError(f"config file {p} is not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TokenFlowError(f"config file {p} must be a mapping of keys to values, not a {type(data).__name__}")
    return data


def resolve(args: argparse.Namespace) -> tuple[EditConfig, dict]:
    """(EditConfig, input selection) from defaults < --config file < flags."""
    data = load_config_file(args.config) if args.config else {}
    sel = {"input": None, "first_frame": 0, "stride": 1, "fps": None}
    data.pop(RESULT_KEY, None)
    if "data_path" in data:  # the reference's input key: the folder its preprocessing extracted frames to
        sel["input"] = data.pop("data_path")
        sel["data_path"] = args.input is None
    for k in CLI_KEYS:
        if k in data:
            sel[k] = data.pop(k)
    flags = {k: getattr(args, k) for k in EditConfig.keys() if hasattr(args, k)}
    for k in ("first_frame", "stride", "fps"):
        if hasattr(args, k):
            sel[k] = getattr(args, k)
    if args.input is not None:
        sel["input"] = args.input
    if sel["input"] is None:
        raise TokenFlowError("no input: give a video file, a folder of frames or `sample` (or `input:` in --config)")
    check_selection(sel, {"first_frame": "--start", "stride": "--stride", "fps": "--fps"})
    merged = {**data, **flags}
    if merged.get("match_reference") and merged.get("resize", "stretch") != "stretch":
        raise TokenFlowError(f"--match-reference stretches frames as the reference does, which conflicts with "
                             f"--resize {merged['resize']}; drop one of them")
    cfg = EditConfig.from_mapping(merged)
    return cfg, sel


def input_path(name: str, *, data_path: bool = False, quiet: bool = True) -> Path:
    """The input's path. `data_path`: it came from the reference's key, which names the frame folder its
    preprocessing extracted from `NAME.mp4`: when that folder is not there, the video is used."""
    if str(name) == "sample":
        from tokenflow.sample import sample_path
        return sample_path()
    path = Path(name).expanduser()
    if data_path and not path.exists():
        from tokenflow.video import videos_named_like
        like = videos_named_like(path)
        if like:
            _note(quiet, f"data_path {path} (the reference's folder of extracted frames) is not there; using "
                         f"{like[0]}, the video it is extracted from")
            return like[0]
    return path


def output_paths(args, cfg: EditConfig, src: Path) -> Outputs:
    name = f"{src.stem}_{_slug(cfg.prompt)}.mp4"
    if args.output is None:  # the default folder is made when the outputs are written, not before
        video = DEFAULT_OUT_DIR / name
    else:
        out = Path(args.output).expanduser()
        if args.output.endswith(("/", os.sep)) or out.is_dir():
            if not out.is_dir():
                raise TokenFlowError(f"output folder {out} does not exist; create it or choose another -o")
            video = out / name
        elif out.suffix.lower() != ".mp4":
            raise TokenFlowError(f"-o {args.output}: the output is an H.264 .mp4 file (or an existing folder); "
                                 f"use a name ending in .mp4")
        else:
            video = out
    outputs = Outputs(video, png=args.png, side_by_side=args.side_by_side, report=args.report)
    outputs.check(args.overwrite, src)
    from tokenflow.video import check_writable
    # The default folder is made at the end: then the folder it goes in must be writable.
    check_writable(video.parent if video.parent.is_dir() else video.parent.parent)
    return outputs


def preflight(cfg: EditConfig, sel: dict, info) -> None:
    """Every check that needs neither the model nor the frames, so a mistake costs a second, not the
    10-30 s of loading the model and reading the video: the device, the frame selection, the groups, the
    timestep grid (from the model's scheduler config, read without its weights when it can be)."""
    from tokenflow.keyframes import make_groups
    from tokenflow.models import resolve_device, scheduler_config
    from tokenflow.video import count_selected

    resolve_device(cfg.device)
    n = count_selected(info, sel["first_frame"], cfg.n_frames, sel["stride"])
    make_groups(n, cfg.batch_size, cfg.match_reference)
    config = scheduler_config(cfg.model, cfg.model_config)
    if config is not None:
        from tokenflow.schedule import Schedule
        Schedule.build(config, n_inversion_steps=cfg.n_inversion_steps, n_timesteps=cfg.n_timesteps, mode=cfg.mode,
                       start=cfg.start, pnp_attn_t=cfg.pnp_attn_t, pnp_f_t=cfg.pnp_f_t)


# -- running -----------------------------------------------------------------------------------------

def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _note(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _tiny_warning() -> None:
    bar = "!" * 78
    print(f"{bar}\n{PROG}: WARNING: --model tiny-random is a tiny model with RANDOM weights for smoke tests.\n"
          f"{PROG}: WARNING: its output is MEANINGLESS noise, not an edit. For a real edit use the default model\n"
          f"{PROG}: WARNING: (in the Hugging Face cache or downloadable), a local folder or --model PATH.\n{bar}",
          file=sys.stderr, flush=True)


def run(command: str, args: argparse.Namespace) -> int:
    from tokenflow import distributed
    from tokenflow.video import probe, resize_for

    cfg, sel = resolve(args)
    ranks = distributed.join(cfg.device)  # under torchrun: this rank's device and the process group
    quiet = args.quiet or not ranks.leader  # rank 0 draws the bars and notes
    if ranks.distributed:
        _setup_logging(args, f"{ranks}: ")
    if command != "invert" and not cfg.prompt.strip():
        raise TokenFlowError('the prompt is empty: say what the edited video should show (--prompt "...")')
    src = input_path(sel["input"], data_path=sel.get("data_path", False), quiet=quiet)
    info = probe(src)
    fps = sel["fps"] if (info.is_folder and sel["fps"]) else info.fps
    if info.fps_from is not None and not sel["fps"]:
        _note(quiet, f"frame rate {_fps(fps)} from {info.fps_from}, the video beside the frame folder (--fps to choose)")
    outputs = output_paths(args, cfg, src) if command != "invert" and ranks.leader else None
    depth_src = input_path(cfg.depth) if cfg.depth else None
    if depth_src is not None:
        probe(depth_src)
    from tokenflow.control import condition_videos
    control_src = [None if p is None else input_path(p) for p in condition_videos(cfg)]
    for p in control_src:
        if p is not None:
            probe(p)
    preflight(cfg, sel, info)
    via = resize_for(info.width, info.height, width=cfg.width, height=cfg.height,
                     match_reference=True).via if cfg.match_reference else None  # the same for every model
    if via is not None:
        _note(quiet, f"--match-reference: the reference edits square sizes at 512x512, so the {via[0]}x{via[1]} "
                     f"frames are stretched to 512x512 as it did; drop --match-reference to edit at {via[0]}x{via[1]}")

    from tokenflow.models import TINY_VARIANTS, resolve_device
    if resolve_device(cfg.device).type == "cpu":
        from tokenflow.threads import set_threads
        set_threads(args.threads, lambda msg: _note(quiet, msg))
    tiny = cfg.model in TINY_VARIANTS
    if tiny and ranks.leader:
        _tiny_warning()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _note(quiet, f"loading model {cfg.model}")
    from tokenflow.distributed_edit import editor_for
    editor = editor_for(cfg, ranks)
    timings["load"] = time.perf_counter() - t0
    # The default size is the model's native one: longer side 1024 for SDXL, 512 for SD 1.x/2.x.
    resize = resize_for(info.width, info.height, width=cfg.width, height=cfg.height, resize=cfg.resize,
                        match_reference=cfg.match_reference, long_side=1024 if editor.models.is_sdxl else 512)
    W, H = resize.width, resize.height

    from tokenflow.video import read_frames
    t0 = time.perf_counter()
    _note(quiet, f"reading {src} ({info.width}x{info.height}, {_count(info.frames, 'frame')} at {_fps(fps)} fps) "
                 f"-> {W}x{H} ({resize.policy})")
    frames = read_frames(src, start=sel["first_frame"], count=cfg.n_frames, stride=sel["stride"],
                         resize=resize, progress=not quiet)
    depth = None
    if depth_src is not None:
        depth = read_frames(depth_src, start=sel["first_frame"], count=len(frames), stride=sel["stride"],
                            resize=resize, progress=not quiet)
    control = None  # condition videos, read with the input's selection and size
    if any(p is not None for p in control_src):
        control = [None if p is None else read_frames(p, start=sel["first_frame"], count=len(frames),
                                                      stride=sel["stride"], resize=resize, progress=not quiet)
                   for p in control_src]
    timings["read"] = time.perf_counter() - t0
    job = editor.prepare(frames, cfg, depth=depth, control=control)
    ranks.agree()  # several ranks: all start the work, or all stop here with one message

    if command == "invert":
        stage: dict[str, float] = {}
        inv = editor.invert(job, progress=not quiet, _timings=stage)
        if not ranks.leader:
            return 0
        timings.update(stage)
        print(f"{PROG}: inverted {_count(len(frames), 'frame')} {W}x{H} into {inv.path}"
              f"{' (reused: already in the store)' if inv.reused else ''} | {_fmt_timings(timings)}"
              f"{' | tiny-random: MEANINGLESS' if tiny else ''}", flush=True)
        return 0

    res = editor.edit(job, progress=not quiet)
    if not ranks.leader:
        ranks.serve_frames(res.frames)  # to rank 0's writer, as it asks
        return 0
    timings.update(res.timings)
    if command == "edit" and not res.inversion_reused:
        _note(quiet, "no inversion of this video with these settings was in the store: it was computed now "
                     "(it depends on model, size, frames, inversion prompt, n_inversion_steps, n_timesteps)")
    from tokenflow.metrics.cli import edit_result
    # Several ranks: the frames stream from the other ranks to the writer, unless the metrics need them at once.
    edited = distributed.in_memory(res.frames) if (args.metrics or args.report) else res.frames
    metrics = edit_result(args, edited, frames[:len(edited)], cfg.prompt, timings, quiet)
    t0 = time.perf_counter()
    try:
        write_outputs(outputs, edited, frames, cfg, sel, info, src, fps, (W, H), args.crf, timings, quiet, metrics)
    except OSError as e:  # a full disk or a folder made read-only meanwhile: the edit itself is not lost
        e.tokenflow_where = f"the outputs in {outputs.video.parent.resolve()}"  # not the hidden temporary name
        e.tokenflow_note = ("the finished edit is kept in the latent store: the same command run again only "
                            "decodes and writes it" if res.checkpoint is not None else "")
        raise
    ranks.finish()
    timings["write"] = time.perf_counter() - t0
    peak = "n/a (CPU)" if res.peak_gpu_mem is None else f"{res.peak_gpu_mem / 2**30:.2f} GiB"
    if ranks.distributed:
        peak = f"{peak} (most of {ranks.world} ranks)"
    out_fps = fps / sel["stride"]
    was = "was" if res.resumed_steps == 1 else "were"
    resumed = f"edit resumed: {_count(res.resumed_steps, 'step')} {was} already done | "
    print(f"{PROG}: done: {_count(len(res.frames), 'frame')} {W}x{H} at {_fps(out_fps)} fps | {_fmt_timings(timings)} | "
          f"peak GPU memory {peak} | inversion {'reused' if res.inversion_reused else 'computed'} | "
          f"{resumed if res.resumed_steps else ''}"
          f"{outputs.video}{' | tiny-random: MEANINGLESS OUTPUT' if tiny else ''}", flush=True)
    return 0


def _fps(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"{f} (~{float(f):.3f})"


def _setup_logging(args, prefix: str = "") -> None:
    # Only the package's logger: other libraries keep their own handlers (configuring the root logger
    # would print their messages twice).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: {prefix}%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING)


def _describe(e: TokenFlowError) -> str:
    """The engine speaks in config keys (`e.key`); the user also gets the flag they typed."""
    if e.key in EditConfig.keys():
        return f"{e} (flag {flags_of(e.key)[0]}, config key {e.key})"
    return str(e)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a kill, a job scheduler's stop), handled as Ctrl-C: outputs discarded, the store kept."""


def _terminate(signum, frame):
    raise Terminated()


def os_error_line(e: OSError) -> str:
    """An OS error (a full disk, a read-only folder, ...) as one line: the path, the reason, the fix."""
    why = e.strerror or str(e)
    elsewhere = "write elsewhere (-o for the outputs, --cache-dir or TOKENFLOW_CACHE for the latent store)"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = f"free some space there, or {elsewhere}"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make it writable, or {elsewhere}"
    else:
        fix = "check the path and its disk"
    note = getattr(e, "tokenflow_note", "")
    where = getattr(e, "tokenflow_where", None)
    head = f"cannot write {where} ({why})" if where else f"{e.filename or 'a file'}: {why}"
    return f"{head}; {fix}{'; ' + note if note else ''}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    command, rest = split_command(argv)
    args = build_parser(command).parse_args(rest)
    from tokenflow import distributed
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:
        try:  # the settings' problems and a count this machine cannot run, before any process starts
            distributed.check_nproc(args.nproc, resolve(args)[0].device)
        except TokenFlowError as e:
            _fail(_describe(e))
        if args.nproc > 1:
            return distributed.launch(args.nproc, "tokenflow.cli", distributed.without_nproc(argv))
    _setup_logging(args)
    import threading
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    old_term = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return run(command, args)
    except TokenFlowError as e:
        _fail(_describe(e), getattr(e, "exit_code", 2), e)
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        if distributed.current().leader:
            print(f"\n{PROG}: {how}; no partial output is left (finished inversion chunks and edit steps stay in the "
                  f"latent store and are reused by the next run)", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130
    except OSError as e:
        _fail(os_error_line(e), 1, e)
    except MemoryError:
        _fail("out of host memory: select fewer frames (--frames, --stride) or a smaller size (--width/--height)", 1)
    except Exception as e:  # noqa: BLE001 - out of GPU memory is a user matter; anything else is a bug
        if type(e).__name__ == "OutOfMemoryError":
            _fail("out of GPU memory: cap it with --max-gpu-mem, lower --chunk-frames, or select fewer frames or "
                  "a smaller size", 1)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
        distributed.current().close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`tokenflow-edit cache ...`: list, check, remove and prune the entries of the latent store, and the
least-recently-used eviction that keeps the store under its size cap.

    tokenflow-edit cache ls                          entries: size, video, model, steps, last use, edits
    tokenflow-edit cache verify [--repair]           check every checksum; --repair removes damaged files
    tokenflow-edit cache rm KEY [KEY ...]            remove entries (a unique prefix of a key is enough)
    tokenflow-edit cache prune [--older-than DAYS] [--max-size SIZE]
Every command takes `--cache-dir DIR` (default: $TOKENFLOW_CACHE/latents, or ~/.cache/tokenflow/latents).
An entry in use by a running edit is never removed.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenflow.errors import TokenFlowError
from tokenflow.store_io import Damaged, load_json, open_tensors
from tokenflow.store_locks import LOCKS, Lock, entry_lock_path

log = logging.getLogger("tokenflow")

PROG = "tokenflow-edit cache"
KEY = re.compile(r"[0-9a-f]{24}")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}


# -- sizes -------------------------------------------------------------------------------------------

def parse_size(value, what: str = "size") -> int | None:
    """Bytes from 123, "123", "500M", "20G", "1.5GiB" (K, M, G, T: powers of 1024); None stays None."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgtp]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise TokenFlowError(f"{what} {value!r} is not a size: give bytes or a number with K, M, G or T "
                             f"(powers of 1024), e.g. 500M or 20G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- entries -----------------------------------------------------------------------------------------

@dataclass
class Entry:
    key: str
    path: Path
    size: int  # bytes of its files
    last_use: float  # seconds since the epoch: when a run last opened it
    files: list[Path] = field(default_factory=list)


def entries(root: Path) -> list[Entry]:
    """The entries under `root` (folders named by a key), with their sizes and last use."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if not KEY.fullmatch(d.name) or not d.is_dir():
            continue
        size, files = 0, []
        try:
            for f in sorted(d.iterdir()):
                try:
                    size += f.stat().st_size
                    files.append(f)
                except FileNotFoundError:  # removed meanwhile by a running edit
                    pass
            meta = d / "meta.json"
            last = meta.stat().st_mtime if meta.exists() else d.stat().st_mtime
        except FileNotFoundError:  # the entry was removed meanwhile
            continue
        out.append(Entry(d.name, d, size, last, files))
    return out


def remove_entry(root: Path, key: str) -> bool:
    """Remove entry `key` and its locks; False, without waiting, when a running process uses it.
    OSError when the files cannot be removed."""
    lock = Lock(entry_lock_path(root, key))
    if not lock.acquire(blocking=False):
        return False
    try:
        if (Path(root) / key).exists():
            shutil.rmtree(Path(root) / key)
        shutil.rmtree(Path(root) / LOCKS / key, ignore_errors=True)
        entry_lock_path(root, key).unlink(missing_ok=True)
    finally:
        lock.release()
    return True


def evict_to(root: Path, cap: int, keep: str | None = None, *, say=None) -> int:
    """Remove least recently used entries until the store holds at most `cap` bytes, skipping `keep` and
    entries in use by a running process; returns the bytes left."""
    found = entries(root)
    total = sum(e.size for e in found)
    for e in sorted(found, key=lambda e: e.last_use):
        if total <= cap:
            break
        if e.key == keep:
            continue
        try:
            removed = remove_entry(root, e.key)
        except OSError as err:
            log.warning("latent store: cannot remove %s to stay under the cap (%s)", e.path, err.strerror or err)
            continue
        if removed:
            total -= e.size
            line = (f"evicted {e.key} ({format_size(e.size)}, last used {_when(e.last_use)}) "
                    f"to stay under {format_size(cap)}")
            say(line) if say else log.info("latent store: %s", line)
    return total


def describe(e: Entry) -> dict:
    """What `cache ls` shows of an entry (best effort: a damaged file shows as unreadable)."""
    d = {"frames": None, "size": None, "model": None, "steps": None, "inversion": "partial", "edits": []}
    try:
        meta = load_json(e.path / "meta.json")
        key = meta.get("key", {})
        d.update(model=key.get("model"), steps=key.get("steps"), size=key.get("size"))
    except (OSError, Damaged):
        d["inversion"] = "damaged meta.json"
    try:
        with open_tensors(e.path / "x0.safetensors") as f:
            d["frames"] = f.get_slice("x0").get_shape()[0]
    except (OSError, Damaged):
        pass
    chunks = sorted(e.path.glob("frames_*.safetensors"))
    if (e.path / "complete").exists():
        d["inversion"] = "complete"
    elif d["inversion"] == "partial":
        d["inversion"] = f"partial ({len(chunks)} chunks)"
    for p in sorted(e.path.glob("edit_*.safetensors")):
        try:
            with open_tensors(p) as f:
                fields = json.loads((f.metadata() or {}).get("tokenflow.edit", "{}"))
                d["edits"].append((fields.get("prompt", "?"), int(f.get_tensor("step")) + 1, fields.get("n_timesteps")))
        except (OSError, Damaged, ValueError):
            d["edits"].append(("(unreadable checkpoint)", None, None))
    return d


def check_entry(e: Entry) -> tuple[list[tuple[Path, str, list[Path]]], list[Path], int]:
    """(problems as (file, what is wrong, files to remove to repair it), leftover temporary files, files
    checked), every checksum computed afresh. A damaged chunk goes with the `complete` marker that lists it."""
    problems, checked = [], 0
    meta = e.path / "meta.json"
    try:
        checked += 1
        load_json(meta)
    except FileNotFoundError:
        problems.append((meta, "is missing", [meta]))
    except (Damaged, OSError) as err:
        problems.append((meta, str(err), [meta]))
    marker = e.path / "complete"
    if marker.exists():
        checked += 1
        try:
            for name in load_json(marker)["chunks"]:
                if not (e.path / name).exists():
                    problems.append((e.path / name, "is missing (the inversion is listed as complete)", [marker]))
        except (Damaged, OSError, KeyError, TypeError) as err:
            problems.append((marker, str(err), [marker]))
    for p in sorted(e.path.glob("*.safetensors")):
        checked += 1
        try:
            with open_tensors(p, recheck=True):
                pass
        except FileNotFoundError:
            pass
        except (Damaged, OSError) as err:
            problems.append((p, str(err), [p, marker] if p.name.startswith("frames_") else [p]))
    leftovers = sorted(e.path.glob(".*.tmp"))
    return problems, leftovers, checked


# -- the command -------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise TokenFlowError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the flag may come before or after the command, and a subcommand's default must not
    # override one given before it.
    common.add_argument("--cache-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="the store's folder, as given to edits (default: $TOKENFLOW_CACHE/latents, "
                             "or ~/.cache/tokenflow/latents)")
    p = _Parser(prog=PROG, description="List, check and clean the latent store (inversions and edit checkpoints).",
                parents=[common])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("ls", parents=[common], help="list the entries: size, video, model, steps, last use, edits")
    v = sub.add_parser("verify", parents=[common], help="check every file's checksum")
    v.add_argument("--repair", action="store_true",
                   help="remove damaged files and leftover temporary files (the next run recomputes them)")
    r = sub.add_parser("rm", parents=[common], help="remove entries")
    r.add_argument("keys", nargs="+", metavar="KEY", help="an entry's key as `ls` shows it, or a unique prefix")
    pr = sub.add_parser("prune", parents=[common], help="remove old entries, or the least recently used ones "
                                                        "until the store fits a size")
    pr.add_argument("--older-than", type=float, metavar="DAYS", help="remove entries not used for DAYS days")
    pr.add_argument("--max-size", metavar="SIZE", help="remove least recently used entries until the store holds "
                                                      "at most SIZE (e.g. 20G)")
    return p


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _root(args) -> Path:
    if getattr(args, "cache_dir", None):
        return Path(args.cache_dir).expanduser()
    from tokenflow.latent_store import default_root
    return default_root()


def _ls(root: Path) -> int:
    found = entries(root)
    rows = [("KEY", "SIZE", "VIDEO", "MODEL", "STEPS", "LAST USE", "INVERSION", "EDITS (prompt, steps done)")]
    for e in sorted(found, key=lambda e: -e.last_use):
        d = describe(e)
        video = (f"{d['frames'] if d['frames'] is not None else '?'} frames"
                 + (f" {d['size'][1]}x{d['size'][0]}" if d["size"] else ""))
        edits = "; ".join(f"{json.dumps(prompt)} {done}/{total}" if done is not None else prompt
                          for prompt, done, total in d["edits"])
        rows.append((e.key, format_size(e.size), video, str(d["model"] or "?"), str(d["steps"] or "?"),
                     _when(e.last_use), d["inversion"], edits or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print(f"{len(found)} entries, {format_size(sum(e.size for e in found))} in {root}")
    return 0


def _verify(root: Path, repair: bool) -> int:
    damaged_left = n_files = n_removed = 0
    found = entries(root)
    for e in found:
        problems, leftovers, checked = check_entry(e)
        n_files += checked
        if not problems and not leftovers:
            print(f"{e.key}: ok ({checked} files)")
            continue
        for path, what, _ in problems:
            print(f"{e.key}: {path.name} {what}")
        if leftovers:
            print(f"{e.key}: {len(leftovers)} leftover temporary file(s) of an interrupted write")
        if not repair:
            damaged_left += len(problems)
            continue
        lock = Lock(entry_lock_path(root, e.key))
        if not lock.acquire(blocking=False):
            print(f"{e.key}: in use by a running process: not repaired (run verify --repair again later)")
            damaged_left += len(problems)
            continue
        try:
            for p in {f for _, _, fix in problems for f in fix} | set(leftovers):
                p.unlink(missing_ok=True)
                n_removed += 1
        finally:
            lock.release()
        print(f"{e.key}: repaired (the next run recomputes what was removed)")
    print(f"checked {n_files} files in {len(found)} entries under {root}: "
          + (f"{damaged_left} damaged; run `{PROG} verify --repair` to remove them" if damaged_left else
             f"{n_removed} file(s) removed" if repair and n_removed else "all whole"))
    return 1 if damaged_left else 0


def _rm(root: Path, keys: list[str]) -> int:
    found = entries(root)
    chosen = []
    for k in keys:
        match = [e for e in found if e.key.startswith(k.lower())]
        if not match:
            raise TokenFlowError(f"no entry {k!r} in {root} (see {PROG} ls)")
        if len(match) > 1:
            raise TokenFlowError(f"{k!r} matches {len(match)} entries in {root}; give more of the key")
        chosen.append(match[0])
    rc = 0
    for e in chosen:
        if remove_entry(root, e.key):
            print(f"removed {e.key} ({format_size(e.size)})")
        else:
            print(f"{e.key} is in use by a running process: not removed", file=sys.stderr)
            rc = 1
    return rc


def _prune(root: Path, older_than: float | None, max_size: str | None) -> int:
    if older_than is None and max_size is None:
        raise TokenFlowError("prune needs --older-than DAYS or --max-size SIZE (or both)")
    if older_than is not None and older_than < 0:
        raise TokenFlowError(f"--older-than {older_than} must be a number of days >= 0")
    cap = parse_size(max_size, "--max-size")
    busy = 0
    if older_than is not None:
        cutoff = time.time() - older_than * 86400
        for e in entries(root):
            if e.last_use < cutoff:
                if remove_entry(root, e.key):
                    print(f"removed {e.key} ({format_size(e.size)}, last used {_when(e.last_use)})")
                else:
                    busy += 1
    if cap is not None:
        evict_to(root, cap, say=print)
    left = entries(root)
    print(f"{len(left)} entries, {format_size(sum(e.size for e in left))} left in {root}"
          + (f"; {busy} in use by a running process were kept" if busy else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = None
    try:
        args = build_parser().parse_args(argv)
        root = _root(args)
        if args.command == "ls":
            return _ls(root)
        if args.command == "verify":
            return _verify(root, args.repair)
        if args.command == "rm":
            return _rm(root, args.keys)
        return _prune(root, args.older_than, args.max_size)
    except TokenFlowError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e.filename or root}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

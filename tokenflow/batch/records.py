"""`ROOT/results.jsonl`: one line per item as it finishes, what a rerun reads to skip finished items.

A line: {"id", "status": done | skipped | failed, "reason" (failed: one line), "frames", "size" (processing
[W, H]), "seconds": {read, invert, edit, decode, write}, "peak_gpu_mem" (bytes, null on the CPU),
"inversion_reused", "resumed_steps", "outputs" (paths relative to ROOT), "settings_hash", "rank", "time",
"metrics" (the metrics hook's result, when one is set)}. The file only grows: the last line of an id is its
state. With several ranks each appends to `results.rank<r>.jsonl` as it goes; rank 0 folds those into
`results.jsonl` at the end (and at the start, after a run that died before doing so).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
# Settings that change how an edit runs, not what it makes: not part of an item's settings hash.
NOT_HASHED = ("cache_dir", "device", "resume", "chunk_frames", "max_gpu_mem")


def settings_hash(cfg_dict: dict, sel: dict, video_fingerprint: list, layout: str, extra: dict) -> str:
    d = {k: v for k, v in cfg_dict.items() if k not in NOT_HASHED}
    blob = {"cfg": d, "sel": {k: str(v) for k, v in sel.items()}, "video": video_fingerprint, "layout": layout,
            **extra}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def video_fingerprint(path: Path) -> list:
    """Cheap identity of a source: its resolved path and size in bytes (a folder: its files' count and sizes)."""
    p = path.resolve()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        return [str(p), len(files), sum(f.stat().st_size for f in files)]
    return [str(p), p.stat().st_size]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Records:
    def __init__(self, root: Path, rank: int = 0, world: int = 1):
        self.root = root
        self.path = root / RESULTS
        self.own = self.path if world == 1 else root / f"results.rank{rank}.jsonl"

    def parts(self) -> list[Path]:
        return sorted(self.root.glob("results.rank*.jsonl"))

    def fold_parts(self, order: list[str] | None = None) -> None:
        """Append the ranks' lines to results.jsonl (in `order` of ids, then as found) and remove the parts."""
        parts = self.parts()
        if not parts:
            return
        lines = [r for p in parts for r in _lines(p)]
        rank_of = {i: n for n, i in enumerate(order or [])}
        lines.sort(key=lambda r: rank_of.get(r.get("id"), len(rank_of)))
        with open(self.path, "a") as f:
            for r in lines:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for p in parts:
            p.unlink()

    def latest(self) -> dict[str, dict]:
        """The last line of each id (a torn last line, from a killed run, is ignored)."""
        out: dict[str, dict] = {}
        for p in [self.path, *self.parts()]:
            for r in _lines(p):
                out[r["id"]] = r
        return out

    def append(self, record: dict) -> None:
        """One line, flushed to disk before the next item starts (a killed run loses at most the item in progress)."""
        with open(self.own, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _lines(path: Path) -> list[dict]:
    """The records of one file; a torn line (a run killed while writing it) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "id" in r:
            out.append(r)
    return out


def write_summary(root: Path, summary: dict) -> None:
    from tokenflow.store_io import atomic_write
    atomic_write(root / SUMMARY, json.dumps(summary, indent=1).encode())


def summary_table(s: dict) -> str:
    """The closing table: items, frames and seconds per status, then the totals."""
    rows = [("done", s["done"], s["frames_done"], f"{s['seconds_editing']:.1f}"),
            ("skipped", s["skipped"], s["frames_skipped"], "-"),
            ("failed", s["failed"], "-", "-")]
    per = "n/a" if s["seconds_per_frame"] is None else f"{s['seconds_per_frame']:.2f} s per edited frame"
    lines = [f"{'status':<8} {'items':>6} {'frames':>7} {'seconds':>9}"]
    lines += [f"{a:<8} {b:>6} {c:>7} {d:>9}" for a, b, c, d in rows]
    lines.append(f"{'total':<8} {s['items']:>6} {'':>7} {s['seconds']:>9.1f}  ({per}; {s['model_loads']} model "
                 f"load(s), {s['inversions']} inversion(s) computed, {s['world_size']} rank(s))")
    return "\n".join(lines)

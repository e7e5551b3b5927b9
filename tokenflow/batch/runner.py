"""Running a planned batch on one rank: each model loaded once, each video read once and inverted once per
inversion prompt, all its prompts edited while its frames and inversion are at hand.

Per item: edit (resuming from its checkpoint in the latent store), write its outputs atomically, append its
record. A failure of one item (its setting, its video, out of memory after the OOM retries, any error) is
recorded with its one-line reason and the batch goes on; Ctrl-C stops at once, losing at most the item in
progress (its edit checkpoint resumes it on the next run).

`metrics`: an optional hook `metrics(item, source_frames, edited_frames) -> dict`, called after an item is
written; its result is stored in the item's record under "metrics" (where `tokenflow.metrics.evaluate` plugs in).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tokenflow.batch.layouts import Written
from tokenflow.batch.plan import Item, Plan
from tokenflow.batch.ranks import Ranks, shard
from tokenflow.batch.records import Records, now, summary_table, write_summary
from tokenflow.errors import TokenFlowError
from tokenflow.progress import bar

PROG = "tokenflow-edit batch"
log = logging.getLogger("tokenflow")


@dataclass
class Options:
    root: Path
    overwrite: bool = False
    retry_failed: bool = False
    quiet: bool = False
    crf: int = 18


def reason(e: BaseException) -> str:
    """An exception as one line, said as the CLI says it."""
    if isinstance(e, TokenFlowError):
        return " ".join(str(e).split())
    if isinstance(e, MemoryError):
        return "out of host memory: select fewer frames (n_frames, stride) or a smaller size (width/height)"
    if type(e).__name__ == "OutOfMemoryError":
        return ("out of GPU memory after the OOM retries: cap it with max_gpu_mem, lower chunk_frames, or select "
                "fewer frames or a smaller size")
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _groups(items: list[Item], key: Callable) -> list[list[Item]]:
    """Items grouped by key, groups in order of first appearance, items in their order."""
    out: dict = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return list(out.values())


class Runner:
    def __init__(self, plan: Plan, opts: Options, ranks: Ranks | None = None, metrics: Callable | None = None):
        self.plan = plan
        self.opts = opts
        self.ranks = ranks or Ranks()
        self.metrics = metrics
        self.records = Records(opts.root, self.ranks.rank, self.ranks.world)
        self.show = not opts.quiet and self.ranks.rank == 0  # one rank draws bars: several would interleave
        self.loads = self.inversions = self.inversions_reused = 0
        self.done_here = 0

    # -- what to do ------------------------------------------------------------------------------------
    def decide(self) -> dict[str, tuple[str, object]]:
        """id -> (todo | skip | fail | earlier, the earlier record or the reason), from results.jsonl (rank 0).
        earlier: it failed in an earlier run with the same settings, and is not retried without --retry-failed."""
        latest = {} if self.opts.overwrite else self.records.latest()
        out = {}
        for it in self.plan.items:
            prev = latest.get(it.id)
            if it.error:
                out[it.id] = ("fail", it.error)
            elif prev and prev.get("settings_hash") == it.hash:
                outputs_there = all((self.opts.root / p).exists() for p in prev.get("outputs", [])) and prev.get("outputs")
                if prev["status"] in ("done", "skipped") and outputs_there:
                    out[it.id] = ("skip", prev)
                elif prev["status"] == "failed" and not self.opts.retry_failed:
                    out[it.id] = ("earlier", prev.get("reason"))
                else:
                    out[it.id] = ("todo", None)
            else:
                out[it.id] = ("todo", None)
        return out

    def mine(self, todo: list[Item]) -> list[Item]:
        """This rank's items: whole videos, longest first, balanced by frames x prompts."""
        videos = _groups(todo, lambda it: str(it.spec.video.resolve()))
        costs = {str(v[0].spec.video.resolve()): sum(it.frames for it in v) for v in videos}
        owner = shard(costs, self.ranks.world)
        order = sorted(videos, key=lambda v: (-costs[str(v[0].spec.video.resolve())], str(v[0].spec.video.resolve())))
        return [it for v in order if owner[str(v[0].spec.video.resolve())] == self.ranks.rank for it in v]

    # -- running ---------------------------------------------------------------------------------------
    def run(self) -> int:
        t0 = time.perf_counter()
        order = [it.id for it in self.plan.items]
        decisions = None
        if self.ranks.rank == 0:
            self.opts.root.mkdir(parents=True, exist_ok=True)
            self.records.fold_parts(order)  # what a multi-rank run that died left unmerged
            decisions = self.decide()
        decisions = self.ranks.broadcast(decisions)
        if self.ranks.rank == 0:
            for it in self.plan.items:
                what, data = decisions[it.id]
                if what == "skip":
                    self.records.append({**data, "status": "skipped", "rank": 0, "time": now(), "seconds": {}})
                elif what in ("fail", "earlier"):
                    self.records.append(self._record(it, status="failed", reason=data, earlier=what == "earlier"))
        todo = [it for it in self.plan.items if decisions[it.id][0] == "todo"]
        mine = self.mine(todo)
        with bar(desc=f"{PROG}" + (f" rank 0/{self.ranks.world}" if self.ranks.distributed else ""), total=len(mine),
                 unit="item", enabled=self.show) as pb:
            self.pb = pb
            self._run(mine)
        stats = self.ranks.gather({"model_loads": self.loads, "inversions": self.inversions,
                                   "inversions_reused": self.inversions_reused})
        code = 0
        if self.ranks.rank == 0:
            self.records.fold_parts(order)
            code = self._summarise(stats, time.perf_counter() - t0)
        self.ranks.barrier()  # every rank leaves together: none tears its gloo group down while a peer still uses it
        return code

    def _run(self, mine: list[Item]) -> None:
        from tokenflow.editor import TokenFlowEditor

        for by_model in _groups(mine, Item.model_key):
            try:
                editor = TokenFlowEditor.from_config(by_model[0].cfg)
                self.loads += 1
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - recorded per item, the batch goes on
                self._fail_all(by_model, e)
                continue
            for by_video in _groups(by_model, Item.frames_key):
                self._video(editor, by_video)
            del editor

    def _video(self, editor, items: list[Item]) -> None:
        from tokenflow.video import read_frames

        it0 = items[0]
        t = time.perf_counter()
        try:
            frames = read_frames(it0.spec.video, start=it0.sel["first_frame"], count=it0.cfg.n_frames,
                                 stride=it0.sel["stride"], resize=it0.resize, progress=self.show)
            depth = None
            if it0.cfg.depth:
                depth = read_frames(Path(it0.cfg.depth).expanduser(), start=it0.sel["first_frame"], count=len(frames),
                                    stride=it0.sel["stride"], resize=it0.resize, progress=self.show)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001
            self._fail_all(items, e)
            return
        read_s = time.perf_counter() - t
        for group in _groups(items, Item.inversion_key):
            tim: dict[str, float] = {}
            try:  # the first item's job serves the inversion and its own edit: resolved once
                job = self._prepare(editor, group[0], frames, depth)
                inv = editor.invert(job, progress=self.show, _timings=tim)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001
                self._fail_all(group, e)
                continue
            self.inversions += not inv.reused
            self.inversions_reused += inv.reused
            invert_s = sum(tim.values())
            for k, it in enumerate(group):
                first = k == 0
                self._edit(editor, it, job if first else None, frames, depth, inv, read_s if it is it0 else 0.0,
                           invert_s if first else 0.0, inv.reused or not first)

    def _condition_videos(self, it: Item, n: int):
        """Mode controlnet's condition videos of the item, read with its frame selection (None: none given)."""
        from tokenflow.control import condition_videos
        from tokenflow.video import read_frames

        paths = condition_videos(it.cfg)
        if not any(paths):
            return None
        return [None if p is None else read_frames(Path(p).expanduser(), start=it.sel["first_frame"], count=n,
                                                   stride=it.sel["stride"], resize=it.resize) for p in paths]

    def _prepare(self, editor, it: Item, frames, depth):
        return editor.prepare(frames, it.cfg, depth=depth, control=self._condition_videos(it, len(frames)))

    def _edit(self, editor, it: Item, job, frames, depth, inv, read_s: float, invert_s: float, reused: bool) -> None:
        rec = self._record(it, inversion_reused=reused)
        try:
            res = editor.edit(job or self._prepare(editor, it, frames, depth), progress=self.show, inversion=inv)
            t = time.perf_counter()
            fps = it.sel["fps"] if (it.info.is_folder and it.sel["fps"]) else it.info.fps
            seconds = {"read": read_s, "invert": invert_s, "edit": res.timings.get("edit", 0.0),
                       "decode": res.timings.get("decode", 0.0)}
            w = Written(it.cfg, it.sel, it.info, it.spec.video, fps, it.resize, dict(seconds), self.opts.crf, True)
            self.plan.layout.write(self.opts.root, it.spec.address, res.frames, w)
            seconds["write"] = time.perf_counter() - t
            rec.update(status="done", frames=len(res.frames), size=[res.frames.shape[3], res.frames.shape[2]],
                       seconds={k: round(v, 3) for k, v in seconds.items()}, peak_gpu_mem=res.peak_gpu_mem,
                       resumed_steps=res.resumed_steps)
            if self.metrics is not None:
                try:
                    rec["metrics"] = self.metrics(it, frames[:len(res.frames)], res.frames)
                except Exception as e:  # noqa: BLE001 - a metric's failure does not undo the edit
                    rec["metrics_error"] = reason(e)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001
            log.debug("%s failed", it.id, exc_info=True)
            rec.update(status="failed", reason=reason(e))
        self._finish(rec)

    def _record(self, it: Item, **extra) -> dict:
        root = self.opts.root
        return {"id": it.id, "status": None, "reason": None, "video": str(it.spec.video.resolve()), "prompt":
                it.cfg.prompt if it.cfg else it.spec.settings.get("prompt"), "frames": it.frames,
                "outputs": [str(p.relative_to(root)) for p in it.outputs], "settings_hash": it.hash,
                "rank": self.ranks.rank, "time": now(), **extra}

    def _fail_all(self, items: list[Item], e: BaseException) -> None:
        for it in items:
            self._finish(self._record(it, status="failed", reason=reason(e)))

    def _finish(self, rec: dict) -> None:
        rec["time"] = now()
        self.records.append(rec)
        self.done_here += 1
        self.pb.update()
        if self.show:
            secs = sum((rec.get("seconds") or {}).values())
            what = rec["status"] if rec["status"] != "failed" else f"FAILED ({rec['reason']})"
            self.pb.write(f"{PROG}: [{self.done_here}/{self.pb.total}] {what}: {rec['id']}"
                          + (f" ({rec['frames']} frames, {secs:.1f} s, inversion "
                             f"{'reused' if rec.get('inversion_reused') else 'computed'})" if rec["status"] == "done" else ""))

    # -- closing ---------------------------------------------------------------------------------------
    def _summarise(self, stats: list[dict], seconds: float) -> int:
        latest = self.records.latest()
        recs = [latest[it.id] for it in self.plan.items if it.id in latest]
        by = {s: [r for r in recs if r["status"] == s] for s in ("done", "skipped", "failed")}
        frames_done = sum(r.get("frames") or 0 for r in by["done"])
        s = {"items": len(self.plan.items), "done": len(by["done"]), "skipped": len(by["skipped"]),
             "failed": len(by["failed"]), "frames_done": frames_done,
             "frames_skipped": sum(r.get("frames") or 0 for r in by["skipped"]),
             "seconds": round(seconds, 3),
             "seconds_editing": round(sum(sum((r.get("seconds") or {}).values()) for r in by["done"]), 3),
             "seconds_per_frame": round(seconds / frames_done, 4) if frames_done else None,
             "model_loads": sum(x["model_loads"] for x in stats), "model_loads_per_rank": [x["model_loads"] for x in stats],
             "inversions": sum(x["inversions"] for x in stats),
             "inversions_reused": sum(x["inversions_reused"] for x in stats),
             "world_size": self.ranks.world, "layout": self.plan.layout.name, "root": str(self.opts.root),
             "failures": [{"id": r["id"], "reason": r["reason"], "earlier": bool(r.get("earlier"))} for r in by["failed"]],
             "time": now()}
        write_summary(self.opts.root, s)
        print(summary_table(s), flush=True)
        import sys
        for f in s["failures"]:
            again = " (in an earlier run; --retry-failed tries it again)" if f["earlier"] else ""
            print(f"{PROG}: failed: {f['id']}: {f['reason']}{again}", file=sys.stderr, flush=True)
        return 1 if by["failed"] else 0

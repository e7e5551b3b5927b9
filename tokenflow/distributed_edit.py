"""The editor side of a distributed edit (tokenflow.distributed has the ranks, the launcher and the messages):
the keyframe pass's all-gathers and the hand-over of the records of each rank's last keyframe (`Comm`,
`RankPart`), each rank's checkpoint (`RankCheckpoint`), the sharded inversion and the result
(`DistributedEditor`).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tokenflow import ops
from tokenflow.config import EditConfig
from tokenflow.distributed import RankFrames, Ranks, current
from tokenflow.editing import Part
from tokenflow.editor import EditResult, Inversion, TokenFlowEditor, _timed
from tokenflow.errors import TokenFlowError
from tokenflow.inversion import encode_frames, invert_into_store
from tokenflow.job import EditJob, resolve
from tokenflow.latent_store import EditCheckpoint, LatentStore
from tokenflow.windowed import window_of

log = logging.getLogger("tokenflow")

ATTN_BLOCK_QUERIES = 4096  # query rows per SDPA call (bounds the math backend's logits on the CPU)


# -- the keyframe pass across ranks ------------------------------------------------------------------

@dataclass
class CommStats:
    gathered_bytes: int = 0  # keys and values received from the other ranks in the keyframe passes
    boundary_bytes: int = 0  # records of the previous rank's last keyframe received
    steps: int = 0  # keyframe passes run


class Comm:
    """The keyframe pass's collectives on the work's device group (NCCL on GPUs, gloo on the CPU), counted."""

    def __init__(self, ranks: Ranks, counts: list[int]):
        self.ranks, self.counts = ranks, counts
        self.device = ranks.comm_device
        self.stats = CommStats()

    def _all_gather(self, out: torch.Tensor, send: torch.Tensor) -> None:
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.ranks._collective("the keyframe pass", gather, out, send, group=self.ranks.group)

    def _exchange(self, send: torch.Tensor | None, recv: torch.Tensor | None) -> None:
        r = self.ranks.rank
        g = self.ranks.group
        p2p = ([dist.P2POp(dist.isend, send, r + 1, group=g)] if send is not None else []) + \
              ([dist.P2POp(dist.irecv, recv, r - 1, group=g)] if recv is not None else [])
        for req in self.ranks._collective("the keyframe pass", dist.batch_isend_irecv, p2p):
            self.ranks._collective("the keyframe pass", req.wait)

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """[k_r, S, C] on rank r -> [K, S, C] on every rank, the ranks' rows in rank order. The all-gather
        takes equal parts, so each is padded to the busiest rank's count; the rows are then moved together."""
        world, m = self.ranks.world, max(self.counts)
        send = local.to(self.device)
        if len(send) < m:
            send = torch.cat([send, send.new_zeros(m - len(send), *send.shape[1:])])
        buf = send.new_empty(world * m, *send.shape[1:])
        self._all_gather(buf, send.contiguous())
        self.stats.gathered_bytes += (world - 1) * send.numel() * send.element_size()
        pos = 0
        for r, c in enumerate(self.counts):
            if r * m != pos:  # row by row: the blocks overlap
                for i in range(c):
                    buf[pos + i].copy_(buf[r * m + i])
            pos += c
        return buf[:pos].to(local.device)

    def pass_last_keyframe(self, records) -> None:
        """Send the records of this rank's last keyframe to the next rank; receive the previous rank's into
        the row reserved in front of this rank's records."""
        world, r = self.ranks.world, self.ranks.rank
        layers = records.layers()
        last = [records.last(layer) for layer in layers]
        send = torch.cat([t.reshape(-1).to(self.device) for pair in last for t in pair]) if r + 1 < world else None
        recv = None
        if r > 0:
            n = sum(t.numel() for pair in last for t in pair)
            recv = torch.empty(n, dtype=last[0][0].dtype, device=self.device)
        self._exchange(send, recv)
        self.stats.steps += 1
        if recv is None:
            return
        self.stats.boundary_bytes += recv.numel() * recv.element_size()
        pos = 0
        for layer, (f, o) in zip(layers, last):
            feats = recv[pos:pos + f.numel()].view(f.shape)
            pos += f.numel()
            out = recv[pos:pos + o.numel()].view(o.shape)
            pos += o.numel()
            records.fill_lead(layer, feats, out)


def _heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[n, S, C] -> [1, heads, n*S, d]: the frames' tokens as one sequence."""
    n, S, C = t.shape
    return t.reshape(1, n * S, heads, C // heads).transpose(1, 2)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int, *, scale: float,
           window: int | None = None, first: int = 0) -> torch.Tensor:
    """Extended attention of one branch for some of the keyframes: q [k, S, C] (keyframes first, first + 1,
    ... of K) against the keys and values [K, S, C] of all K keyframes; [k, S, C]. With `window` < K each
    keyframe sees only its window (tokenflow.windowed, same rule and computation)."""
    k, S, C = q.shape
    K = len(keys)
    if window and window < K:
        out = torch.empty_like(q, dtype=values.dtype)
        for i in range(k):
            sel = window_of(first + i, K, window)
            o = F.scaled_dot_product_attention(_heads_first(q[i:i + 1], heads), _heads_first(keys[sel], heads),
                                               _heads_first(values[sel], heads), scale=scale)
            out[i] = o.transpose(1, 2).reshape(S, C)
        return out
    # As the reference backend (tokenflow.ops.reference): float32 on the CPU, whose math backend also needs the
    # queries in blocks (it materialises the logits); on GPUs the native dtype, and one fused call.
    cpu = q.device.type == "cpu"
    dt = torch.float32 if cpu else q.dtype
    qf, kf, vf = (_heads_first(t.to(dt), heads) for t in (q, keys, values))
    if cpu and qf.shape[2] > ATTN_BLOCK_QUERIES:
        o = torch.cat([F.scaled_dot_product_attention(qf[:, :, i:i + ATTN_BLOCK_QUERIES], kf, vf, scale=scale)
                       for i in range(0, qf.shape[2], ATTN_BLOCK_QUERIES)], dim=2)
    else:
        o = F.scaled_dot_product_attention(qf, kf, vf, scale=scale)
    return o.transpose(1, 2).reshape(k, S, C).to(values.dtype)


class RankPart(Part):
    """A rank's groups (tokenflow.editing.Part), with what ties its keyframe pass to the other ranks'."""

    def __init__(self, groups: range, frames: range, comm: Comm):
        super().__init__(groups, frames, groups.start - 1 if groups.start > 0 else 0, solo=False)
        self.comm = comm

    def keyframe_attention(self, q, k, v, heads: int, *, shared_qk: bool, scale: float, window: int | None,
                           backend: str | None = None) -> torch.Tensor:
        """tokenflow.ops.extended_attention's contract, for this rank's keyframes, over every rank's: the source
        branch attends within each frame (local); branches >= 1 attend over the keys and values of all
        keyframes, gathered one branch at a time (with Q/K sharing the source keys once for both)."""
        R = v.shape[0]
        out = torch.empty_like(v)
        out[:1] = ops.extended_attention(q[:1], k[:1], v[:1], heads, scale=scale, backend=backend)
        shared_keys = self.comm.gather_rows(k[0]) if shared_qk else None
        for r in range(1, R):
            keys = shared_keys if shared_qk else self.comm.gather_rows(k[r])
            values = self.comm.gather_rows(v[r])
            out[r] = attend(q[0] if shared_qk else q[r], keys, values, heads, scale=scale, window=window,
                            first=self.groups.start)
            del keys, values  # one branch's gathered rows at a time
        return out

    def exchange(self, records) -> None:
        self.comm.pass_last_keyframe(records)


# -- checkpoints -------------------------------------------------------------------------------------

class RankCheckpoint:
    """A rank's edit checkpoint: its frames' latents after each step, in two files used in turn (even and odd
    steps). The ranks' saves are at most one step apart (each keyframe pass waits for every rank), so the
    latest step every rank holds is its latest or the one before: a rerun resumes all ranks there together.
    Keyed by the frames the rank edits: the edit resumes with the same number of ranks."""

    def __init__(self, store: LatentStore, key_fields: dict, part: Part, ranks: Ranks):
        base = {**key_fields, "frames": [part.frames.start, part.frames.stop], "ranks": ranks.world}
        self.slots = [EditCheckpoint(store, {**base, "slot": s}) for s in (0, 1)]
        self.ranks = ranks
        self._agreed: tuple | None = None

    @property
    def path(self):
        """The slot written last (slot 0's name when neither is written)."""
        written = [s.path for s in self.slots if s.path.is_file()]
        return max(written, key=lambda p: p.stat().st_mtime_ns) if written else self.slots[0].path

    def _agree(self):
        held = [d for d in (s.load() for s in self.slots) if d is not None]
        latest = max((d[0] for d in held), default=-1)
        step = min(self.ranks.all_gather_object(latest, "resuming the edit"))
        mine = next((d for d in held if d[0] == step), None)
        everyone = all(self.ranks.all_gather_object(step < 0 or mine is not None, "resuming the edit"))
        if step >= 0 and not everyone:
            log.warning("edit checkpoints: not every rank holds step %d; the edit restarts from its first step", step)
        return (mine,) if step >= 0 and everyone else (None,)

    def load(self) -> tuple[int, torch.Tensor] | None:
        if self._agreed is None:
            self._agreed = self._agree()
        return self._agreed[0]

    def step(self) -> int | None:
        done = self.load()
        return None if done is None else done[0]

    def save(self, step: int, x: torch.Tensor) -> None:
        self.slots[step % 2].save(step, x)

    def discard(self) -> None:
        for s in self.slots:
            s.discard()


# -- the editor --------------------------------------------------------------------------------------

@dataclass
class DistributedResult(EditResult):
    """EditResult of one rank: `frames` on rank 0 are every rank's (RankFrames, streamed from the others);
    on the others, and `latents` everywhere, this rank's frames `part` only."""

    part: range = range(0)
    peak_gpu_mem_per_rank: list = field(default_factory=list)
    comm: dict = field(default_factory=dict)  # bytes received per keyframe pass, this rank


class DistributedEditor(TokenFlowEditor):
    """TokenFlowEditor for one rank of a distributed edit (module docstring). Every rank calls the same methods
    with the same frames and config."""

    def __init__(self, models, ranks: Ranks, *, cache_dir: str | Path | None = None):
        super().__init__(models, cache_dir=cache_dir)
        self.ranks = ranks
        self._comm: Comm | None = None

    @classmethod
    def from_config(cls, cfg: EditConfig, ranks: Ranks | None = None) -> "DistributedEditor":
        from tokenflow.editor import models_for

        ranks = ranks or current()
        return cls(models_for(cfg, ranks.device), ranks, cache_dir=cfg.cache_dir)

    def prepare(self, frames: torch.Tensor, cfg: EditConfig, *, depth: torch.Tensor | None = None,
                control=None) -> EditJob:
        if cfg.reconstruct and self.ranks.distributed:
            raise TokenFlowError("the reconstruction check runs in one process: drop --reconstruct or run it "
                                 "without --nproc", key="reconstruct")
        return resolve(self.models, frames, cfg, depth, control, ranks=self.ranks.world)

    def _frames_of(self, job: EditJob, r: int) -> range:
        p = job.parts[r]
        return range(job.groups[p.start].start, job.groups[p.stop - 1].stop)

    def invert(self, frames, cfg=None, *, progress: bool = True, depth=None, control=None,
               _timings: dict | None = None) -> Inversion:
        job = self._job(frames, cfg, depth, control)
        self.ranks.agree()  # (the CLI agrees earlier, right after its setup)
        if len(job.parts) != self.ranks.world:
            raise TokenFlowError(f"the job was prepared for {len(job.parts)} rank(s), this run has {self.ranks.world}")
        cfg, ranks, m = job.cfg, self.ranks, self.models
        timings = {} if _timings is None else _timings

        def open_store():
            return LatentStore(cfg.cache_dir or self.cache_dir, self._store_key(job),
                               job.memory.inversion_frames_per_call, max_size=cfg.cache_max_size)
        # Rank 0 first: it creates (or heals) meta.json, and every rank then reads the same chunking from it.
        store = open_store() if ranks.leader else None
        ranks.barrier("opening the latent store")
        store = store or open_store()
        mine = self._frames_of(job, ranks.rank)
        counts = [len(self._frames_of(job, r)) for r in range(ranks.world)]
        with _timed(timings, "encode"):
            if not ranks.broadcast(ranks.leader and store.load_x0() is not None, "reading the latent store"):
                x0 = ranks.gather_rows(encode_frames(m, job.frames[mine.start:mine.stop], job.vae, progress), counts,
                                       "the encoding of the frames")
                if ranks.leader:
                    store.save_x0(x0)
                ranks.barrier("the encoding of the frames")
            x0 = store.load_x0()
            self._check_shared(store, x0 is not None, "x0.safetensors")
        emb = m.prompt_embeds([cfg.inversion_prompt], tuple(job.frames.shape[2:]))  # SDXL: with its added conditioning
        reused = ranks.broadcast(store.complete if ranks.leader else None, "reading the latent store")
        n = 0
        with _timed(timings, "invert"):
            if not reused:
                todo = ranks.broadcast([c for c in store.chunks(len(x0)) if not store.has_chunk(*c)] if ranks.leader
                                       else None, "reading the latent store")
                n = invert_into_store(m, store, x0, emb, job.schedule, job.depth, progress,
                                      todo=todo[ranks.rank::ranks.world], complete=False)
                ranks.barrier("the inversion (waiting for every rank's chunks)")
                self._check_shared(store, all(store.has_chunk(a, b) for a, b in todo[ranks.rank::ranks.world]),
                                   "the inverted chunks")
                if ranks.leader:
                    store.chunks(len(x0))
                    store.mark_complete()
                n = sum(ranks.all_gather_object(n, "the inversion"))
        return Inversion(store, x0, list(job.schedule.kept), reused, n, depth=job.depth)

    def _check_shared(self, store: LatentStore, ok: bool, what: str) -> None:
        """The ranks share the inversion through the store's files: every rank must have written and see them."""
        if all(self.ranks.all_gather_object(ok and store.writable, "reading the latent store")):
            return
        self.ranks.fail_all(
            f"the ranks share the inversion through the latent store, but {what} in {store.path} could not be "
            f"written or read by every rank: the store must be one folder all ranks can read and write, with room "
            f"(--cache-dir on a shared filesystem; see the warnings above)", key="cache_dir")

    def edit(self, frames, cfg=None, *, progress: bool = True, depth=None, inversion=None) -> EditResult:
        job = self._job(frames, cfg, depth)
        self.ranks.agree()
        return super().edit(job, progress=progress, inversion=inversion)

    def _part(self, job: EditJob) -> Part:
        counts = [len(p) for p in job.parts]
        self._comm = Comm(self.ranks, counts)
        return RankPart(job.parts[self.ranks.rank], self._frames_of(job, self.ranks.rank), self._comm)

    def _checkpoint(self, store: LatentStore, key_fields: dict, part: Part):
        return RankCheckpoint(store, key_fields, part, self.ranks)

    def _finish(self, job: EditJob, part: Part, result: EditResult) -> EditResult:
        ranks = self.ranks
        peaks = ranks.all_gather_object(result.peak_gpu_mem, "the end of the edit")
        stats = self._comm.stats
        per_step = {k: getattr(stats, k) // max(stats.steps, 1) for k in ("gathered_bytes", "boundary_bytes")}
        counts = [len(self._frames_of(job, r)) for r in range(ranks.world)]
        frames = RankFrames(result.frames, counts, ranks) if ranks.leader else result.frames
        known = [p for p in peaks if p is not None]
        return DistributedResult(**{**{f.name: getattr(result, f.name) for f in dataclasses.fields(EditResult)},
                                    "frames": frames, "peak_gpu_mem": max(known) if known else None},
                                 part=part.frames, peak_gpu_mem_per_rank=peaks, comm=per_step)


def editor_for(cfg: EditConfig, ranks: Ranks | None = None) -> TokenFlowEditor:
    """The editor for this process: a DistributedEditor on a rank of several, else a TokenFlowEditor."""
    ranks = ranks or current()
    if ranks.distributed:
        return DistributedEditor.from_config(cfg, ranks)
    return TokenFlowEditor.from_config(cfg)


# -- simulation (tokenflow.memsim) -------------------------------------------------------------------

class _SimulatedComm(Comm):
    """The collectives of one rank on the meta device: what they would receive is allocated, nothing is sent."""

    def _all_gather(self, out, send):
        pass

    def _exchange(self, send, recv):
        pass


def simulated_part(groups: list[range], parts: list[range], rank: int) -> tuple[RankPart, Comm]:
    """Rank `rank`'s part with collectives that only allocate, for tokenflow.memsim."""
    ranks = Ranks(rank, len(parts))
    ranks.comm_device = torch.device("meta")
    comm = _SimulatedComm(ranks, [len(p) for p in parts])
    mine = parts[rank]
    return RankPart(mine, range(groups[mine.start].start, groups[mine.stop - 1].stop), comm), comm

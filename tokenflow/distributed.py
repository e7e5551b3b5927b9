"""One video across several processes (GPUs): frame-parallel inversion and editing on torch.distributed.

    torchrun --nproc-per-node N -m tokenflow.cli VIDEO --prompt ...     (or: tokenflow-edit --nproc N ...)

Every rank runs on GPU LOCAL_RANK (NCCL) or on the CPU (gloo), reads the same video and resolves the same
job; the edit equals one process's, up to the regrouping of floating-point sums that chunking shows too.

- Inversion: rank 0 opens the latent-store entry first (so every rank reads one chunking from it). The VAE
  encoding is split between the ranks and gathered on rank 0, which stores x0. Rank 0 lists the chunks the
  store lacks; each rank inverts every N-th of them into the store; after a barrier rank 0 marks the
  inversion complete. The ranks share the inversion through the store, so it must be one folder all of them
  can read and write; a rerun inverts only the chunks still missing, with any number of ranks.
- Edit: rank r edits a contiguous range of groups (`EditJob.parts`), so their keyframes and frames. Every rank
  draws the same keyframes (the same seeded generator). In the keyframe pass each rank runs its own keyframes
  through the UNet, and every extended-attention layer all-gathers the keys and values of every rank's
  keyframes, one branch at a time (`RankPart.keyframe_attention`), so each keyframe attends to all keyframes
  as in one process. After the pass each rank sends the records of its last keyframe to the next rank, whose
  first group blends it (`RankPart.exchange`). Group passes, DDIM steps and checkpoints are local.
- Decode and write: each rank decodes its own frames; rank 0 writes the video, receiving the other ranks'
  frames in order, a few at a time, while the writer consumes them (`RankFrames`).
- Faults: collectives give up after TOKENFLOW_DIST_TIMEOUT seconds (default 1800; the setup, until every rank
  has loaded the model and read the video, waits at least 1800 s); a rank that fails says why in one line and
  exits, a lost peer ends the other ranks' collectives with an error (`LostRank`), and torchrun stops whatever
  is left. Finished inversion chunks and every rank's last two edit steps stay in
  the store, so a rerun resumes (the edit with the same number of ranks, the inversion with any).
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import TYPE_CHECKING

from tokenflow.errors import TokenFlowError

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the CLI says its errors (through `Ranks.say`) without loading it.

TIMEOUT_ENV = "TOKENFLOW_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800  # a rank may wait this long for the slowest one (an inversion chunk, the writer)
# Until every rank has loaded the model and read the video (which may take one rank much longer than another),
# collectives wait at least this long whatever the timeout.
SETUP_TIMEOUT_S = 1800
FRAMES_PER_MESSAGE = 16  # decoded frames per message to rank 0's writer (12 MB at 512x512)
_SEND, _DONE = 1, 0


# -- errors ------------------------------------------------------------------------------------------

class LaunchError(TokenFlowError):
    """A launcher setup this machine cannot run (a rank without a GPU); said by the first rank it hits."""

    def __init__(self, message: str, speak: bool):
        super().__init__(message)
        self.speak = speak


class LostRank(TokenFlowError):
    """A collective failed: another rank stopped, or none answered within the timeout."""

    exit_code = 1


class SetupFailed(TokenFlowError):
    """Some rank's setup failed; `line` is what this rank says (rank 0 says it for all; the others None)."""

    def __init__(self, line: str | None):
        super().__init__(line or "another rank's setup failed")
        self.line = line


class AllRanks(TokenFlowError):
    """An error every rank raises together after a collective decision: rank 0 says it."""


def timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        s = float(raw) if raw else DEFAULT_TIMEOUT_S
        if s <= 0:
            raise ValueError
    except ValueError:
        raise TokenFlowError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds") from None
    return datetime.timedelta(seconds=s)


# -- the ranks ---------------------------------------------------------------------------------------

class Ranks:
    """This process's place among the ranks torchrun started (rank 0 of 1 without torchrun), and the
    host-side messages between them (a gloo group: on the CPU the default one, beside NCCL on GPUs)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device: torch.device | None = None  # set by join()
        self.comm_device = None  # where the default group's tensors must be (set by join())
        self.joined = False
        self.agreed = False  # past the setup: every rank's inputs and settings were found good
        self.backend = None
        self._host = None  # gloo group of the host-side messages (None: the default group)
        self.group = None  # the work's device group (after the agreement: the timeout of TOKENFLOW_DIST_TIMEOUT)
        self._limit = None  # the timeout of the collectives now (the setup's, then the work's)

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"rank {self.rank}/{self.world}"

    # -- joining -----------------------------------------------------------------------------------------
    def join(self, device: str | None) -> "Ranks":
        """Join the process group: NCCL on GPU LOCAL_RANK when CUDA is used, gloo on the CPU. `device` is the
        config's (None or cuda: a GPU per rank; cpu: the CPU)."""
        if not self.distributed or self.joined:
            return self
        import torch
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and device != "cpu"
        if device not in (None, "cpu", "cuda"):
            raise TokenFlowError(f"device {device!r} would put every rank on one device; with several ranks use "
                                 f"cuda (each rank takes GPU LOCAL_RANK) or cpu", key="device")
        if device == "cuda" and not torch.cuda.is_available():
            raise TokenFlowError("device 'cuda' was asked for but no CUDA GPU is available; use cpu", key="device")
        setup = self._limit = max(timeout(), datetime.timedelta(seconds=SETUP_TIMEOUT_S))
        if use_cuda:
            n = torch.cuda.device_count()
            if self.local_rank >= n:
                raise LaunchError(f"{self.local_rank + 1} or more processes on this node, one GPU each, but it has "
                                  f"{n} GPU(s): start at most {n} per node (--nproc {n}, or torchrun "
                                  f"--nproc-per-node {n}), or use --device cpu", speak=self.local_rank == n)
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            self.backend = "nccl"
            dist.init_process_group("nccl", timeout=setup, device_id=self.device)
            self._host = dist.new_group(backend="gloo", timeout=setup)
            self.comm_device = self.device
        else:
            self.device = torch.device("cpu")
            self.backend = "gloo"
            dist.init_process_group("gloo", timeout=setup)
            self.comm_device = self.device
        self.joined = True
        return self

    def close(self) -> None:
        import torch.distributed as dist

        if self.joined and dist.is_initialized():
            dist.destroy_process_group()
        self.joined = False

    # -- host-side messages ----------------------------------------------------------------------------
    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # gloo and NCCL report a lost peer or a timeout as RuntimeError (DistError)
            first = " ".join(str(e).split())[:200]
            limit = (self._limit or timeout()).total_seconds()
            raise LostRank(f"lost contact with the other ranks during {what} ({first}): another rank stopped "
                           f"(its own message says why) or did not answer within {limit:g} s ({TIMEOUT_ENV}"
                           f"{'; the setup waits at least %d s' % SETUP_TIMEOUT_S if not self.agreed else ''}); "
                           f"finished inversion chunks and edit steps are kept in the latent store: run again to "
                           f"resume") from None

    def all_gather_object(self, obj, what: str = "an exchange") -> list:
        import torch.distributed as dist

        if not self.distributed:
            return [obj]
        out = [None] * self.world
        self._collective(what, dist.all_gather_object, out, obj, group=self._host)
        return out

    def broadcast(self, obj, what: str = "an exchange"):
        """Rank 0's `obj`, on every rank."""
        import torch.distributed as dist

        if not self.distributed:
            return obj
        box = [obj]
        self._collective(what, dist.broadcast_object_list, box, src=0, group=self._host)
        return box[0]

    def barrier(self, what: str) -> None:
        import torch.distributed as dist

        if self.distributed:
            self._collective(what, dist.barrier, group=self._host)

    def gather_rows(self, local: torch.Tensor, counts: list[int], what: str) -> torch.Tensor | None:
        """Every rank's `local` rows (host tensors, counts[r] rows on rank r), concatenated in rank order on
        rank 0 (None elsewhere)."""
        import torch
        import torch.distributed as dist

        if not self.distributed:
            return local
        m = max(counts)
        send = torch.cat([local, local.new_zeros(m - len(local), *local.shape[1:])]) if len(local) < m else local
        bufs = [torch.empty_like(send) for _ in range(self.world)] if self.leader else None
        self._collective(what, dist.gather, send.contiguous(), bufs, dst=0, group=self._host)
        return torch.cat([b[:c] for b, c in zip(bufs, counts)]) if self.leader else None

    # -- the setup agreement ---------------------------------------------------------------------------
    def agree(self, error: str | None = None) -> None:
        """Every rank calls this once its setup is done (`error`: what failed, from the error path): if any
        rank's setup failed, all stop together, rank 0 saying why (SetupFailed); nothing has been run yet."""
        if not self.distributed or self.agreed:
            return
        import torch.distributed as dist

        errors = self.all_gather_object(error, "the setup")
        self.agreed = True
        failed = {}
        for r, e in enumerate(errors):
            if e:
                failed.setdefault(e, []).append(r)
        if not failed:  # the work: groups whose collectives give up after TOKENFLOW_DIST_TIMEOUT
            self.group = self._collective("the setup", dist.new_group, backend=self.backend, timeout=timeout())
            self._host = self._collective("the setup", dist.new_group, backend="gloo", timeout=timeout())
            self._limit = timeout()
            return
        if not self.leader:
            raise SetupFailed(None)
        lines = [msg if len(rs) == self.world else f"rank {', '.join(map(str, rs))} of {self.world}: {msg}"
                 for msg, rs in failed.items()]
        raise SetupFailed("; ".join(lines))

    def say(self, message: str, error: BaseException | None = None) -> str | None:
        """The line this rank prints for an error (None: another rank says it)."""
        if not self.distributed:
            return message
        if isinstance(error, SetupFailed):
            return error.line
        if isinstance(error, LaunchError):
            return message if error.speak else None
        if isinstance(error, LostRank):
            return f"rank {self.rank}/{self.world}: {message}"
        if not self.joined:  # every rank has the same inputs and settings: rank 0 says it
            return message if self.leader else None
        if not self.agreed:
            try:
                self.agree(message)
            except SetupFailed as e:
                return e.line
            except LostRank:
                return f"rank {self.rank}/{self.world}: {message}"
        if isinstance(error, AllRanks):
            return message if self.leader else None
        return f"rank {self.rank}/{self.world}: {message}"

    def fail_all(self, message: str, key: str | None = None):
        raise AllRanks(message, key=key)

    # -- frames to rank 0's writer ---------------------------------------------------------------------
    def serve_frames(self, frames: torch.Tensor) -> None:
        """Ranks > 0: send this rank's decoded frames to rank 0 each time its writer asks, until it is done."""
        import torch
        import torch.distributed as dist

        cmd = torch.zeros(1, dtype=torch.int64)
        while True:
            self._collective("the writing of the video", dist.recv, cmd, src=0, group=self._host)
            if int(cmd) == _DONE:
                return
            for a in range(0, len(frames), FRAMES_PER_MESSAGE):
                self._collective("the writing of the video", dist.send, frames[a:a + FRAMES_PER_MESSAGE].contiguous(),
                                 dst=0, group=self._host)

    def finish(self) -> None:
        """Rank 0, when the outputs are written: the other ranks stop serving frames."""
        import torch
        import torch.distributed as dist

        if self.distributed and self.leader:
            for r in range(1, self.world):
                self._collective("the end of the run", dist.send, torch.full((1,), _DONE, dtype=torch.int64),
                                 dst=r, group=self._host)


_CURRENT: Ranks | None = None


def current() -> Ranks:
    """This process's ranks (from torchrun's environment until `join`)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = Ranks.from_env()
    return _CURRENT


def join(device: str | None) -> Ranks:
    return current().join(device)


class RankFrames:
    """On rank 0: every rank's edited frames in order, for the writer, as an iterable of uint8 batches
    [n, 3, H, W] that can be iterated more than once (the video, then the side-by-side, then the PNGs): its own
    frames, then each other rank's, received a few at a time as they are consumed, so rank 0 never holds
    the other ranks' frames all at once."""

    def __init__(self, own: torch.Tensor, counts: list[int], ranks: Ranks):
        self.own, self.counts, self.ranks = own, counts, ranks

    def __len__(self) -> int:
        return sum(self.counts)

    def __iter__(self):
        import torch
        import torch.distributed as dist

        yield from self.own.split(FRAMES_PER_MESSAGE)
        shape = self.own.shape[1:]
        for r in range(1, self.ranks.world):
            self.ranks._collective("the writing of the video", dist.send, torch.full((1,), _SEND, dtype=torch.int64),
                                   dst=r, group=self.ranks._host)
            for a in range(0, self.counts[r], FRAMES_PER_MESSAGE):
                batch = torch.empty(min(FRAMES_PER_MESSAGE, self.counts[r] - a), *shape, dtype=self.own.dtype)
                self.ranks._collective("the writing of the video", dist.recv, batch, src=r, group=self.ranks._host)
                yield batch

    def tensor(self) -> torch.Tensor:
        """All frames in one tensor (the metrics and the report need them at once)."""
        import torch

        return torch.cat(list(self))


def in_memory(frames) -> torch.Tensor:
    """`frames` as one tensor (RankFrames are received from the other ranks)."""
    return frames.tensor() if isinstance(frames, RankFrames) else frames


# -- starting the ranks ------------------------------------------------------------------------------

def check_nproc(nproc: int, device: str | None) -> None:
    """`--nproc N` on this machine: one GPU per process when CUDA is used."""
    import torch

    if nproc < 1:
        raise TokenFlowError(f"--nproc {nproc} must be at least 1")
    if device != "cpu" and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if nproc > n:
            raise TokenFlowError(f"--nproc {nproc} starts {nproc} processes, one GPU each, but this machine has {n} "
                                 f"GPU(s); use --nproc {n} or fewer (or --device cpu)")


def without_nproc(argv: list[str]) -> list[str]:
    """The workers' arguments: the same, less --nproc."""
    rest, skip = [], False
    for a in argv:
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        rest.append(a)
    return rest


def launch(nproc: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` as `nproc` ranks on this node with torch.distributed.run (torchrun's
    launcher); its exit code: 0, the largest a failing rank returned (2: a problem the user can fix), or 130
    when interrupted."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The ranks say what went wrong; the launcher's own report would repeat it with a traceback.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", module, *argv])
    try:
        run(args)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        if any(c in (-2, 130) for c in codes):
            return 130
        for f in sorted(e.failures.values(), key=lambda f: f.local_rank):
            # A rank killed by a signal said nothing (torchrun stops the others, with SIGTERM, before they notice).
            if f.exitcode < 0 and f.signal_name() != "SIGTERM":
                print(f"tokenflow-edit: error: rank {f.local_rank}/{nproc} was killed by {f.signal_name()} (out of host "
                      f"memory, or killed from outside); the other ranks were stopped. Finished inversion chunks and "
                      f"edit steps are kept in the latent store: run again to resume", file=sys.stderr, flush=True)
        return max([c for c in codes if c > 0] or [1])  # 2 when a rank found a problem the user can fix
    except KeyboardInterrupt:
        return 130
    return 0

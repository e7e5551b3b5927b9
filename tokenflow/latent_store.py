"""On-disk store of inverted latents (CPU tensors, safetensors), keyed by what determines them.

Layout of one entry, `<root>/<key>/`:
  meta.json                     what the key was made of, and the frame chunking used
  x0.safetensors                the VAE latents of the frames, [N, 4, h, w]
  frames_<a>_<b>.safetensors    latents of frames [a, b) at every kept timestep ("t<t>": [b-a, 4, h, w])
  complete                      written last: the list of chunks of the finished inversion
  edit_<key>.safetensors        an edit of these latents: its latents after its last finished step (EditCheckpoint)
Locks live in `<root>/.locks/` (tokenflow/store_locks.py).

Every file carries a checksum and is written under a temporary name and renamed (tokenflow/store_io.py),
so an interrupted run leaves only whole files: a second run skips the chunks already there (resume) or
the whole inversion (reuse). Every file is checked before its values are used (a chunk once per process,
all of them before an edit starts): one that is missing, truncated, unreadable or fails its checksum is
reported in one warning line, removed and recomputed (a chunk is inverted again, x0 encoded again, a
checkpoint restarts its edit, meta.json is rebuilt). Two processes on one entry invert each chunk once
between them (a lock per chunk). Where the disk refuses a write (full, read-only), the store says so once
and keeps what it computes in memory, so the run still finishes, without caching.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from tokenflow.cache_admin import evict_to, format_size, parse_size
from tokenflow.store_io import (MISSING, Damaged, Unchecked, identity, load_json, open_tensors,
                                remove_stale_temporaries, save_json, save_tensors)
from tokenflow.store_locks import Lock, entry_lock_path, file_lock_path

log = logging.getLogger("tokenflow")

FORMAT = 2  # meta.json "format": 2 = every file checksummed (entries without checksums are recomputed)
CHUNK_NAME = re.compile(r"frames_\d{6}_\d{6}\.safetensors")
MAX_SIZE_ENV = "TOKENFLOW_CACHE_MAX_SIZE"


def default_root() -> Path:
    return Path(os.environ.get("TOKENFLOW_CACHE", Path.home() / ".cache" / "tokenflow")) / "latents"


def frames_digest(frames: torch.Tensor) -> str:
    """Content hash of uint8 frames [N, 3, H, W] (the processed frames the inversion sees)."""
    h = hashlib.sha256(str(tuple(frames.shape)).encode())
    for f in frames:
        h.update(f.contiguous().numpy().tobytes())
    return h.hexdigest()


def key_hash(fields: dict) -> str:
    """A short stable name for what a stored result depends on."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_tensors(Path(path), tensors, metadata)


class _InMemory:
    """A file the disk refused, kept in this process instead (read like a safetensors handle). Contiguous
    copies, as a file gives them back: the UNet's rounding depends on the memory layout (the VAE returns
    channels-last latents), and the edit must not depend on whether the store could write."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def keys(self) -> list[str]:
        return list(self.tensors)


class LatentStore:
    """One entry of the store: open it (creating or healing its meta.json), then read and write its files.

    max_size: cap of the whole store in bytes or as text ("20G"); None: $TOKENFLOW_CACHE_MAX_SIZE, else no
    cap. Over the cap, least recently used entries not in use by any process are evicted after each write.
    """

    def __init__(self, root: Path | str | None, key_fields: dict, chunk_frames: int,
                 max_size: int | str | None = None):
        self.key_fields = key_fields
        self.key = key_hash(key_fields)
        self.root = Path(root or default_root())
        self.path = self.root / self.key
        cap = max_size if max_size is not None else os.environ.get(MAX_SIZE_ENV) or None
        self.max_size = parse_size(cap, MAX_SIZE_ENV if max_size is None else "cache_max_size")
        self.chunk_frames = chunk_frames
        self.writable = True  # False after the disk refused a write: the rest stays in memory
        self._mem: dict[str, _InMemory] = {}
        self._open: dict[str, object] = {}
        self._bad: set[Path] = set()  # damaged files that could not be removed
        self._held: dict[str, Lock] = {}
        self._n: int | None = None
        self._cap_warned = False
        # In use while this object lives: eviction and `cache rm` skip the entry.
        use = Lock(entry_lock_path(self.root, self.key), shared=True)
        use.acquire()
        weakref.finalize(self, use.release)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._cannot_write(self.path, e)
        self._load_meta(chunk_frames)
        try:
            os.utime(self.path / "meta.json")  # last use: `cache ls` and least-recently-used eviction
        except OSError:
            pass

    # -- files ---------------------------------------------------------------------------------------
    @contextmanager
    def _locked(self, name: str):
        """Hold the write lock of file `name` (re-entrant within this store)."""
        if name in self._held:
            yield
            return
        lock = Lock(file_lock_path(self.root, self.key, name))
        lock.acquire()
        self._held[name] = lock
        try:
            yield
        finally:
            del self._held[name]
            lock.release()

    def _cannot_write(self, path: Path, e: OSError) -> None:
        if self.writable:
            self.writable = False
            log.warning("latent store: cannot write %s (%s); continuing without caching: free some space or "
                        "make it writable, or move the store with --cache-dir DIR or TOKENFLOW_CACHE",
                        path, e.strerror or e)

    def _save(self, name: str, write) -> bool:
        """Write file `name` with write(path) under its lock; False when the disk refuses (said once)."""
        if not self.writable:
            return False
        p = self.path / name
        try:
            with self._locked(name):
                remove_stale_temporaries(p)
                write(p)
        except OSError as e:
            self._cannot_write(p, e)
            return False
        self._bad.discard(p)
        self._open.pop(name, None)
        return True

    def _unlink(self, name: str) -> None:
        try:
            (self.path / name).unlink(missing_ok=True)
        except OSError:
            pass

    def _discard(self, p: Path, err: Damaged, then: str) -> None:
        """Say in one line what is wrong with `p` and what happens next; remove that version of it."""
        with self._locked(p.name):
            if err.identity is not None and identity(p) != err.identity:
                done = "another process has replaced it meanwhile"
            else:
                try:
                    p.unlink(missing_ok=True)
                    done = "removed it"
                except OSError as e:
                    self._bad.add(p)
                    done = f"cannot remove it ({e.strerror}), so it is not used"
        self._open.pop(p.name, None)
        log.warning("latent store: %s %s; %s, %s", p, err, done, then)

    def _file(self, name: str, then: str, *, expected: bool = False):
        """A verified handle on file `name` (or its in-memory copy), None when missing or damaged (damage
        and, when `expected`, absence are reported, with `then`: what happens next)."""
        if name in self._mem:
            return self._mem[name]
        if name in self._open:
            return self._open[name]
        p = self.path / name
        if p in self._bad:
            return None
        try:
            h = open_tensors(p)
        except MISSING:
            if expected:
                log.warning("latent store: %s is missing; %s", p, then)
            return None
        except Damaged as e:
            self._discard(p, e, then)
            return None
        except OSError as e:
            self._discard(p, Damaged(f"cannot be read ({e.strerror})", identity(p)), then)
            return None
        self._open[name] = h
        return h

    def _load_meta(self, chunk_frames: int) -> None:
        p = self.path / "meta.json"
        with self._locked(p.name):
            try:
                meta = load_json(p)
                if meta.get("key") != json.loads(json.dumps(self.key_fields)) or meta.get("format") != FORMAT \
                        or not isinstance(meta.get("chunk_frames"), int) or meta["chunk_frames"] < 1:
                    raise Damaged("does not describe this entry")
                self.chunk_frames = meta["chunk_frames"]  # resume with the chunking the entry was started with
                return
            except MISSING:
                if any(not f.name.startswith(".") for f in self.path.glob("*")):
                    log.warning("latent store: %s is missing; rebuilt it (the other files are checked on their "
                                "own)", p)
            except Unchecked:
                log.warning("latent store: %s was written by an older tokenflow, without checksums; its files "
                            "are removed and computed again", self.path)
                for f in self.path.glob("*"):
                    if f.is_file() and not f.name.startswith("."):
                        self._unlink(f.name)
            except (Damaged, OSError) as e:
                what = e if isinstance(e, Damaged) else f"cannot be read ({e.strerror})"
                log.warning("latent store: %s %s; rebuilt it (the other files are checked on their own)", p, what)
            self._unlink("complete")  # its chunk list may follow another chunking: checked again
            self.chunk_frames = chunk_frames
            self._save(p.name, lambda q: save_json(q, {"format": FORMAT, "key": self.key_fields,
                                                        "chunk_frames": chunk_frames}))

    def _enforce_cap(self) -> None:
        if self.max_size is None:
            return
        total = evict_to(self.root, self.max_size, keep=self.key)
        if total > self.max_size and not self._cap_warned:
            self._cap_warned = True
            log.warning("latent store: %s holds %s, over its cap of %s; the rest is in use, so nothing more "
                        "can be evicted now", self.root, format_size(total), format_size(self.max_size))

    # -- the inversion -------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """The inversion is finished and every one of its chunks is whole (all verified now, so that damage
        is found and healed before an edit reads them)."""
        p = self.path / "complete"
        try:
            names = load_json(p)["chunks"]
            if not isinstance(names, list) or not all(isinstance(n, str) and CHUNK_NAME.fullmatch(n) for n in names):
                raise Damaged("does not list chunk files")
        except MISSING:
            return False
        except (Damaged, OSError, KeyError) as e:
            what = e if isinstance(e, Damaged) else Damaged(f"cannot be read ({e})", identity(p))
            self._discard(p, what, "the inversion's chunks are checked again")
            return False
        ok = [self._file(n, "it will be inverted again", expected=True) is not None for n in names]
        if not all(ok):
            self._unlink("complete")
        return all(ok)

    def mark_complete(self) -> None:
        names = ([self.chunk_path(a, b).name for a, b in self.chunks(self._n)] if self._n is not None
                 else sorted(p.name for p in self.path.glob("frames_*.safetensors")))
        if not self.writable or any(n in self._mem for n in names):
            return  # not all on disk: a later run finishes the inversion
        for p in self.path.glob("frames_*.safetensors"):
            if p.name not in names:  # a chunk of another chunking (meta.json was rebuilt)
                self._unlink(p.name)
        self._save("complete", lambda p: save_json(p, {"chunks": names}))

    def chunks(self, n_frames: int) -> list[tuple[int, int]]:
        self._n = n_frames
        c = self.chunk_frames
        return [(a, min(a + c, n_frames)) for a in range(0, n_frames, c)]

    def chunk_path(self, a: int, b: int) -> Path:
        return self.path / f"frames_{a:06d}_{b:06d}.safetensors"

    def has_chunk(self, a: int, b: int) -> bool:
        """Chunk [a, b) is there and whole (a damaged one is reported and removed)."""
        return self._file(self.chunk_path(a, b).name, "it will be inverted again") is not None

    def claim(self, chunks: list[tuple[int, int]]):
        """Yield each of `chunks` still missing, holding its lock while the caller inverts and saves it.
        Chunks another process is inverting are left to the end and waited for (then usually found done),
        so two processes on one video share the work and invert each chunk once."""
        pending, blocking = list(chunks), False
        while pending:
            busy = []
            for a, b in pending:
                name = self.chunk_path(a, b).name
                lock = Lock(file_lock_path(self.root, self.key, name))
                if not lock.acquire(blocking):
                    busy.append((a, b))
                    continue
                self._held[name] = lock
                try:
                    if not self.has_chunk(a, b):
                        yield a, b
                finally:
                    del self._held[name]
                    lock.release()
            if busy:
                log.info("latent store: waiting for %d chunk(s) another process is inverting (%s)", len(busy),
                         self.path)
            pending, blocking = busy, True

    def save_chunk(self, a: int, b: int, latents: dict[int, torch.Tensor]) -> None:
        name = self.chunk_path(a, b).name
        tensors = {f"t{t}": x for t, x in latents.items()}
        if self._save(name, lambda p: save_tensors(p, tensors)):
            self._enforce_cap()
        else:
            self._mem[name] = _InMemory(tensors)

    def save_x0(self, x0: torch.Tensor) -> None:
        if self._save("x0.safetensors", lambda p: save_tensors(p, {"x0": x0})):
            self._enforce_cap()
        else:
            self._mem["x0.safetensors"] = _InMemory({"x0": x0})

    def load_x0(self) -> torch.Tensor | None:
        # Written before any chunk: missing beside chunks, it was lost, which is worth saying.
        lost = any(self.path.glob("frames_*.safetensors"))
        h = self._file("x0.safetensors", "the frames will be encoded again", expected=lost)
        return None if h is None else h.get_tensor("x0")

    def latents_at(self, t: int, n_frames: int, frames: range | None = None) -> torch.Tensor:
        """Kept latents at timestep t of all frames, [N, 4, h, w], or of `frames` only, read from the chunks
        that hold them (one rank's share of a distributed edit)."""
        lo, hi = (0, n_frames) if frames is None else (frames.start, frames.stop)
        parts = []
        for a, b in self.chunks(n_frames):
            if b <= lo or a >= hi:
                continue
            h = self._file(self.chunk_path(a, b).name, "run again to invert it again")
            if h is None:
                from tokenflow.errors import TokenFlowError
                raise TokenFlowError(f"the latent store lost frames [{a}, {b}) of {self.path} during the run; "
                                     f"run again to invert them again")
            x = h.get_tensor(f"t{t}")
            parts.append(x if lo <= a and b <= hi else x[max(lo - a, 0):min(hi, b) - a])
        return torch.cat(parts)


class EditCheckpoint:
    """The edited latents of one edit after its last finished denoising step, next to the inversion it
    edits (keyed by the settings that determine the result), rewritten atomically after every step: an
    interrupted edit resumes at the next step, and a finished one is decoded again without re-editing.
    A damaged checkpoint is reported, removed, and the edit restarts from its first step."""

    def __init__(self, store: LatentStore, key_fields: dict):
        self.store = store
        self.key_fields = key_fields
        self.path = store.path / f"edit_{key_hash(key_fields)}.safetensors"
        self._ignored = False  # discard() could not remove it (read-only store): never read it
        self._saved = False

    def _read(self) -> tuple[int, torch.Tensor] | None:
        if self._ignored or self.path in self.store._bad:
            return None
        try:
            with open_tensors(self.path, recheck=True) as f:
                return int(f.get_tensor("step")), f.get_tensor("x")
        except MISSING:
            return None
        except Damaged as e:
            self.store._discard(self.path, e, "the edit restarts from its first step")
        except (OSError, KeyError, RuntimeError, ValueError) as e:  # whole, but not a checkpoint
            self.store._discard(self.path, Damaged(f"is not a checkpoint ({e})", identity(self.path)),
                                "the edit restarts from its first step")
        return None

    def step(self) -> int | None:
        """Index of the last finished step, or None."""
        done = self._read()
        return None if done is None else done[0]

    def load(self) -> tuple[int, torch.Tensor] | None:
        """(index of the last finished step, latents after it), or None."""
        return self._read()

    def save(self, step: int, x: torch.Tensor) -> None:
        meta = {"tokenflow.edit": json.dumps(self.key_fields, sort_keys=True, default=str)}
        if self.store._save(self.path.name, lambda p: save_tensors(p, {"x": x, "step": torch.tensor(step)}, meta)):
            if not self._saved:  # its first version adds to the store's size; later ones replace it
                self._saved = True
                self.store._enforce_cap()

    def discard(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            self._ignored = True

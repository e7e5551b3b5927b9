"""On-disk store of inverted latents (CPU tensors, safetensors), keyed by what determines them.

Layout of one entry, `<root>/<key>/`:
  meta.json                     what the key was made of, and the frame chunking used
  x0.safetensors                the VAE latents of the frames, [N, 4, h, w]
  frames_<a>_<b>.safetensors    latents of frames [a, b) at every kept timestep ("t<t>": [b-a, 4, h, w])
  complete                      written last
  edit_<key>.safetensors        an edit of these latents: its latents after its last finished step (EditCheckpoint)
Every file is written under a temporary name and renamed, so an interrupted run leaves only whole
files: a second run skips the chunks already there (resume) or the whole inversion (reuse).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


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


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LatentStore:
    def __init__(self, root: Path | str | None, key_fields: dict, chunk_frames: int):
        self.key_fields = key_fields
        self.key = key_hash(key_fields)
        self.path = Path(root or default_root()) / self.key
        self.path.mkdir(parents=True, exist_ok=True)
        meta_path = self.path / "meta.json"
        if meta_path.exists():  # resume with the chunking the entry was started with
            self.chunk_frames = json.loads(meta_path.read_text())["chunk_frames"]
        else:
            self.chunk_frames = chunk_frames
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key_fields, "chunk_frames": chunk_frames}, indent=1))
            os.replace(tmp, meta_path)
        self._open: dict[Path, object] = {}

    @property
    def complete(self) -> bool:
        return (self.path / "complete").exists()

    def mark_complete(self) -> None:
        (self.path / "complete").write_text("")

    def chunks(self, n_frames: int) -> list[tuple[int, int]]:
        c = self.chunk_frames
        return [(a, min(a + c, n_frames)) for a in range(0, n_frames, c)]

    def chunk_path(self, a: int, b: int) -> Path:
        return self.path / f"frames_{a:06d}_{b:06d}.safetensors"

    def has_chunk(self, a: int, b: int) -> bool:
        return self.chunk_path(a, b).exists()

    def save_chunk(self, a: int, b: int, latents: dict[int, torch.Tensor]) -> None:
        _atomic_save({f"t{t}": x for t, x in latents.items()}, self.chunk_path(a, b))

    def save_x0(self, x0: torch.Tensor) -> None:
        _atomic_save({"x0": x0}, self.path / "x0.safetensors")

    def load_x0(self) -> torch.Tensor | None:
        p = self.path / "x0.safetensors"
        if not p.exists():
            return None
        with safe_open(str(p), framework="pt") as f:
            return f.get_tensor("x0")

    def _handle(self, p: Path):
        if p not in self._open:
            self._open[p] = safe_open(str(p), framework="pt")
        return self._open[p]

    def latents_at(self, t: int, n_frames: int) -> torch.Tensor:
        """Kept latents of all frames at timestep t: [N, 4, h, w] (read lazily, one tensor per chunk)."""
        parts = [self._handle(self.chunk_path(a, b)).get_tensor(f"t{t}") for a, b in self.chunks(n_frames)]
        return torch.cat(parts)

    def timesteps(self, n_frames: int) -> list[int]:
        a, b = self.chunks(n_frames)[0]
        return sorted(int(k[1:]) for k in self._handle(self.chunk_path(a, b)).keys())


class EditCheckpoint:
    """The edited latents of one edit after its last finished denoising step, next to the inversion it
    edits (keyed by the settings that determine the result), rewritten atomically after every step: an
    interrupted edit resumes at the next step, and a finished one is decoded again without re-editing."""

    def __init__(self, store: LatentStore, key_fields: dict):
        self.path = store.path / f"edit_{key_hash(key_fields)}.safetensors"

    def step(self) -> int | None:
        """Index of the last finished step, or None (reads only that)."""
        if not self.path.exists():
            return None
        with safe_open(str(self.path), framework="pt") as f:
            return int(f.get_tensor("step"))

    def load(self) -> tuple[int, torch.Tensor] | None:
        """(index of the last finished step, latents after it), or None."""
        if not self.path.exists():
            return None
        with safe_open(str(self.path), framework="pt") as f:
            return int(f.get_tensor("step")), f.get_tensor("x")

    def save(self, step: int, x: torch.Tensor) -> None:
        _atomic_save({"x": x, "step": torch.tensor(step)}, self.path)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)

"""The latent store's files: each carries a content checksum recorded when it is written and checked
before any of its values is used, and each is written whole or not at all.

Tensor files are safetensors whose header metadata holds `tokenflow.xxh3_128`: an xxh3-128 of the other
metadata and of every tensor's name, dtype, shape and bytes (so a damaged header that still parses, say a
dtype changed, fails it as well as a flipped data byte). JSON files hold the same checksum of their
payload under the key `xxh3_128`. A file whose checksum was verified, or that this process wrote, is
remembered by its identity (device, inode, size, mtime) and not hashed again in this process.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

CHECKSUM = "tokenflow.xxh3_128"  # safetensors metadata key
JSON_CHECKSUM = "xxh3_128"
MISSING = (FileNotFoundError, NotADirectoryError)  # no such file (or its folder is not one)


class Damaged(Exception):
    """A store file that is truncated, unreadable or fails its checksum; str() says what, as a predicate
    ("fails its checksum"). `identity` is the file's (device, inode) when it could be read, so that only
    that version of the file is discarded (another process may have replaced it meanwhile)."""

    def __init__(self, what: str, identity: tuple | None = None):
        super().__init__(what)
        self.identity = identity


class Unchecked(Damaged):
    """A file without a checksum: written by a tokenflow older than the checks."""


_verified: dict[str, tuple] = {}  # absolute path -> identity of the version verified (or written) here


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _remember(path: Path, st: os.stat_result) -> None:
    _verified[os.path.abspath(path)] = _identity(st)


def _known(path: Path, st: os.stat_result) -> bool:
    return _verified.get(os.path.abspath(path)) == _identity(st)


def _digest(metadata: dict[str, str], names, get) -> str:
    h = xxhash.xxh3_128(json.dumps(sorted(metadata.items())).encode())
    for name in sorted(names):
        t = get(name).contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` under a hidden temporary name in the same folder, then rename it: readers
    see the old file or the new one, never part of one. A failure (a full disk, a read-only folder) leaves
    no temporary file behind and raises the OSError. Records the written version as verified."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            _fsync(f)  # a full disk often reports itself only here (delayed allocation)
            st = os.fstat(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _remember(path, st)


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporary files a killed writer of `path` left behind. Call only while holding `path`'s write
    lock: every writer of `path` holds it while its temporary file exists."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a checksummed safetensors file atomically (OSError when the disk refuses)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(metadata or {})
    meta[CHECKSUM] = _digest(meta, tensors, tensors.__getitem__)
    atomic_write(path, safetensors_bytes(tensors, metadata=meta))


def open_tensors(path: Path, *, recheck: bool = False):
    """A safetensors handle on `path` (get_tensor, keys, metadata) once its checksum is verified; a file
    already verified in this process (same identity) is not hashed again unless `recheck`.
    MISSING when it is missing; Damaged when it is truncated, unreadable or fails its checksum."""
    st = os.stat(path)
    ident = _identity(st)[:2]
    try:
        f = safe_open(str(path), framework="pt")
        if not recheck and _known(path, st) and _known(path, os.stat(path)):
            return f
        meta = dict(f.metadata() or {})
        want = meta.pop(CHECKSUM, None)
        if want is None:
            raise Unchecked("has no checksum (written by an older tokenflow)", ident)
        got = _digest(meta, f.keys(), f.get_tensor)
    except (Damaged, *MISSING):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the parser says about bad bytes, the file is unusable
        raise Damaged(f"is truncated or unreadable ({_first_line(e)})", ident) from None
    if got != want:
        raise Damaged("fails its checksum (its bytes changed after it was written)", ident)
    _remember(path, st)
    return f


def save_json(path: Path, payload: dict) -> None:
    text = json.dumps(payload, sort_keys=True)
    body = {**payload, JSON_CHECKSUM: xxhash.xxh3_128(text.encode()).hexdigest()}
    atomic_write(path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())


def load_json(path: Path) -> dict:
    """The payload of a checksummed JSON file. MISSING when missing; Unchecked when it is valid
    JSON without a checksum; Damaged otherwise when it is not the file that was written."""
    data = path.read_bytes()
    ident = _identity(os.stat(path))[:2]
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise Damaged(f"is truncated or not valid JSON ({_first_line(e)})", ident) from None
    if not isinstance(body, dict):
        raise Damaged("is not a JSON object", ident)
    want = body.pop(JSON_CHECKSUM, None)
    if want is None:
        raise Unchecked("has no checksum (written by an older tokenflow)", ident)
    if xxhash.xxh3_128(json.dumps(body, sort_keys=True).encode()).hexdigest() != want:
        raise Damaged("fails its checksum (its content changed after it was written)", ident)
    return body


def identity(path: Path) -> tuple | None:
    """(device, inode) of `path`, None when missing."""
    try:
        return _identity(os.stat(path))[:2]
    except MISSING:
        return None


def _first_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__

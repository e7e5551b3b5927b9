"""The latent store never serves damaged data and heals itself.

Fault injection over every kind of file the store writes (inverted chunks, x0, meta.json, the `complete`
marker, edit checkpoints): each damaged copy of one undamaged run's cache is edited again with the CLI;
the run must exit 0, say what was wrong in one warning line, leave a whole store and give exactly the
undamaged run's frames. Also: two processes on one cache, a full disk, an unwritable cache, locks of
killed processes, the size cap, and the `tokenflow-edit cache` commands.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from procs import wait_for

from tokenflow import cache_admin, cli
from tokenflow.store_io import Damaged, load_json, open_tensors, save_json, save_tensors
from tokenflow.store_locks import Lock, entry_lock_path, file_lock_path
from tokenflow.video import read_frames

SCRIPT = Path(sys.executable).with_name("tokenflow-edit")
# 10 frames in chunks of 4, 4, 2; kept timesteps 751 (read first), 501 and 1 (read at the last step).
TINY = ["--model", "tiny-random", "--batch-size", "4", "--n-inversion-steps", "4", "--n-timesteps", "2",
        "--width", "64", "--height", "64", "--frames", "10", "--chunk-frames", "4"]
EDIT = ["sample", "--prompt", "a red car", *TINY]
CHUNK = "frames_000004_000008.safetensors"


def subprocess_cli(*args, cache: Path, cwd: Path, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(cache))
    return subprocess.run([str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One undamaged run (a real process): its cache and its frames."""
    if not SCRIPT.exists():
        pytest.skip("console script not installed (pip install -e .)")
    d = tmp_path_factory.mktemp("pristine")
    r = subprocess_cli(*EDIT, "-o", d / "edit.mp4", "--png", "-q", cache=d / "cache", cwd=d)
    assert r.returncode == 0, r.stderr
    (entry,) = [p for p in (d / "cache" / "latents").iterdir() if not p.name.startswith(".")]
    return d / "cache", entry.name, read_frames(d / "edit_frames")


@pytest.fixture
def run(tmp_path, capsys, monkeypatch):
    """The CLI in this process (no interpreter start-up per run): (exit code, stderr, stdout)."""
    def go(*args, cache: Path):
        monkeypatch.setenv("TOKENFLOW_CACHE", str(cache))
        try:
            rc = cli.main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
        out = capsys.readouterr()
        return rc, out.err, out.out
    return go


def copy_cache(pristine, tmp_path) -> tuple[Path, Path]:
    cache, key, _ = pristine
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "cache", tmp_path / "cache" / "latents" / key


def warnings(stderr: str) -> list[str]:
    return re.findall(r"latent store: [^\n\r]*", stderr)


# -- damage ------------------------------------------------------------------------------------------

def _layout(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return 8 + n, json.loads(data[8:8 + n])


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _replace(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    path.write_bytes(data.replace(old, new, 1))


def flip_data(p: Path):  # a byte in the middle of the tensor data (or of the JSON text)
    if p.suffix == ".safetensors":
        start, _ = _layout(p)
        _flip(p, start + (p.stat().st_size - start) // 2)
    else:
        _flip(p, p.stat().st_size // 2)


def flip_last_read(p: Path):  # inside the latents read only at the last editing step (t = 1)
    start, header = _layout(p)
    _flip(p, start + header["t1"]["data_offsets"][0] + 5)


def truncate(p: Path):
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def empty(p: Path):
    p.write_bytes(b"")


def delete(p: Path):
    p.unlink()


def header_dtype(p: Path):  # still parses, same size: the data would be read as int32
    _replace(p, b'"F32"', b'"I32"')


def header_flip(p: Path):
    start, _ = _layout(p)
    _flip(p, start // 2)


def checksum_flip(p: Path):  # the recorded checksum itself
    data = p.read_bytes()
    i = data.index(b'"tokenflow.xxh3_128":"') + len(b'"tokenflow.xxh3_128":"')
    _replace(p, data[i:i + 4], bytes([data[i] ^ 1]) + data[i + 1:i + 4])


def prompt_changed(p: Path):  # the checkpoint's metadata (same length)
    _replace(p, b"a red car", b"a red cat")


def chunk_size_changed(p: Path):  # valid JSON, another chunking
    _replace(p, b'"chunk_frames": 4', b'"chunk_frames": 5')


def garbage(p: Path):
    p.write_bytes(b"\x00\xff not json at all")


def legacy_meta(p: Path):  # as written before the checks: no checksum (and so no checksums anywhere)
    body = json.loads(p.read_text())
    p.write_text(json.dumps({"key": body["key"], "chunk_frames": body["chunk_frames"]}))


CASES = [  # (file, damage, warnings expected): a file that is simply absent where it may be is no damage
    *[("x0.safetensors", d, 1) for d in (flip_data, truncate, empty, delete, header_dtype, header_flip, checksum_flip)],
    *[(CHUNK, d, 1) for d in (flip_data, flip_last_read, truncate, empty, delete, header_dtype, header_flip,
                              checksum_flip)],
    ("frames_000008_000010.safetensors", flip_last_read, 1),
    *[("meta.json", d, 1) for d in (flip_data, truncate, empty, delete, chunk_size_changed, garbage, legacy_meta)],
    *[("complete", d, 1) for d in (flip_data, truncate, empty, garbage)],
    ("complete", delete, 0),
    *[("edit", d, 1) for d in (flip_data, truncate, empty, header_dtype, header_flip, checksum_flip, prompt_changed)],
    ("edit", delete, 0),
]


@pytest.mark.parametrize("name, damage, n_warnings", CASES,
                         ids=[f"{n.split('.')[0]}-{d.__name__}" for n, d, _ in CASES])
def test_damage_is_reported_once_and_healed(pristine, tmp_path, run, name, damage, n_warnings):
    cache, entry = copy_cache(pristine, tmp_path)
    target = next(entry.glob("edit_*")) if name == "edit" else entry / name
    damage(target)
    # The inversion's files are read by an edit made again (--no-resume); a checkpoint by a resumed edit.
    rc, err, out = run(*EDIT, "-o", tmp_path / "edit.mp4", "--png", *([] if name == "edit" else ["--no-resume"]),
                       cache=cache)
    assert rc == 0, err
    assert "Traceback" not in err
    said = warnings(err)
    assert len(said) == n_warnings, said
    if n_warnings:
        assert target.name in said[0] or str(entry) in said[0], said  # names the file (or the whole entry)
    assert torch.equal(read_frames(tmp_path / "edit_frames"), pristine[2])
    problems, leftovers, _ = cache_admin.check_entry(cache_admin.entries(entry.parent)[0])
    assert problems == [] and leftovers == []
    assert (entry / "complete").exists() and target.exists()  # healed: everything is there again


def test_damage_in_a_real_process_prints_no_traceback(pristine, tmp_path):
    cache, entry = copy_cache(pristine, tmp_path)
    header_dtype(entry / CHUNK)
    r = subprocess_cli(*EDIT, "-o", tmp_path / "edit.mp4", "--png", "--no-resume", cache=cache, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    said = warnings(r.stderr)
    assert len(said) == 1 and CHUNK in said[0] and "checksum" in said[0], said
    assert torch.equal(read_frames(tmp_path / "edit_frames"), pristine[2])


def test_file_checksums_catch_every_damage(tmp_path):
    p = tmp_path / "f.safetensors"
    x = torch.randn(3, 4, 5, 7)
    for damage in (flip_data, truncate, empty, header_dtype, header_flip, checksum_flip):
        save_tensors(p, {"t1": x, "step": torch.tensor(7)}, {"note": "kept"})
        with open_tensors(p) as f:
            assert torch.equal(f.get_tensor("t1"), x) and int(f.get_tensor("step")) == 7
        damage(p)
        with pytest.raises(Damaged):
            open_tensors(p)
    j = tmp_path / "m.json"
    for damage in (flip_data, truncate, empty, chunk_size_changed, garbage):
        save_json(j, {"chunk_frames": 4, "key": {"a": [1, 2]}})
        assert load_json(j) == {"chunk_frames": 4, "key": {"a": [1, 2]}}
        damage(j)
        with pytest.raises(Damaged):
            load_json(j)


# -- concurrency -------------------------------------------------------------------------------------

def test_two_processes_invert_each_chunk_once(pristine, tmp_path):
    """The test holds chunk [0, 4) locked, so that both processes are surely running at once: they share the
    other chunks, then both wait for that one; released, it is inverted by one of them only."""
    _, key, _ = pristine
    cache = tmp_path / "cache"
    held = Lock(file_lock_path(cache / "latents", key, "frames_000000_000004.safetensors"))
    assert held.acquire(blocking=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(cache))
    procs, logs = [], []
    try:
        for i in range(2):
            logs.append(tmp_path / f"err{i}.txt")
            with open(logs[-1], "w") as err:  # a file, not a pipe: a full pipe would block the run
                procs.append(subprocess.Popen([str(SCRIPT), "invert", "sample", *TINY, "-v"], cwd=tmp_path, env=env,
                                              stdout=subprocess.DEVNULL, stderr=err))
        for p, log in zip(procs, logs):
            wait_for(p, lambda: "waiting for" in log.read_text(errors="replace"), log)
        held.release()
        for p in procs:
            p.wait()
    finally:
        held.release()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], text
    assert all("Traceback" not in t for t in text)
    inverted = Counter(re.findall(r"inverted frames \[(\d+), (\d+)\)", "".join(text)))
    assert inverted == {("0", "4"): 1, ("4", "8"): 1, ("8", "10"): 1}, text
    # Both stores hold the same latents as the undamaged run's.
    entry, ref = cache / "latents" / key, pristine[0] / "latents" / key
    for f in sorted(ref.glob("frames_*")):
        with open_tensors(f) as a, open_tensors(entry / f.name) as b:
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert (entry / "complete").exists()


def test_a_killed_process_does_not_keep_its_lock(tmp_path):
    path = tmp_path / ".locks" / "k" / "x.lock"
    code = ("import sys; from tokenflow.store_locks import Lock; Lock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        assert not Lock(path).acquire(blocking=False)
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lock = Lock(path)
    assert lock.acquire(blocking=False)
    lock.release()


# -- a disk that refuses writes ----------------------------------------------------------------------

def test_full_disk_says_so_and_the_edit_completes(pristine, tmp_path, run, monkeypatch):
    """A store on a disk with room for meta.json, x0 and one chunk only (the write fails as a full disk
    reports it: at fsync, after part of the file is written): one line says what and where, no partial
    file is left, the edit finishes from memory with the undamaged run's frames; the next run, with room
    again, inverts only the chunks that were not stored."""
    cache = tmp_path / "cache"
    real_fsync, used = os.fsync, [0]

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.startswith(str(cache)):
            size = os.fstat(fd).st_size
            if used[0] + size > 25_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            used[0] += size
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc, err, _ = run(*EDIT, "-o", tmp_path / "edit.mp4", "--png", cache=cache)
    assert rc == 0 and "Traceback" not in err, err
    said = warnings(err)
    assert len(said) == 1 and "cannot write" in said[0] and "No space left on device" in said[0], said
    assert f"{CHUNK} " in said[0] and str(cache) in said[0] and "--cache-dir" in said[0]
    assert torch.equal(read_frames(tmp_path / "edit_frames"), pristine[2])
    entry = cache / "latents" / pristine[1]
    assert sorted(p.name for p in entry.iterdir()) == ["frames_000000_000004.safetensors", "meta.json",
                                                      "x0.safetensors"]  # no partial or temporary file

    monkeypatch.setattr(os, "fsync", real_fsync)
    leftover = entry / f".{CHUNK}.k1ll3d.tmp"  # as a writer killed mid-write leaves it
    leftover.write_bytes(b"part of a chunk")
    rc, err, _ = run(*EDIT, "-o", tmp_path / "again.mp4", "--png", "-v", cache=cache)
    assert rc == 0 and warnings(err) == [], err
    assert re.findall(r"inverted frames \[(\d+), (\d+)\)", err) == [("4", "8"), ("8", "10")]
    assert not leftover.exists() and (entry / "complete").exists()
    assert torch.equal(read_frames(tmp_path / "again_frames"), pristine[2])


def test_unwritable_cache_dir_still_edits(pristine, tmp_path, run):
    (tmp_path / "file").write_text("a file, not a folder")
    rc, err, _ = run(*EDIT, "--cache-dir", tmp_path / "file" / "cache", "-o", tmp_path / "edit.mp4", "--png",
                     cache=tmp_path / "unused")
    assert rc == 0 and "Traceback" not in err, err
    said = warnings(err)
    assert len(said) == 1 and "cannot write" in said[0] and "Not a directory" in said[0], said
    assert torch.equal(read_frames(tmp_path / "edit_frames"), pristine[2])


# -- the size cap and the cache commands ------------------------------------------------------------

def _fake_entries(pristine, root: Path, keys: list[str]) -> int:
    """Copies of the undamaged entry under other keys, last used 3, 2, 1 days ago; returns one's size."""
    src = pristine[0] / "latents" / pristine[1]
    for age, k in zip(range(len(keys), 0, -1), keys):
        shutil.copytree(src, root / k)
        t = time.time() - age * 86400
        os.utime(root / k / "meta.json", (t, t))
    return cache_admin.entries(root)[0].size


def test_the_size_cap_evicts_least_recently_used_entries_not_in_use(pristine, tmp_path, run, monkeypatch):
    root = tmp_path / "cache" / "latents"
    old, older_in_use, newer = "1" * 24, "0" * 24, "2" * 24
    size = _fake_entries(pristine, root, [older_in_use, old, newer])
    in_use = Lock(entry_lock_path(root, older_in_use), shared=True)
    in_use.acquire()
    try:
        monkeypatch.setenv("TOKENFLOW_CACHE_MAX_SIZE", str(int(3.5 * size)))  # room for three entries
        rc, err, _ = run(*EDIT, "-o", tmp_path / "edit.mp4", "--png", cache=tmp_path / "cache")
    finally:
        in_use.release()
    assert rc == 0, err
    assert sorted(e.key for e in cache_admin.entries(root)) == sorted([older_in_use, newer, pristine[1]])
    assert torch.equal(read_frames(tmp_path / "edit_frames"), pristine[2])

    monkeypatch.setenv("TOKENFLOW_CACHE_MAX_SIZE", "1K")  # smaller than the entry in use: said once
    rc, err, _ = run(*EDIT, "-o", tmp_path / "again.mp4", "--png", "--no-resume", cache=tmp_path / "cache")
    assert rc == 0, err
    said = warnings(err)
    assert len(said) == 1 and "over its cap of 1.0 KiB" in said[0], said
    assert [e.key for e in cache_admin.entries(root)] == [pristine[1]]
    monkeypatch.setenv("TOKENFLOW_CACHE_MAX_SIZE", "lots")
    rc, err, _ = run(*EDIT, "-o", tmp_path / "bad.mp4", cache=tmp_path / "cache")
    assert rc == 2 and "TOKENFLOW_CACHE_MAX_SIZE 'lots' is not a size" in err


def test_cache_ls_verify_rm_prune(pristine, tmp_path, capsys):
    cache, entry = copy_cache(pristine, tmp_path)
    root = entry.parent
    admin = lambda *a: (cache_admin.main([*a, "--cache-dir", str(root)]), capsys.readouterr())  # noqa: E731

    rc, out = admin("ls")
    assert rc == 0
    line = next(x for x in out.out.splitlines() if x.startswith(pristine[1]))
    assert "10 frames 64x64" in line and "tiny-random" in line and "complete" in line and '"a red car" 2/2' in line

    rc, out = admin("verify")
    assert rc == 0 and "all whole" in out.out
    flip_data(entry / CHUNK)
    (entry / ".x0.safetensors.abc.tmp").write_bytes(b"half a file")  # as a killed writer leaves it
    rc, out = admin("verify")
    assert rc == 1 and f"{CHUNK} fails its checksum" in out.out and "1 damaged" in out.out
    assert (entry / CHUNK).exists()
    rc, out = admin("verify", "--repair")
    assert rc == 0 and "repaired" in out.out
    assert not (entry / CHUNK).exists() and not (entry / "complete").exists()
    assert not list(entry.glob(".*.tmp"))
    rc, out = admin("verify")
    assert rc == 0 and "all whole" in out.out

    # rm: by a unique prefix; never an entry in use; unknown keys are one line and exit 2
    _fake_entries(pristine, root, ["0" * 24, "1" * 24, "2" * 24])
    in_use = Lock(entry_lock_path(root, "1" * 24), shared=True)
    in_use.acquire()
    try:
        rc, out = admin("rm", "0000")
        assert rc == 0 and f"removed {'0' * 24}" in out.out
        rc, out = admin("rm", "1" * 24)
        assert rc == 1 and "in use" in out.err
        rc, out = admin("rm", "ffff")
        assert rc == 2 and out.err.startswith("tokenflow-edit cache: error: no entry 'ffff'")
        assert len(out.err.strip().splitlines()) == 1
        # prune: by age (entry "1" is in use: kept; "2" was used a day ago)
        rc, out = admin("prune", "--older-than", "1.5")
        assert rc == 0
        assert {e.key for e in cache_admin.entries(root)} == {"1" * 24, "2" * 24, pristine[1]}
        rc, out = admin("prune", "--max-size", "1")  # least recently used first, in use kept
        assert rc == 0 and f"evicted {'2' * 24}" in out.out and f"evicted {pristine[1]}" in out.out
        assert [e.key for e in cache_admin.entries(root)] == ["1" * 24]
    finally:
        in_use.release()
    rc, out = admin("prune")
    assert rc == 2 and "--older-than" in out.err
    assert cli.main(["cache", "ls", "--cache-dir", str(root)]) == 0  # dispatched by tokenflow-edit itself

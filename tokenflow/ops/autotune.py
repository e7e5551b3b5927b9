"""`auto` by measurement: on first use at a shape class, time the backends that may run the call and keep
the fastest.

Which backend is fastest depends on the machine (the CPU's vector extensions, the thread count, the GPU),
the shapes and the dtypes, so a fixed priority list is wrong somewhere: the C++ propagation beats torch on
an AVX512-BF16 CPU and loses on an AVX2-only one. So the first call of an operation at a shape class
runs every eligible backend (those `auto` may pick, that accept the inputs and passed their self-check)
on the call's own inputs, interleaved (one warm-up each, which also compiles Triton kernels, then up to
`ROUNDS` rounds), and the one with the lowest time wins, for that shape class, until the process ends.
The choice is also written to a JSON file keyed by the device (CPU model, kernel variant, torch's CPU
capability and threads; or the GPU and its compute capability), the versions and the shape class, as
Triton's autotuner caches its configs, so later processes do not measure again.

Shape class: the operation, the dtypes, the exact channel and head counts, R, J, whether there is a
residual, and S, F and K rounded up to powers of two.

TOKENFLOW_AUTOTUNE=0 turns measurement off (reproducible choices): `auto` then takes the first eligible
backend in priority order. TOKENFLOW_AUTOTUNE_CACHE=FILE moves the file (empty: no file); the default is
$TOKENFLOW_CACHE/ops/autotune.json, else ~/.cache/tokenflow/ops/autotune.json.
`timer` is module state so that tests can replace it (they must not depend on real timings).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("tokenflow")

ENV = "TOKENFLOW_AUTOTUNE"
CACHE_ENV = "TOKENFLOW_AUTOTUNE_CACHE"
ROUNDS = 3
LONG_RUN_S = 0.25  # a warm-up longer than this: one timed round only (the ranking is clear by then)
FORMAT = 1

_lock = threading.RLock()
_chosen: dict[tuple, str] = {}        # (device key, shape class, candidate names) -> backend name
_disk: dict | None = None             # the file's entries, read once per process


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _dtype(t) -> str:
    return str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else "-"


def shape_class(op: str, inputs: dict) -> str:
    """The key under which a measurement is reused (see the module docstring)."""
    if op == "extended_attention":
        v = inputs["v"]
        R, K, S, C = v.shape
        return (f"{op}|{_dtype(v)}|R={R}|K<={_bucket(K)}|S<={_bucket(S)}|C={C}|heads={int(inputs['heads'])}"
                f"|shared_qk={int(bool(inputs.get('shared_qk')))}")
    x, which = inputs["x"], inputs["which"]
    F_, S, C = x.shape
    K = inputs["key_feats"].shape[0]
    key = f"{op}|{_dtype(x)}|F<={_bucket(F_)}|S<={_bucket(S)}|C={C}|K<={_bucket(K)}|J={which.shape[1]}"
    if op == "propagate":
        key_out = inputs["key_out"]
        key += f"|R={key_out.shape[0]}|out={_dtype(key_out)}|residual={_dtype(inputs.get('residual'))}"
    return key


@functools.cache  # auto looks its choice up on every op call: no file read per call
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _cuda_model(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)}, sm_{major}{minor}"


def device_key(device: torch.device) -> str:
    """The machine, device and software a measurement holds for."""
    from tokenflow.ops import __version__
    from tokenflow.ops.capabilities import cpu_isa

    soft = f"torch {torch.__version__}, tokenflow-ops {__version__}"
    if device.type == "cuda":
        return f"cuda: {_cuda_model(device.index if device.index is not None else torch.cuda.current_device())}; {soft}"
    if device.type == "cpu":
        presearch = os.environ.get("TOKENFLOW_CPU_PRESEARCH", "1")
        return (f"cpu: {_cpu_model()}, tokenflow._C {cpu_isa() or 'not built'} (presearch {presearch}), "
                f"torch {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; {soft}")
    return f"{device.type}; {soft}"


def _time_once(name: str, run: Callable[[], object], device: torch.device) -> float:
    """Seconds one run of `run` takes on `device` (synchronised on CUDA). Tests replace `timer`."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - start


timer: Callable[[str, Callable[[], object], torch.device], float] = _time_once


def cache_path() -> Path | None:
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    root = os.environ.get("TOKENFLOW_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "tokenflow") / "ops" / "autotune.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.debug("tokenflow.ops: ignoring the autotune cache %s (%s)", path, e)
        return {}
    return data.get("entries", {}) if isinstance(data, dict) and data.get("format") == FORMAT else {}


def _disk_entries() -> dict:
    global _disk
    if _disk is None:
        path = cache_path()
        _disk = _read(path) if path else {}
    return _disk


def _write(device: str, klass: str, record: dict) -> None:
    """Merge one record into the file (atomically: a temp name, then rename); a failure only costs a
    measurement in a later process."""
    path = cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read(path)  # another process may have added entries since this one read the file
        entries.setdefault(device, {})[klass] = record
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "entries": entries}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("tokenflow.ops: cannot write the autotune cache %s (%s)", path, e)


def _run_fn(backend, op: str, inputs: dict) -> Callable[[], object]:
    fn = getattr(backend, op)
    if op == "extended_attention":
        return lambda: fn(inputs["q"], inputs["k"], inputs["v"], inputs["heads"],
                          shared_qk=inputs.get("shared_qk", False), scale=inputs.get("scale"))
    if op == "cosine_argmax":
        return lambda: fn(inputs["x"], inputs["key_feats"], inputs["which"])
    return lambda: fn(inputs["x"], inputs["key_feats"], inputs["key_out"], inputs["which"], inputs["weights"],
                      inputs.get("residual"))


def measure(op: str, candidates: list, inputs: dict, device: torch.device) -> dict[str, float]:
    """Best seconds per candidate name on these inputs: a warm-up each, then interleaved rounds. A
    candidate that raises is left out (with a warning)."""
    runs = {b.name: _run_fn(b, op, inputs) for b in candidates}
    best: dict[str, float] = {}
    with torch.no_grad():
        for name, run in list(runs.items()):  # warm-up: compiles and caches; its time counts too
            try:
                best[name] = timer(name, run, device)
            except Exception as e:
                log.warning("tokenflow.ops: backend %r failed while auto timed it for %s (%s: %s); skipping it",
                            name, op, type(e).__name__, e)
                runs.pop(name)
        rounds = 1 if best and max(best.values()) > LONG_RUN_S else ROUNDS
        for _ in range(rounds):
            for name, run in runs.items():
                best[name] = min(best[name], timer(name, run, device))
    return best


def pick(op: str, candidates: list, inputs: dict):
    """The fastest of `candidates` (eligible backends, in priority order) for this call's shape class."""
    device = next(t.device for t in inputs.values() if isinstance(t, torch.Tensor))
    names = tuple(b.name for b in candidates)
    by_name = {b.name: b for b in candidates}
    dev, klass = device_key(device), shape_class(op, inputs)
    key = (dev, klass, names)
    with _lock:
        name = _chosen.get(key)
        if name is None:
            record = _disk_entries().get(dev, {}).get(klass)
            if record and sorted(record.get("seconds", {})) == sorted(names) and record.get("backend") in by_name:
                name = record["backend"]
            else:
                seconds = measure(op, candidates, inputs, device)
                if not seconds:
                    return candidates[0]
                name = min(seconds, key=lambda n: (seconds[n], names.index(n)))  # a tie: priority order
                record = {"backend": name, "seconds": seconds,
                          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                _disk_entries().setdefault(dev, {})[klass] = record
                _write(dev, klass, record)
                log.debug("tokenflow.ops: auto measured %s at %s: %s; chose %s", op, klass,
                          ", ".join(f"{n} {s * 1e3:.3g} ms" for n, s in seconds.items()), name)
            _chosen[key] = name
    return by_name[name]


def record_for(op: str, inputs: dict) -> dict | None:
    """The measurement behind auto's choice for a call like this one, if one was made (`explain`)."""
    device = next(t.device for t in inputs.values() if isinstance(t, torch.Tensor))
    return _disk_entries().get(device_key(device), {}).get(shape_class(op, inputs))


def forget() -> None:
    """Drop this process's choices and its copy of the file (tests; after changing threads or caps)."""
    global _disk
    with _lock:
        _chosen.clear()
        _disk = None

"""CPU threads of a run: on a shared machine, PyTorch's default (one per core) can be many times slower.

Each parallel region waits for its slowest thread, so a thread that shares its core with another busy
process stalls all of them: a run beside other work is faster with fewer threads. The default takes the
cores this process may run on (`os.sched_getaffinity`) minus those the 1-minute load average says are busy.
"""
from __future__ import annotations

import logging
import os

from tokenflow.errors import TokenFlowError

THREADS_ENV = "TOKENFLOW_THREADS"
log = logging.getLogger("tokenflow")


def thread_count(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError(text)
    return v


thread_count.__name__ = "thread count (1 or more)"  # argparse names the type in its error message


def default_threads(cores: int, load: float, most: int) -> int:
    """Threads for a run on `cores` allowed cores with a 1-minute load average of `load`, at most `most`
    (torch's own default): the cores other work leaves idle, at least one."""
    return max(1, min(most, cores - int(load + 0.5)))


def set_threads(requested: int | None, note=lambda msg: None) -> int:
    """Set torch's CPU threads: `requested` (--threads), else $TOKENFLOW_THREADS, else, unless the user set
    OMP_NUM_THREADS, the idle cores (`note` says so when that is fewer than the cores). Returns the count."""
    import torch

    if requested is None and os.environ.get(THREADS_ENV):
        try:
            requested = thread_count(os.environ[THREADS_ENV])
        except ValueError:
            raise TokenFlowError(f"{THREADS_ENV}={os.environ[THREADS_ENV]!r} is not a thread count (1 or more); "
                                 f"fix or unset it") from None
    if requested is None:
        if os.environ.get("OMP_NUM_THREADS"):
            log.info("CPU threads: %d (OMP_NUM_THREADS)", torch.get_num_threads())
            return torch.get_num_threads()
        cores, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
        requested = default_threads(cores, load, torch.get_num_threads())
        if requested < min(cores, torch.get_num_threads()):
            note(f"using {requested} CPU thread{'s' if requested > 1 else ''} of {cores}: other work keeps the rest "
                 f"busy (load average {load:.1f}); --threads N or {THREADS_ENV} to choose")
    torch.set_num_threads(requested)
    log.info("CPU threads: %d", requested)
    return requested

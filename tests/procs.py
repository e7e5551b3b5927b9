"""Driving a child process by events, never by deadlines (CI machines are shared and slow)."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def wait_for(p: subprocess.Popen, ready, log: Path | None = None) -> None:
    """Until `ready()` is true (a file appears, a line is written); fails, with the log's text, if `p` ends first."""
    while not ready():
        assert p.poll() is None, f"the process ended before the event\n{log.read_text(errors='replace') if log else ''}"
        time.sleep(0.05)


def stop_when(p: subprocess.Popen, ready, sig: int, log: Path | None = None) -> None:
    """Send `sig` to `p` once `ready()` is true, and wait for it to end; `p` never outlives a failure."""
    try:
        wait_for(p, ready, log)
        p.send_signal(sig)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def default_signals() -> None:
    """preexec_fn of a child that must react to SIGINT/SIGTERM: a pytest-xdist worker ignores SIGINT, and a
    child inherits an ignored signal."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)

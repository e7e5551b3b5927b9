"""Work over a range in batches that shrink when the GPU runs out of memory."""
from __future__ import annotations

import logging

import torch

from tokenflow.progress import bar

log = logging.getLogger("tokenflow")


class Batches:
    """Consecutive [a, b) batches of a range, `size` at a time. A CUDA OOM halves the size and retries
    the batch (logged); the size stays halved for later runs of the same object (the group passes of the
    next steps), so a long job pays for the OOM once."""

    def __init__(self, size: int, what: str, unit: str = "frames"):
        self.size, self.what, self.unit = max(1, size), what, unit

    @classmethod
    def of(cls, size_or_batches: "int | Batches") -> "Batches":
        return size_or_batches if isinstance(size_or_batches, Batches) else cls(size_or_batches, "the VAE")

    def run(self, n: int, fn, progress: bool = False, what: str | None = None):
        """Yield fn(a, b) for batches covering [0, n), in order. `what` names this run in messages."""
        self.what = what or self.what
        a = 0
        with bar(total=n, desc=self.what, enabled=progress, unit=self.unit.rstrip("s")) as pbar:
            while a < n:
                b = min(a + self.size, n)
                try:
                    out = fn(a, b)
                except torch.cuda.OutOfMemoryError:
                    if self.size == 1:
                        raise
                    old, self.size = self.size, self.size // 2
                    torch.cuda.empty_cache()
                    log.warning("CUDA out of memory in %s with %d %s at a time; retrying with %d",
                                self.what, old, self.unit, self.size)
                    continue
                yield out
                pbar.update(b - a)
                a = b

"""Progress bars (tqdm) that a caller can silence."""
from __future__ import annotations

from tqdm.auto import tqdm


def bar(iterable=None, desc: str = "", enabled: bool = True, total: int | None = None, unit: str = "it",
        unit_scale=False):
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled, leave=False,
                dynamic_ncols=True, unit_scale=unit_scale)

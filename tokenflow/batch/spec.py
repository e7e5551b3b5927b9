"""What a manifest or a suite's file says about one edit, before any settings are resolved."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Spec:
    """One edit as its source describes it.

    `settings`: the item's own keys (prompt, inversion_prompt, any EditConfig key, first_frame/stride/fps);
    `base`: its manifest's `defaults` (below the command line's flags, which are below `settings`).
    `address`: where the item's layout puts it (plain: `name`; the suites:
    their own folder keys). `where`: the place in the source file, for messages."""

    id: str
    video: Path
    settings: dict
    address: dict
    where: str
    base: dict = field(default_factory=dict)


@dataclass
class Source:
    """What a reader made of its files: the items, the settings they all share (below the user's), the layout
    the suite's evaluation reads, and the problems found (one line each)."""

    kind: str  # manifest | fivebench | v2vbench | loveu
    specs: list[Spec] = field(default_factory=list)
    defaults: dict = field(default_factory=dict)
    layout: str = "plain"
    problems: list[str] = field(default_factory=list)

"""From what the files say to what will run: every item's settings resolved, its video probed, its outputs placed.

Settings, lowest first: EditConfig's defaults < the suite's defaults (e.g. FiVE-Bench's first 40 frames) <
`--config` < the manifest's `defaults` < the command line's flags < the item's own keys.

Problems of the manifest itself (a missing file, an unknown key, an empty prompt, two items writing one output,
a layout the items cannot be put in) are collected for all items and reported before any work. A bad value of
one item's setting or an unreadable video only marks that item failed: the batch goes on without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenflow.batch import layouts
from tokenflow.batch.manifest import SELECTION_KEYS, SETTING_KEYS, unknown_keys
from tokenflow.batch.records import settings_hash, video_fingerprint
from tokenflow.batch.spec import Source, Spec
from tokenflow.config import EditConfig, check_selection
from tokenflow.errors import TokenFlowError
from tokenflow.sdxl import default_long_side

# Settings that decide the frames an inversion sees and what it stores: items equal in these (and in their video
# and model) share one inversion.
INVERSION_FIELDS = ("inversion_prompt", "n_inversion_steps", "n_timesteps", "n_frames", "batch_size",
                    "match_reference", "depth", "reconstruct", "height", "width", "resize")
MODEL_FIELDS = ("model", "model_config", "dtype", "device", "vae")


@dataclass
class Item:
    spec: Spec
    cfg: EditConfig | None = None
    sel: dict = field(default_factory=dict)
    info: object = None  # VideoInfo
    resize: object = None  # video.Resize
    frames: int = 0  # frames it will edit
    outputs: list[Path] = field(default_factory=list)
    hash: str = ""
    error: str | None = None  # set: the item fails without running

    @property
    def id(self) -> str:
        return self.spec.id

    def model_key(self) -> tuple:
        return tuple(getattr(self.cfg, k) for k in MODEL_FIELDS)

    def frames_key(self) -> tuple:
        r = self.resize
        return (str(self.spec.video.resolve()), self.sel["first_frame"], self.sel["stride"], self.cfg.n_frames,
                r.width, r.height, r.policy, r.via, self.cfg.depth)

    def inversion_key(self) -> tuple:
        return self.model_key() + self.frames_key() + tuple(getattr(self.cfg, k) for k in INVERSION_FIELDS)


@dataclass
class Plan:
    items: list[Item]
    layout: layouts.Layout
    problems: list[str]


def build(source: Source, root: Path, layout_name: str | None, config: dict, flags: dict, crf: int,
          device=lambda d: d) -> Plan:
    """`config`: the --config file's mapping; `flags`: the settings given as flags; `device(requested)`: the
    device this rank uses for it."""
    from tokenflow.video import count_selected, probe, resize_for

    problems = list(source.problems)
    problems += unknown_keys(config, SETTING_KEYS, "--config")
    layout = layouts.get(layout_name or source.layout)
    if layout.name != "plain" and layout.name != source.layout:
        problems.append(f"--layout {layout.name} needs {layout.name} items ({', '.join(layout.keys)}); these are "
                        f"{source.kind} items: use --layout {source.layout}")
    items: list[Item] = []
    owner: dict[Path, str] = {}
    missing: set[Path] = set()
    probed: dict[Path, object] = {}
    fingerprints: dict[Path, object] = {}  # per video (a folder's lists and stats every frame file)
    for spec in source.specs:
        it = Item(spec)
        items.append(it)
        merged = {**source.defaults, **config, **spec.base, **flags, **spec.settings}
        if not str(merged.get("prompt") or "").strip():
            problems.append(f"{spec.where}: the prompt is empty; say what the edited video should show")
        if not spec.video.exists():
            if spec.video not in missing:
                problems.append(f"{spec.where}: video {spec.video} does not exist")
                missing.add(spec.video)
            continue
        if merged.get("depth") and not Path(str(merged["depth"])).expanduser().exists():
            problems.append(f"{spec.where}: depth video {merged['depth']} does not exist")
        address = dict(spec.address)
        if layout.name == "plain":
            address.setdefault("name", spec.id)
            if Path(address["name"]).is_absolute() or ".." in Path(address["name"]).parts:
                problems.append(f"{spec.where}: name {address['name']!r} must be a relative name inside the output folder")
                continue
        elif any(k not in address for k in layout.keys):
            continue  # said once above
        it.outputs = layout.paths(root, address)
        taken = next((p for p in it.outputs if p in owner), None)
        if taken is not None:
            problems.append(f"{spec.where}: writes {taken}, as {owner[taken]} does; give the items different names")
        for p in it.outputs:
            owner.setdefault(p, spec.id)
        spec.address = address
        it.sel = {k: merged.pop(k, d) for k, d in (("first_frame", 0), ("stride", 1), ("fps", None))}
        try:
            it.cfg = EditConfig.from_mapping(merged)
            if layout.frame_aligned and it.cfg.resize == "crop" and not it.cfg.match_reference:
                problems.append(f"{spec.where}: --layout {layout.name} maps each edit back onto the source frames, "
                                f"which `resize: crop` makes impossible (it cuts the borders); use stretch (the "
                                f"suite's default) or pad")
                continue
            it.cfg = it.cfg.replace(device=device(it.cfg.device))
            check_selection(it.sel)
        except TokenFlowError as e:
            it.error = str(e)
            continue
        if spec.video not in probed:
            try:
                probed[spec.video] = probe(spec.video)
            except TokenFlowError as e:
                probed[spec.video] = e
        info = probed[spec.video]
        if isinstance(info, TokenFlowError):
            it.error = str(info)
            continue
        it.info = info
        it.resize = resize_for(info.width, info.height, width=it.cfg.width, height=it.cfg.height, resize=it.cfg.resize,
                               match_reference=it.cfg.match_reference,
                               long_side=default_long_side(it.cfg.model, it.cfg.model_config))
        try:
            it.frames = count_selected(info, it.sel["first_frame"], it.cfg.n_frames, it.sel["stride"])
        except TokenFlowError as e:
            it.error = str(e)
            continue
        if spec.video not in fingerprints:
            fingerprints[spec.video] = video_fingerprint(spec.video)
        it.hash = settings_hash(it.cfg.to_dict(), it.sel, fingerprints[spec.video], layout.name,
                                {"crf": crf} if layout.name == "plain" else {})
    return Plan(items, layout, _unique(problems))


def _unique(lines: list[str]) -> list[str]:
    seen, out = set(), []
    for x in lines:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


__all__ = ["Item", "Plan", "build", "SELECTION_KEYS"]

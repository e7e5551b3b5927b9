"""Our own manifest: YAML, JSON or CSV, every problem in it reported at once.

    defaults:                       # any EditConfig key (and first_frame, stride, fps), for every item
      n_frames: 40
    items:
      - video: clips/bear.mp4       # a file or a folder of frames, relative to the manifest
        prompt: a polar bear walking on ice
        inversion_prompt: a bear walking on rocks   # optional: the source prompt the video is inverted with
        name: bear_polar            # optional: the output's name (default <video>_<prompt>)
        seed: 3                     # optional per-item overrides

A CSV manifest has one row per item with the columns video, prompt and optionally name, inversion_prompt and
any setting; empty cells are left unset. It has no defaults: give them with `--config`.
"""
from __future__ import annotations

import csv
import difflib
import json
import typing
from pathlib import Path

import yaml

from tokenflow.batch.spec import Source, Spec
from tokenflow.config import EditConfig
from tokenflow.outputs import slug

SELECTION_KEYS = ("first_frame", "stride", "fps")  # the input selection, as in single edits' config files
ITEM_KEYS = ("video", "name")
SETTING_KEYS = frozenset(EditConfig.keys()) | set(SELECTION_KEYS) | {"sd_version"}


def unknown_keys(mapping: dict, allowed, where: str) -> list[str]:
    bad = sorted(str(k) for k in mapping if k not in allowed)
    if not bad:
        return []
    said = []
    for k in bad:
        close = difflib.get_close_matches(k, sorted(allowed), n=1)
        said.append(f"{k} (did you mean {close[0]}?)" if close else k)
    return [f"{where}: unknown key(s) {', '.join(said)}; the settings are listed by `tokenflow-edit --help`"]


def coerce(key: str, text: str):
    """A CSV cell as the type of the setting it sets (prompts stay text: a prompt 'yes' is not True)."""
    hints = _hints()
    if key not in hints:
        return text
    args = typing.get_args(hints[key])
    base = next((a for a in args if a is not type(None)), hints[key]) if args else hints[key]
    if type(None) in args and text.strip().lower() in ("none", "null", "auto"):
        return None
    if base is bool:
        v = text.strip().lower()
        if v in ("true", "yes", "1", "on"):
            return True
        if v in ("false", "no", "0", "off"):
            return False
        return text  # left for the setting's own check to reject
    if base in (int, float):
        try:
            return base(text)
        except ValueError:
            return text
    return text


def _hints() -> dict:
    return typing.get_type_hints(EditConfig)


def load_structured(path: Path) -> tuple[object, str | None]:
    """(data, problem) of a YAML or JSON file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path}: cannot be read ({e})"
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text), None
        return yaml.safe_load(text), None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        return None, f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({' '.join(str(e).split())})"


def read_manifest(path: Path) -> Source:
    src = Source("manifest")
    if path.suffix.lower() == ".csv":
        rows, problem = read_csv(path)
        if problem:
            src.problems.append(problem)
            return src
        items = [{k: coerce(k, v) if k in SETTING_KEYS else v for k, v in row.items()} for row in rows]
        defaults = {}
    else:
        data, problem = load_structured(path)
        if problem:
            src.problems.append(problem)
            return src
        if not isinstance(data, dict) or not isinstance(data.get("items"), list):
            src.problems.append(f"{path}: a manifest is a mapping with a list `items` (and optionally a mapping "
                                f"`defaults`); see `tokenflow-edit batch --help`")
            return src
        src.problems += unknown_keys(data, ("defaults", "items"), path.name)
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            src.problems.append(f"{path}: `defaults` must be a mapping of settings")
            defaults = {}
        src.problems += unknown_keys(defaults, SETTING_KEYS, f"{path.name} defaults")
        items = data["items"]
    for i, item in enumerate(items, 1):
        where = f"{path.name} item {i}"
        if not isinstance(item, dict):
            src.problems.append(f"{where}: an item is a mapping (video, prompt, ...)")
            continue
        src.problems += unknown_keys(item, SETTING_KEYS | set(ITEM_KEYS), where)
        if not item.get("video"):
            src.problems.append(f"{where}: no `video` (a video file or a folder of frames, relative to the manifest)")
            continue
        video = (path.parent / str(item["video"])).expanduser()
        settings = {k: v for k, v in item.items() if k in SETTING_KEYS}
        prompt = str(settings.get("prompt") or defaults.get("prompt") or "")
        name = str(item.get("name") or f"{video.stem}_{slug(prompt)}")
        src.specs.append(Spec(name, video, settings, {"name": name}, where, base=defaults))
    return src


def read_csv(path: Path) -> tuple[list[dict], str | None]:
    """Rows as {column: text}, empty cells dropped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return [], f"{path}: not a readable CSV file ({e})"
    return [{k.strip(): v for k, v in row.items() if k and v is not None and v.strip() != ""} for row in rows], None

"""Readers for the benchmark suites' own files, used as they are, and the detection of what a file is.

FiVE-Bench: per-task JSON lists `data/edit_prompt/edit{1..6}_FiVE.json` of {video_name, source_prompt,
    target_prompt, editing_type_id, save_dir, ...}; frames in `data/images/<video_name>/`. The prompts' [brackets]
    (marking the edited words) are dropped, as the suite's evaluation does. Defaults: the first 40 frames (the
    suite's TokenFlow protocol), frames stretched (so the edit maps back onto the source pixel for pixel).
V2VBench: a YAML index `data: [{video_id, prompt?, edit: [{prompt}, ...]}, ...]`; source videos as frame folders
    `frames/<video_id>/` or files `videos/<video_id>.mp4` beside it (or under `--data`).
LOVEU-TGVE 2023: the prompt sheet `LOVEU-TGVE_2023_data.xlsx` (or its CSV export) with the columns `Video name`,
    `Our GT caption` (the source prompt) and `Style / Object / Background / Multiple Changes Caption`; frames in
    `<subset>/480p_frames/<video>/` for the subsets DAVIS_480p, youtube_480p, videvo_480p beside it.
"""
from __future__ import annotations

from pathlib import Path

from tokenflow.batch.manifest import load_structured, read_manifest
from tokenflow.batch.spec import Source, Spec

KINDS = ("manifest", "fivebench", "v2vbench", "loveu")
VIDEO_FILES = (".mp4", ".gif", ".mov", ".webm", ".mkv")

# -- detection ---------------------------------------------------------------------------------------


def detect(path: Path) -> str:
    """Which reader a file needs, from its content."""
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        return "loveu"
    if suffix == ".csv":
        try:
            rows = _rows_of_csv(path)[:50]
        except (OSError, UnicodeDecodeError):
            return "manifest"  # its reader says what is wrong with it
        return "loveu" if any(_is_video_column(c) for r in rows for c in r) else "manifest"
    data, _ = load_structured(path)
    if isinstance(data, list) and data and isinstance(data[0], dict) and "video_name" in data[0]:
        return "fivebench"
    if isinstance(data, dict) and isinstance(data.get("data"), list) and "items" not in data:
        return "v2vbench"
    return "manifest"


def read_sources(paths: list[Path], data: Path | None) -> Source:
    """All files read into one Source; they must be of one kind."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        return Source("manifest", problems=[f"manifest {p} does not exist" for p in missing])
    kinds = {p: detect(p) for p in paths}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{p.name} ({k})" for p, k in kinds.items())
        return Source("manifest", problems=[f"the manifests are of different kinds ({listed}); run one kind per batch"])
    kind = next(iter(kinds.values()))
    out = Source(kind)
    for p in paths:
        s = {"manifest": lambda p: read_manifest(p), "fivebench": lambda p: read_fivebench(p, data),
             "v2vbench": lambda p: read_v2vbench(p, data), "loveu": lambda p: read_loveu(p, data)}[kind](p)
        out.specs += s.specs
        out.problems += s.problems
        out.defaults, out.layout = s.defaults, s.layout
    return out


# -- FiVE-Bench --------------------------------------------------------------------------------------

FIVE_DEFAULTS = {"n_frames": 40, "resize": "stretch"}


def read_fivebench(path: Path, data: Path | None) -> Source:
    src = Source("fivebench", defaults=dict(FIVE_DEFAULTS), layout="fivebench")
    entries, problem = load_structured(path)
    if not problem and not isinstance(entries, list):
        problem = f"{path}: not a FiVE-Bench task file (a JSON list of entries)"
    if problem:
        src.problems.append(problem)
        return src
    root = data or path.resolve().parent.parent  # data/edit_prompt/editN_FiVE.json -> data/
    task = path.name.split("_")[0]  # edit1_FiVE.json -> edit1, as the suite's scripts name the task
    for i, e in enumerate(entries, 1):
        where = f"{path.name} entry {i}"
        if not isinstance(e, dict):
            src.problems.append(f"{where}: not a mapping")
            continue
        missing = [k for k in ("video_name", "target_prompt", "save_dir") if not str(e.get(k) or "").strip()]
        if missing:
            src.problems.append(f"{where}: no {', '.join(missing)} (FiVE-Bench entries have video_name, "
                                f"source_prompt, target_prompt, save_dir)")
            continue
        name = str(e["video_name"])
        settings = {"prompt": _unbracket(e["target_prompt"]), "inversion_prompt": _unbracket(e.get("source_prompt", ""))}
        if e.get("negative_prompt"):
            settings["negative_prompt"] = str(e["negative_prompt"])
        video = _first_existing([root / "images" / name, root / "videos" / f"{name}.mp4"])
        address = {"video_name": name, "save_dir": str(e["save_dir"])}
        src.specs.append(Spec(f"{task}/{name}/{e['save_dir']}", video, settings, address, where))
    return src


def _unbracket(text) -> str:
    return str(text or "").replace("[", "").replace("]", "")


# -- V2VBench ----------------------------------------------------------------------------------------

V2V_DEFAULTS = {"resize": "stretch"}


def read_v2vbench(path: Path, data: Path | None) -> Source:
    src = Source("v2vbench", defaults=dict(V2V_DEFAULTS), layout="v2vbench")
    index, problem = load_structured(path)
    if not problem and not (isinstance(index, dict) and isinstance(index.get("data"), list)):
        problem = f"{path}: not a V2VBench index (a mapping with a list `data`)"
    if problem:
        src.problems.append(problem)
        return src
    here = path.resolve().parent
    for i, e in enumerate(index["data"], 1):
        where = f"{path.name} data entry {i}"
        if not isinstance(e, dict) or not e.get("video_id") or not isinstance(e.get("edit"), list):
            src.problems.append(f"{where}: a V2VBench entry has `video_id` and a list `edit` of {{prompt: ...}}")
            continue
        vid = str(e["video_id"])
        if data is not None:
            places = [data / vid] + [data / f"{vid}{s}" for s in VIDEO_FILES]
        else:
            places = ([here / "frames" / vid] + [here / "videos" / f"{vid}{s}" for s in VIDEO_FILES]
                      + [here / vid] + [here / f"{vid}{s}" for s in VIDEO_FILES])
        video = _first_existing(places)
        for j, edit in enumerate(e["edit"]):
            prompt = edit.get("prompt") if isinstance(edit, dict) else None
            settings = {"prompt": str(prompt or "")}
            if e.get("prompt"):
                settings["inversion_prompt"] = str(e["prompt"])
            src.specs.append(Spec(f"{vid}/{j}", video, settings, {"video_id": vid, "edit_id": j},
                                  f"{where} edit {j}"))
    return src


# -- LOVEU-TGVE 2023 ---------------------------------------------------------------------------------

LOVEU_SUBSETS = ("DAVIS_480p", "youtube_480p", "videvo_480p")
LOVEU_EDITS = {"style": "Style Change Caption", "object": "Object Change Caption",
               "background": "Background Change Caption", "multiple": "Multiple Changes Caption"}
LOVEU_SOURCE = "Our GT caption"
LOVEU_DEFAULTS = {"resize": "stretch"}


def _is_video_column(text) -> bool:
    return str(text or "").strip().lower() == "video name"


def _rows_of_csv(path: Path) -> list[list[str]]:
    import csv
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [list(r) for r in csv.reader(f)]


def _rows_of_xlsx(path: Path) -> list[list]:
    from openpyxl import load_workbook
    wb = load_workbook(path, read_only=True, data_only=True)
    try:
        return [list(r) for r in wb.worksheets[0].iter_rows(values_only=True)]
    finally:
        wb.close()


def read_loveu(path: Path, data: Path | None) -> Source:
    src = Source("loveu", defaults=dict(LOVEU_DEFAULTS), layout="loveu")
    try:
        rows = _rows_of_xlsx(path) if path.suffix.lower() == ".xlsx" else _rows_of_csv(path)
    except ImportError:
        src.problems.append(f"{path}: reading .xlsx needs openpyxl (pip install 'tokenflow[suites]'), or give "
                            f"the sheet's CSV export")
        return src
    except Exception as e:  # noqa: BLE001 - a damaged sheet is the user's to fix; say which and why
        src.problems.append(f"{path}: not a readable sheet ({type(e).__name__}: {e})")
        return src
    head = next((i for i, r in enumerate(rows) if any(_is_video_column(c) for c in r)), None)
    if head is None:
        src.problems.append(f"{path}: no header row with a `Video name` column (the LOVEU-TGVE 2023 prompt sheet)")
        return src
    cols = {str(c).strip(): j for j, c in enumerate(rows[head]) if c is not None}
    need = ["Video name", LOVEU_SOURCE, *LOVEU_EDITS.values()]
    lower = {k.lower(): v for k, v in cols.items()}
    missing = [c for c in need if c.lower() not in lower]
    if missing:
        src.problems.append(f"{path}: no column(s) {', '.join(missing)}")
        return src
    at = {c: lower[c.lower()] for c in need}
    root = (data or path.resolve().parent)
    section = None  # a row naming a subset (and nothing else) starts it, where the sheet has such rows
    for i, r in enumerate(rows[head + 1:], head + 2):
        cell = lambda c: str(r[at[c]]).strip() if at[c] < len(r) and r[at[c]] is not None else ""  # noqa: E731
        name = cell("Video name")
        captions = {k: cell(c) for k, c in LOVEU_EDITS.items()}
        label = _subset_named(name) or _subset_named(r[0] if r else None)
        if label and not any(captions.values()):
            section = label
            continue
        if not name or not any(captions.values()):
            continue  # blank or note rows between the subsets
        where = f"{path.name} row {i}"
        subset, video = _find_loveu_video(root, name, section)
        for edit, prompt in captions.items():
            settings = {"prompt": prompt, "inversion_prompt": cell(LOVEU_SOURCE)}
            src.specs.append(Spec(f"{subset}/{name}/{edit}", video, settings,
                                  {"subset": subset, "video": name, "edit": edit}, f"{where} ({edit})"))
    return src


def _subset_named(text) -> str | None:
    t = str(text or "").strip().lower()
    for s in LOVEU_SUBSETS:
        if t and (t == s.lower() or t == s.split("_")[0].lower()):
            return s
    return None


def _find_loveu_video(root: Path, name: str, section: str | None) -> tuple[str, Path]:
    """(subset, frames folder): the subset folder that holds the video (the sheet's section if none does)."""
    order = ([section] if section else []) + [s for s in LOVEU_SUBSETS if s != section]
    for s in order:
        p = root / s / "480p_frames" / name
        if p.exists():
            return s, p
    s = section or LOVEU_SUBSETS[0]
    return s, root / s / "480p_frames" / name


def _first_existing(places: list[Path]) -> Path:
    return next((p for p in places if p.exists()), places[0])

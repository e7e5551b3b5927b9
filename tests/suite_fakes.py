"""Tiny fake benchmark suites, laid out as the real ones are (few frames, tiny sizes, random content)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from PIL import Image

# Small enough for seconds on 2 CPU cores; n_inversion_steps a multiple of n_timesteps.
TINY = ["--model", "tiny-random", "--batch-size", "4", "--n-inversion-steps", "4", "--n-timesteps", "2",
        "--width", "32", "--height", "32", "-q"]


def clip(n: int, w: int, h: int, seed: int) -> torch.Tensor:
    """uint8 [n, 3, h, w]: a random texture rolling, so frames differ and features differ across tokens."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return torch.stack([torch.roll(base, shifts=(i, 2 * i), dims=(1, 2)) for i in range(n)])


def write_frames(folder: Path, frames: torch.Tensor, pattern: str, first: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames, first):
        Image.fromarray(f.permute(1, 2, 0).numpy()).save(folder / pattern.format(i), quality=95)
    return folder


def fivebench(root: Path) -> Path:
    """data/images/<video>/00001.jpg..., data/edit_prompt/edit{1,2}_FiVE.json; returns data/."""
    data = root / "data"
    # FiVE-Bench numbers its frames from 00001
    write_frames(data / "images" / "0001_bus", clip(6, 40, 24, 1), "{:05d}.jpg", first=1)
    write_frames(data / "images" / "0002_girl-dog", clip(5, 24, 24, 2), "{:05d}.jpg", first=1)
    prompts = data / "edit_prompt"
    prompts.mkdir(parents=True)
    (prompts / "edit1_FiVE.json").write_text(json.dumps([
        {"video_name": "0001_bus", "source_prompt": "a [red] bus on the road", "target_prompt": "a [blue] bus on the road",
         "editing_type_id": "1", "save_dir": "1_a blue bus on the ro", "negative_prompt": "blurry"},
        {"video_name": "0002_girl-dog", "source_prompt": "a girl and a [dog]", "target_prompt": "a girl and a [cat]",
         "editing_type_id": "1", "save_dir": "1_a girl and a cat"},
    ]))
    (prompts / "edit2_FiVE.json").write_text(json.dumps([
        {"video_name": "0001_bus", "source_prompt": "a red bus on the road", "target_prompt": "a red [tram] on the road",
         "editing_type_id": "2", "save_dir": "2_a red tram on the ro"},
    ]))
    return data


def v2vbench(root: Path) -> Path:
    """config.yaml (the index) and frames/<video_id>/00.png ...; returns the index."""
    write_frames(root / "frames" / "hike", clip(6, 32, 24, 3), "{:02d}.png")
    write_frames(root / "frames" / "count", clip(5, 24, 32, 4), "{:02d}.png")
    index = {"data": [
        {"video_id": "hike", "prompt": "a man with a backpack hikes", "edit": [
            {"prompt": "a superman with a backpack hikes through the desert", "src_words": "man"},
            {"prompt": "a man with a backpack hikes through the dolomites, pixel art"}]},
        {"video_id": "count", "edit": [{"prompt": "counting in the snow"}, {"prompt": "counting, watercolor"}]},
    ]}
    (root / "config.yaml").write_text(yaml.safe_dump(index, sort_keys=False))
    return root / "config.yaml"


LOVEU_HEADER = ["Video name", "Our GT caption", "Style Change Caption", "Object Change Caption",
                "Background Change Caption", "Multiple Changes Caption"]
LOVEU_ROWS = [
    ("DAVIS_480p",), ("gold-fish", "goldfish swimming", "goldfish, Van Gogh style", "sharks swimming",
                      "goldfish in the sea", "sharks in the sea, oil painting"),
    (), ("youtube_480p",), ("salsa", "people dancing salsa", "dancing, anime", "robots dancing salsa",
                            "people dancing on the moon", "robots dancing on the moon, anime"),
]


def loveu(root: Path, fmt: str = "xlsx") -> Path:
    """LOVEU-TGVE_2023_data.xlsx (or .csv) with section rows, and <subset>/480p_frames/<video>/00000.jpg."""
    write_frames(root / "DAVIS_480p" / "480p_frames" / "gold-fish", clip(5, 24, 24, 5), "{:05d}.jpg")
    write_frames(root / "youtube_480p" / "480p_frames" / "salsa", clip(4, 24, 24, 6), "{:05d}.jpg")
    rows = [LOVEU_HEADER, *[list(r) for r in LOVEU_ROWS]]
    if fmt == "csv":
        import csv
        path = root / "LOVEU-TGVE_2023_data.csv"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        return path
    from openpyxl import Workbook
    wb = Workbook()
    for r in rows:
        wb.active.append(r)
    path = root / "LOVEU-TGVE_2023_data.xlsx"
    wb.save(path)
    return path


def load_pngs(folder: Path) -> torch.Tensor:
    """A frame folder as the suites read it: image files sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg", ".jpeg"))
    import numpy as np
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in files])

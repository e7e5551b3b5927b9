"""The suites' own files read as they are, and each layout written where the suite's evaluation code reads it
(fake suites built here: few frames, tiny sizes, the tiny random model)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import suite_fakes as fake
from tokenflow.batch import main
from tokenflow.batch.suites import read_sources
from tokenflow.config import EditConfig
from tokenflow.video import probe, read_frames, resize_for, restore_size

TINY = fake.TINY


def run(*args, cache: Path) -> int:
    return main([*map(str, args), *TINY, "--cache-dir", str(cache)])


def expected(editor, video: Path, cache: Path, **settings) -> torch.Tensor:
    """The same item edited through the Python API (edit recomputed, not resumed) and mapped onto the source."""
    cfg = EditConfig(model="tiny-random", batch_size=4, n_inversion_steps=4, n_timesteps=2, width=32, height=32,
                     resize="stretch", cache_dir=str(cache), resume=False, **settings)
    info = probe(video)
    r = resize_for(info.width, info.height, width=cfg.width, height=cfg.height, resize=cfg.resize,
                   match_reference=cfg.match_reference)
    frames = read_frames(video, count=cfg.n_frames, resize=r)
    return restore_size(editor.edit(frames, cfg, progress=False).frames, r, info.width, info.height)


def jpeg(frames: torch.Tensor) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    from tokenflow.batch.layouts import JPEG
    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f.permute(1, 2, 0).numpy()).save(buf, format="JPEG", **JPEG)
        out.append(torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out)


def records(root: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (root / "results.jsonl").read_text().splitlines())}


# -- readers -----------------------------------------------------------------------------------------

def test_fivebench_reader(tmp_path):
    data = fake.fivebench(tmp_path)
    src = read_sources(sorted((data / "edit_prompt").glob("edit*_FiVE.json")), None)
    assert src.kind == "fivebench" and src.layout == "fivebench" and not src.problems
    assert src.defaults == {"n_frames": 40, "resize": "stretch"}
    by = {s.id: s for s in src.specs}
    assert list(by) == ["edit1/0001_bus/1_a blue bus on the ro", "edit1/0002_girl-dog/1_a girl and a cat",
                        "edit2/0001_bus/2_a red tram on the ro"]
    s = by["edit1/0001_bus/1_a blue bus on the ro"]
    # the [brackets] marking the edited words are dropped, as FiVE-Bench's evaluation drops them
    assert s.settings == {"prompt": "a blue bus on the road", "inversion_prompt": "a red bus on the road",
                          "negative_prompt": "blurry"}
    assert s.video == data / "images" / "0001_bus"
    assert s.address == {"video_name": "0001_bus", "save_dir": "1_a blue bus on the ro"}


def test_v2vbench_reader(tmp_path):
    index = fake.v2vbench(tmp_path)
    src = read_sources([index], None)
    assert src.kind == "v2vbench" and not src.problems
    assert [s.id for s in src.specs] == ["hike/0", "hike/1", "count/0", "count/1"]
    assert src.specs[0].settings == {"prompt": "a superman with a backpack hikes through the desert",
                                     "inversion_prompt": "a man with a backpack hikes"}
    assert src.specs[2].settings == {"prompt": "counting in the snow"}  # no source prompt: the default one
    assert src.specs[3].video == tmp_path / "frames" / "count"
    assert src.specs[3].address == {"video_id": "count", "edit_id": 1}
    moved = tmp_path / "elsewhere"
    (tmp_path / "frames").rename(moved)  # --data: the sources are somewhere else
    assert read_sources([index], moved).specs[0].video == moved / "hike"


@pytest.mark.parametrize("fmt", ["xlsx", "csv"])
def test_loveu_reader(tmp_path, fmt):
    sheet = fake.loveu(tmp_path, fmt)
    src = read_sources([sheet], None)
    assert src.kind == "loveu" and src.layout == "loveu" and not src.problems
    assert [s.id for s in src.specs] == [f"{sub}/{v}/{e}" for sub, v in (("DAVIS_480p", "gold-fish"), ("youtube_480p", "salsa"))
                                         for e in ("style", "object", "background", "multiple")]
    s = src.specs[5]
    assert s.settings == {"prompt": "robots dancing salsa", "inversion_prompt": "people dancing salsa"}
    assert s.video == tmp_path / "youtube_480p" / "480p_frames" / "salsa"
    assert s.address == {"subset": "youtube_480p", "video": "salsa", "edit": "object"}


def test_suite_files_of_the_wrong_shape_are_problems_not_tracebacks(tmp_path):
    from tokenflow.batch.suites import read_fivebench, read_v2vbench
    five, v2v = tmp_path / "edit1_FiVE.json", tmp_path / "v2vbench.json"
    five.write_text(json.dumps({"video_name": "0001_bus"}))
    v2v.write_text(json.dumps([{"video_id": "hike"}]))
    assert read_fivebench(five, None).problems == [f"{five}: not a FiVE-Bench task file (a JSON list of entries)"]
    assert read_v2vbench(v2v, None).problems == [f"{v2v}: not a V2VBench index (a mapping with a list `data`)"]


def test_suite_problems_are_reported_before_any_work(tmp_path, capsys):
    data = fake.fivebench(tmp_path)
    f = data / "edit_prompt" / "edit3_FiVE.json"
    f.write_text(json.dumps([{"video_name": "0009_missing", "source_prompt": "a", "target_prompt": "b", "save_dir": "3_b"},
                             {"video_name": "0001_bus", "source_prompt": "a", "target_prompt": "[]", "save_dir": "3_c"},
                             {"video_name": "0001_bus", "source_prompt": "a"}]))
    root = tmp_path / "out"
    assert main([str(f), "-o", str(root), *TINY, "--layout", "v2vbench"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("tokenflow-edit batch: error: ") for line in err), err
    text = "\n".join(err)
    for words in ("0009_missing does not exist", "entry 2: the prompt is empty", "entry 3: no target_prompt, save_dir",
                  "--layout v2vbench needs v2vbench items"):
        assert words in text, text
    assert not root.exists()


# -- layouts, end to end -----------------------------------------------------------------------------

def test_fivebench_layout(tmp_path, tiny_editor):
    data = fake.fivebench(tmp_path)
    root, cache = tmp_path / "results" / "TokenFlow", tmp_path / "cache"
    assert run(*sorted((data / "edit_prompt").glob("edit*_FiVE.json")), "-o", root, cache=cache) == 0
    # FiVE-Bench's evaluate.py: os.path.join(root, video_name, save_dir, "img_ode"), list_images (png/jpg) sorted,
    # each resized to the source frame's size, zipped with the source frames from the first
    for task, entry in (("edit1", 0), ("edit1", 1), ("edit2", 0)):
        e = json.loads((data / "edit_prompt" / f"{task}_FiVE.json").read_text())[entry]
        folder = root / e["video_name"] / e["save_dir"] / "img_ode"
        src = read_frames(data / "images" / e["video_name"])
        got = fake.load_pngs(folder)
        assert got.shape == src.shape  # every frame (fewer than 40 here) at the source's size
        assert sorted(p.name for p in folder.iterdir())[:2] == ["00000.png", "00001.png"]
        want = expected(tiny_editor, data / "images" / e["video_name"], cache, n_frames=40,
                        prompt=e["target_prompt"].replace("[", "").replace("]", ""),
                        inversion_prompt=e["source_prompt"].replace("[", "").replace("]", ""),
                        **({"negative_prompt": e["negative_prompt"]} if "negative_prompt" in e else {}))
        assert (got.int() - want.int()).abs().max() <= 1
        assert (folder.parent / "config.yaml").exists()
    s = json.loads((root / "summary.json").read_text())
    # 0001_bus's two tasks have one source prompt once unbracketed: one inversion per video
    assert (s["done"], s["model_loads"], s["inversions"]) == (3, 1, 2)


def test_v2vbench_layout(tmp_path, tiny_editor):
    index = fake.v2vbench(tmp_path)
    root, cache = tmp_path / "edits", tmp_path / "cache"
    assert run(index, "-o", root, cache=cache) == 0
    # V2VBench's batch evaluation: edit_video_dir / video_id / str(edit_id), a folder of frames sorted by name,
    # compared frame by frame (motion alignment needs the source's frame count and size)
    for vid, j, prompt, inv in (("hike", 1, "a man with a backpack hikes through the dolomites, pixel art",
                                 "a man with a backpack hikes"), ("count", 0, "counting in the snow", "")):
        got = fake.load_pngs(root / vid / str(j))
        src = read_frames(tmp_path / "frames" / vid)
        assert got.shape == src.shape
        want = expected(tiny_editor, tmp_path / "frames" / vid, cache, prompt=prompt, inversion_prompt=inv)
        assert (got.int() - want.int()).abs().max() <= 1
    assert sorted(p.name for p in root.iterdir()) == ["count", "hike", "results.jsonl", "summary.json"]
    assert sorted(p.name for p in (root / "hike").iterdir()) == ["0", "0.yaml", "1", "1.yaml"]


def test_loveu_layout(tmp_path, tiny_editor):
    sheet = fake.loveu(tmp_path)
    root, cache = tmp_path / "TEAM_videos", tmp_path / "cache"
    assert run(sheet, "-o", root, cache=cache) == 0
    # the submission tree: <subset>/<video>/<edit type>/00000.jpg ..., read by run_eval.py as sorted *.jpg
    for sub, video in (("DAVIS_480p", "gold-fish"), ("youtube_480p", "salsa")):
        src = read_frames(tmp_path / sub / "480p_frames" / video)
        for edit in ("style", "object", "background", "multiple"):
            folder = root / sub / video / edit
            assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.jpg" for i in range(len(src))]
            assert fake.load_pngs(folder).shape == src.shape
    row = fake.LOVEU_ROWS[4]
    want = expected(tiny_editor, tmp_path / "youtube_480p" / "480p_frames" / "salsa", cache, prompt=row[3],
                    inversion_prompt=row[1])
    got = fake.load_pngs(root / "youtube_480p" / "salsa" / "object")
    assert (got.int() - jpeg(want).int()).abs().max() <= 1  # the same frames through the same JPEG encoder
    s = json.loads((root / "summary.json").read_text())
    assert (s["done"], s["model_loads"], s["inversions"]) == (8, 1, 2)


# -- several processes -------------------------------------------------------------------------------

def test_two_gloo_ranks_equal_one_rank(tmp_path):
    index = fake.v2vbench(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = {}
    for n in (1, 2):
        root = tmp_path / f"ranks{n}"
        r = subprocess.run([sys.executable, "-m", "tokenflow.batch", str(index), "-o", str(root), *TINY,
                            "--cache-dir", str(tmp_path / f"cache{n}"), "--nproc", str(n)],
                           env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        out[n] = root
    for vid, j in (("hike", 0), ("hike", 1), ("count", 0), ("count", 1)):
        a, b = (sorted((out[n] / vid / str(j)).iterdir()) for n in (1, 2))
        assert [p.name for p in a] == [p.name for p in b] and len(a) > 0
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b)), (vid, j)
    one, two = records(out[1]), records(out[2])
    assert set(one) == set(two) and {r["status"] for r in two.values()} == {"done"}
    # whole videos per rank: the longer video (hike, 6 frames x 2 prompts) on rank 0, count on rank 1
    assert {two[f"hike/{j}"]["rank"] for j in (0, 1)} == {0} and {two[f"count/{j}"]["rank"] for j in (0, 1)} == {1}
    s = json.loads((out[2] / "summary.json").read_text())
    assert s["world_size"] == 2 and s["model_loads_per_rank"] == [1, 1] and s["inversions"] == 2
    assert not list(out[2].glob("results.rank*.jsonl"))  # folded into results.jsonl by rank 0

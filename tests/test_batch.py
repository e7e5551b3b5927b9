"""`tokenflow-edit batch` on our own manifest: problems before work, reuse, failure isolation, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from procs import stop_when

import suite_fakes as fake
from tokenflow.batch import main
from tokenflow.batch.manifest import read_manifest
from tokenflow.video import Resize, resize_frames, restore_size

TINY = fake.TINY
SCRIPT = Path(sys.executable).with_name("tokenflow-edit")


def records(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "results.jsonl").read_text().splitlines()]


def latest(root: Path) -> dict[str, dict]:
    return {r["id"]: r for r in records(root)}


def summary(root: Path) -> dict:
    return json.loads((root / "summary.json").read_text())


@pytest.fixture
def clips(tmp_path):
    """Two frame-folder videos: a (6 frames) and b (5 frames)."""
    fake.write_frames(tmp_path / "a", fake.clip(6, 40, 24, 1), "{:03d}.png")
    fake.write_frames(tmp_path / "b", fake.clip(5, 24, 40, 2), "{:03d}.png")
    return tmp_path


def manifest(folder: Path, items: list[dict], defaults: dict | None = None, name: str = "m.yaml") -> Path:
    p = folder / name
    p.write_text(yaml.safe_dump({"defaults": defaults or {}, "items": items}, sort_keys=False))
    return p


def run(m: Path, root: Path, *extra) -> int:
    return main([str(m), "-o", str(root), *TINY, "--cache-dir", str(root.parent / "cache"), *map(str, extra)])


# -- the manifest ------------------------------------------------------------------------------------

def test_yaml_json_and_csv_manifests_read_alike(tmp_path):
    items = [{"video": "a", "prompt": "a red car", "name": "red", "seed": 3, "pnp_attn_t": 0.25},
             {"video": "b", "prompt": "yes", "inversion_prompt": "a car", "match_reference": True}]
    y = manifest(tmp_path, items)
    (tmp_path / "m.json").write_text(json.dumps({"items": items}))
    (tmp_path / "m.csv").write_text("video,prompt,name,seed,pnp_attn_t,inversion_prompt,match_reference\n"
                                    "a,a red car,red,3,0.25,,\nb,yes,,,,a car,true\n")
    got = [[(s.id, s.video, s.settings) for s in read_manifest(p).specs] for p in (y, tmp_path / "m.json", tmp_path / "m.csv")]
    assert got[0] == got[1] == got[2]
    assert got[0][0] == ("red", tmp_path / "a", {"prompt": "a red car", "seed": 3, "pnp_attn_t": 0.25})
    assert got[0][1][0] == "b_yes"  # default name: <video>_<prompt>; the prompt 'yes' stays text in CSV


def test_manifest_problems_all_reported_before_any_work(clips, capsys):
    m = manifest(clips, [{"video": "a", "prompt": "x", "name": "same"},
                         {"video": "b", "prompt": "y", "name": "same"},
                         {"video": "missing.mp4", "prompt": "z"},
                         {"video": "a", "prompt": " "},
                         {"video": "a", "prompt": "w", "colour": "red"}], defaults={"n_stepz": 3})
    root = clips / "out"
    assert run(m, root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(x.startswith("tokenflow-edit batch: error: ") for x in err), err
    text = "\n".join(err)
    for words in ("defaults: unknown key(s) n_stepz", "item 2: writes", "as same does", "missing.mp4 does not exist",
                  "item 4: the prompt is empty", "item 5: unknown key(s) colour"):
        assert words in text, text
    assert not root.exists()  # nothing was run or written


def test_cli_wiring(tmp_path):
    r = subprocess.run([str(SCRIPT), "batch", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "fivebench" in r.stdout and "--retry-failed" in r.stdout and "--nproc" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tokenflow.batch", "nothing.yaml", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "tokenflow-edit batch: error: manifest nothing.yaml does not exist"


# -- reuse -------------------------------------------------------------------------------------------

def test_one_model_load_and_one_inversion_per_video_and_source_prompt(clips, monkeypatch):
    from tokenflow.editor import TokenFlowEditor

    calls = {"load": 0, "invert": 0}
    load, invert = TokenFlowEditor.from_config, TokenFlowEditor.invert

    def counted_load(cfg):
        calls["load"] += 1
        return load(cfg)

    def counted_invert(self, *a, **k):
        calls["invert"] += 1
        return invert(self, *a, **k)
    monkeypatch.setattr(TokenFlowEditor, "from_config", staticmethod(counted_load))
    monkeypatch.setattr(TokenFlowEditor, "invert", counted_invert)
    items = [{"video": v, "prompt": p} for v in ("a", "b") for p in ("a red car", "a blue car", "a green car")]
    items.append({"video": "a", "prompt": "a red car", "inversion_prompt": "a car", "name": "a_source"})
    root = clips / "out"
    assert run(manifest(clips, items), root) == 0
    s = summary(root)
    assert (s["done"], s["model_loads"], s["inversions"]) == (7, 1, 3) and calls == {"load": 1, "invert": 3}
    recs = latest(root)
    assert [recs[f"a_{c}"]["inversion_reused"] for c in ("a-red-car", "a-blue-car", "a-green-car")] == [False, True, True]
    assert recs["a_source"]["inversion_reused"] is False  # its own source prompt: its own inversion
    assert recs["a_a-red-car"]["seconds"]["invert"] > 0 and recs["a_a-blue-car"]["seconds"]["invert"] == 0
    assert (root / "a_a-red-car.mp4").exists() and (root / "a_a-red-car.yaml").exists()


# -- failures ----------------------------------------------------------------------------------------

def test_failures_are_isolated_recorded_and_retried_on_request(clips, monkeypatch, capsys):
    from tokenflow.editor import TokenFlowEditor

    (clips / "text.mp4").write_text("not a video\n")
    edit = TokenFlowEditor.edit

    def oom_for_one_prompt(self, job, *a, **k):
        if job.cfg.prompt == "too big":
            raise torch.cuda.OutOfMemoryError("fake: CUDA out of memory")
        return edit(self, job, *a, **k)
    monkeypatch.setattr(TokenFlowEditor, "edit", oom_for_one_prompt)
    m = manifest(clips, [{"video": "a", "prompt": "fine"}, {"video": "text.mp4", "prompt": "x"},
                         {"video": "a", "prompt": "y", "pnp_attn_t": 2}, {"video": "b", "prompt": "too big"},
                         {"video": "b", "prompt": "fine too"}])
    root = clips / "out"
    assert run(m, root) == 1
    recs = latest(root)
    assert {k: r["status"] for k, r in recs.items()} == {"a_fine": "done", "text_x": "failed", "a_y": "failed",
                                                        "b_too-big": "failed", "b_fine-too": "done"}
    assert "not a readable video" in recs["text_x"]["reason"]
    assert "pnp_attn_t = 2" in recs["a_y"]["reason"]
    assert recs["b_too-big"]["reason"].startswith("out of GPU memory after the OOM retries")
    assert all("\n" not in r["reason"] for r in recs.values() if r["reason"])
    err = capsys.readouterr().err
    assert "tokenflow-edit batch: failed: b_too-big: out of GPU memory" in err and "Traceback" not in err
    # a rerun skips the done items and leaves the failed ones failed; --retry-failed retries them
    assert run(m, root) == 1
    assert summary(root)["skipped"] == 2 and summary(root)["model_loads"] == 0
    monkeypatch.setattr(TokenFlowEditor, "edit", edit)
    assert run(m, root, "--retry-failed") == 1
    recs = latest(root)
    assert recs["b_too-big"]["status"] == "done" and recs["a_fine"]["status"] == "skipped"
    assert recs["text_x"]["status"] == recs["a_y"]["status"] == "failed"  # still unreadable / still out of range


# -- resuming ----------------------------------------------------------------------------------------

def _frames_of(root: Path) -> dict[str, torch.Tensor]:
    from tokenflow.video import read_frames
    return {p.name: read_frames(p) for p in sorted(root.glob("*/*")) if p.is_dir()}


def test_interrupted_batch_resumes_and_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """Ctrl-C in the middle of the third item: the rerun skips the two done, resumes the third from its edit
    checkpoint, and every output equals that of a run never interrupted."""
    from tokenflow.latent_store import EditCheckpoint

    index = fake.v2vbench(tmp_path)
    slow = ["--n-timesteps", "4", "--n-inversion-steps", "8"]

    def go(root, cache):
        return main([str(index), "-o", str(root), *TINY, *slow, "--cache-dir", str(cache)])
    assert go(tmp_path / "whole", tmp_path / "cache_whole") == 0

    save, saves = EditCheckpoint.save, []

    def interrupt_third_item(self, step, x):
        saves.append(step)
        if len(saves) == 4 * 2 + 3:  # two steps into the third item
            raise KeyboardInterrupt
        return save(self, step, x)
    monkeypatch.setattr(EditCheckpoint, "save", interrupt_third_item)
    root, cache = tmp_path / "cut", tmp_path / "cache_cut"
    assert go(root, cache) == 130
    assert [r["status"] for r in records(root)] == ["done", "done"]
    assert not list(root.rglob(".*"))  # no temporary names left
    monkeypatch.setattr(EditCheckpoint, "save", save)
    assert go(root, cache) == 0
    recs = records(root)[2:]
    assert [r["status"] for r in recs] == ["skipped", "skipped", "done", "done"]
    assert recs[2]["resumed_steps"] == 2 and recs[3]["resumed_steps"] == 0
    for vid in ("hike", "count"):
        for j in (0, 1):
            a, b = (fake.load_pngs(r / vid / str(j)) for r in (tmp_path / "whole", root))
            assert torch.equal(a, b), (vid, j)


def test_killed_batch_loses_at_most_the_item_in_progress(tmp_path):
    index = fake.v2vbench(tmp_path)
    root, cache = tmp_path / "out", tmp_path / "cache"
    args = [sys.executable, "-m", "tokenflow.batch", str(index), "-o", str(root), *TINY, "--cache-dir", str(cache)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(tmp_path / "err.txt", "w") as err:
        p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)
        # The event: the first finished item's line in results.jsonl.
        results = root / "results.jsonl"
        stop_when(p, lambda: results.exists() and results.read_text().strip(), signal.SIGKILL, tmp_path / "err.txt")
    first = records(root)
    assert first and all(r["status"] == "done" for r in first)
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    now = latest(root)
    assert all(now[x["id"]]["status"] == "skipped" for x in first) and len(now) == 4
    assert {v["status"] for v in now.values()} <= {"done", "skipped"}
    assert not list(root.rglob(".*"))


# -- mapping an edit back onto its source -------------------------------------------------------------

@pytest.mark.parametrize("policy", ["stretch", "pad"])
def test_restore_size_inverts_stretch_and_pad(policy):
    src = torch.nn.functional.interpolate(fake.clip(2, 6, 4, 7).float(), size=(40, 60), mode="bilinear").round().to(torch.uint8)
    r = Resize(32, 32, policy)
    back = restore_size(resize_frames(src, 32, 32, policy), r, 60, 40)
    assert back.shape == src.shape
    err = (back.float() - src.float()).abs().mean()
    assert err < 4, err  # a smooth image survives the round trip
    if policy == "pad":  # the borders are cut, not squeezed in: a stretch of the padded frame is far off
        squeezed = restore_size(resize_frames(src, 32, 32, policy), Resize(32, 32, "stretch"), 60, 40)
        assert (squeezed.float() - src.float()).abs().mean() > 3 * err


def test_restore_size_refuses_crop():
    from tokenflow.errors import TokenFlowError
    with pytest.raises(TokenFlowError, match="cannot be mapped back"):
        restore_size(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), Resize(32, 32, "crop"), 60, 40)


def test_records_fold_the_ranks_parts_and_ignore_a_torn_line(tmp_path):
    """What a multi-rank run that died leaves: rank parts, a half-written last line. The next run reads them all
    (the last line of an id wins) and rank 0 folds them into results.jsonl in manifest order."""
    from tokenflow.batch.records import Records

    (tmp_path / "results.jsonl").write_text(json.dumps({"id": "b", "status": "failed"}) + "\n")
    (tmp_path / "results.rank1.jsonl").write_text(json.dumps({"id": "b", "status": "done"}) + "\n{\"id\": \"c\", \"sta")
    (tmp_path / "results.rank0.jsonl").write_text(json.dumps({"id": "a", "status": "done"}) + "\n")
    rec = Records(tmp_path)
    assert {k: v["status"] for k, v in rec.latest().items()} == {"a": "done", "b": "done"}
    rec.fold_parts(order=["a", "b", "c"])
    assert not list(tmp_path.glob("results.rank*.jsonl"))
    assert [(r["id"], r["status"]) for r in records(tmp_path)] == [("b", "failed"), ("a", "done"), ("b", "done")]

"""The HTML report (every image it references exists and decodes; rendered headless where chromium is
installed) and the commands that write it and the metrics: `tokenflow-edit eval` and single edits'
--metrics/--report."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("cv2")
pytest.importorskip("matplotlib")

from tokenflow.report import write_report  # noqa: E402
from tokenflow.video import read_frames, write_video  # noqa: E402

SCRIPT = Path(sys.executable).with_name("tokenflow-edit")
CHROMIUM = Path("/usr/bin/chromium")


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.alts, self.ids, self.links, self.rows, self.cells = [], [], set(), [], 0, []
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
            self.alts.append(a.get("alt"))
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self.rows += 1
        if tag == "td" and self._in_body and "data-v" in a:
            self.cells.append(a["data-v"])

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def decode(src: str, page: Path) -> Image.Image:
    if src.startswith("data:"):
        head, data = src.split(",", 1)
        assert head.endswith(";base64")
        im = Image.open(io.BytesIO(base64.b64decode(data)))
    else:
        assert "://" not in src and not src.startswith("/"), src  # beside the page, so it opens offline
        im = Image.open(page.parent / src)
    im.load()
    return im


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    d = tmp_path_factory.mktemp("items")
    from tokenflow.sample import SAMPLE_PATH
    from tokenflow.video import resize_frames

    src = read_frames(SAMPLE_PATH, count=10)
    small = resize_frames(src, 96, 56, "crop")
    edit = 255 - small
    write_video(d / "b.mp4", edit, 24)
    return [
        dict(name="in-memory", prompt="a cat", status="done", frames=10, size=[96, 56], source_frames=small,
             edited_frames=edit, seconds={"invert": 2.0, "edit": 3.0, "write": 0.5},
             metrics={"clip_text": 21.5, "clip_frame": 0.93, "warp_error": 0.02}),
        dict(id="from-files", prompt="a dog <b>bold</b>", status="done", output=str(d / "b.mp4"), input="sample",
             frames=10, size=[96, 56], timings={"invert": 1.0, "edit": 4.0},
             metrics={"clip_text": 25.0, "clip_frame": 0.97, "warp_error": 0.01}),
        dict(name="broken", prompt="x", status="failed", error="out of memory after the retries",
             output=str(d / "missing.mp4"), frames=30, seconds={"read": 0.1}),
    ]


@pytest.mark.parametrize("embed", [True, False])
def test_every_image_exists_and_decodes(tmp_path, records, embed):
    path = write_report(records, tmp_path / "report.html", embed=embed)
    page = parse(path)
    assert page.rows == 3  # one summary row per record
    assert set(page.links) <= page.ids  # every item link lands on its section
    kinds = [decode(s, path).format for s in page.images]
    # 2 items with pictures (strip + GIF each), plots: time per frame, time per stage, distributions
    assert kinds.count("GIF") == 2 and kinds.count("PNG") == 5
    assert (list(tmp_path.glob("report_files/*")) != []) == (not embed)
    text = path.read_text()
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text  # the prompt is escaped
    assert "out of memory after the retries" in text and "pictures unavailable" in text
    assert "25.0" in page.cells and "0.97" in page.cells  # the metrics, as sortable values


def test_strip_shows_source_above_edit(tmp_path, records):
    page_path = write_report(records[:1], tmp_path / "one.html")
    page = parse(page_path)
    strip = decode(page.images[page.alts.index("strip")], page_path)
    a = np.asarray(strip.convert("RGB")).astype(int)
    h = (a.shape[0] - 4) // 2
    top, bottom = a[:h], a[-h:]
    assert np.abs(top + bottom - 255).mean() < 12  # the edit row is the negative of the source row


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (Debian package `chromium`)")
def test_the_page_renders_in_a_browser(tmp_path, records):
    path = write_report(records, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", f"--screenshot={shot}",
                    path.as_uri()], capture_output=True, check=True)
    img = np.asarray(Image.open(shot).convert("L")).astype(float)
    assert img.std() > 20 and (img < 200).mean() > 0.05  # not blank: text, plots and pictures drawn


# -- the commands ----------------------------------------------------------------------------------------

def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(cwd / "cache"))
    return subprocess.run([str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """A tiny edit of the sample with --metrics --report (tiny random model and CLIP)."""
    if not SCRIPT.exists():
        pytest.skip("console script not installed (pip install -e .)")
    pytest.importorskip("tokenflow.editor")
    from tokenflow.metrics.models import tiny_clip_dir

    d = tmp_path_factory.mktemp("edit")
    clip = tiny_clip_dir()
    r = cli("sample", "--prompt", "a cat", "--model", "tiny-random", "--batch-size", "4", "--n-inversion-steps", "4",
            "--n-timesteps", "2", "--width", "64", "--height", "64", "--frames", "8", "--start", "4", "--stride", "2",
            "-o", "edit.mp4", "--metrics", "--report", "--clip-model", clip, cwd=d)
    assert r.returncode == 0, r.stderr
    return d, r, clip


def test_single_edit_metrics_and_report(edited):
    d, r, _ = edited
    assert sorted(p.name for p in d.iterdir() if p.name != "cache") == ["edit.mp4", "edit.yaml", "edit_report.html"]
    result = yaml.safe_load((d / "edit.yaml").read_text())["result"]
    assert set(result["metrics"]) >= {"clip_text", "clip_frame", "warp_error", "warp_error_source"}
    assert result["frames"] == 8 and "edit" in result["seconds"] and "eval" in result["seconds"]
    assert "clip_frame" in r.stdout and "pick_score" in r.stdout and "skipped" in r.stdout  # the table
    assert "hf download yuvalkirstain/PickScore_v1" in r.stderr  # PickScore's model is not here: one note
    page = parse(d / "edit_report.html")
    assert all(decode(s, d / "edit_report.html") for s in page.images) and len(page.images) >= 3
    again = cli("--config", "edit.yaml", "-o", "again.mp4", "-q", cwd=d)  # `result` is not a setting
    assert again.returncode == 0, again.stderr


def test_eval_command_reads_the_side_yaml_and_matches_the_edit(edited):
    d, _, clip = edited
    r = cli("eval", "edit.mp4", "--clip-model", clip, "--json", "eval.json", "--report", "eval.html", "-q", cwd=d)
    assert r.returncode == 0, r.stderr
    got = json.loads((d / "eval.json").read_text())
    # source, prompt and selection (frames 4, 6, ...) came from edit.yaml; the edit measured its in-memory
    # frames, eval the encoded mp4: close, not equal
    assert got["prompt"] == "a cat" and got["frames"] == 8 and got["source"].endswith("sample.mp4")
    want = yaml.safe_load((d / "edit.yaml").read_text())["result"]["metrics"]
    assert got["clip_frame"] == pytest.approx(want["clip_frame"], abs=0.01)
    assert got["warp_error_source"] == pytest.approx(want["warp_error_source"], abs=0.01)
    # flags override the side YAML (whose start 4, stride 2 would find 2 frames in the 8-frame edit)
    from tokenflow.metrics.cli import main
    out = d / "override.json"
    assert main([str(d / "edit.mp4"), "--source", str(d / "edit.mp4"), "--start", "0", "--stride", "1",
                 "--metrics", "warp_error", "--json", str(out), "-q"]) == 0
    self_eval = json.loads(out.read_text())
    assert self_eval["warp_error"] == self_eval["warp_error_source"]  # the edit measured against itself
    assert (d / "eval.html").exists() and parse(d / "eval.html").rows == 1


@pytest.mark.parametrize("args, words", [
    (["missing.mp4", "--source", "sample"], "does not exist"),
    (["sample", "--metrics", "fvd"], "unknown metric"),
    (["sample", "--metrics", "warp_error"], "needs the source video"),
    (["sample", "--source", "sample", "--metrics", "clip_text", "--clip-model", "tokenflow-tests/none", "--prompt", "x"],
     "hf download tokenflow-tests/none"),
])
def test_eval_errors_are_one_line(tmp_path, args, words):
    if not SCRIPT.exists():
        pytest.skip("console script not installed")
    r = cli("eval", *args, cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("tokenflow-edit")]
    assert lines[-1].startswith("tokenflow-edit: error:") and words in lines[-1]
    assert "Traceback" not in r.stderr

"""The `tokenflow-edit` console script, run for real in a subprocess (tiny random model, tiny settings)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from procs import default_signals, stop_when

from tokenflow.config import EditConfig
from tokenflow.sample import SAMPLE_PATH
from tokenflow.video import probe, read_frames

SCRIPT = Path(sys.executable).with_name("tokenflow-edit")
pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed (pip install -e .)")

# Small enough for seconds on 2 CPU cores; n_inversion_steps a multiple of n_timesteps (the kept latents
# lie on the inversion grid).
TINY = ["--model", "tiny-random", "--batch-size", "4", "--n-inversion-steps", "4", "--n-timesteps", "2",
        "--width", "64", "--height", "64"]


def cli(*args, cwd: Path, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(cache or cwd / "cache"))
    return subprocess.run([str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)


def config_keys(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "cache")


def audio_seconds(path: Path) -> float:
    import av
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        return sum(p.duration for p in c.demux(a) if p.size) * float(a.time_base)


# -- without the engine ------------------------------------------------------------------------------

def test_help_lists_every_setting(tmp_path):
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    from tokenflow.cli import flags_of
    for f in EditConfig.keys():
        flag = flags_of(f)[0]
        assert flag in r.stdout, flag
        assert f"config key: {f})" in " ".join(r.stdout.split()), f
    assert "(default: 0.5; config key: pnp_attn_t)" in " ".join(r.stdout.split())
    for flag in ("--start", "--frames", "--stride", "--resize", "--png", "--side-by-side", "--overwrite",
                 "--quiet", "--config"):
        assert flag in r.stdout
    assert cli("invert", "--help", cwd=tmp_path).returncode == 0


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.mp4").write_text("just text\n")
    data = SAMPLE_PATH.read_bytes()
    (d / "cut.mp4").write_bytes(data[:len(data) // 2])
    (d / "exists.mp4").write_bytes(b"do not touch")
    return d


@pytest.mark.parametrize("args, words", [
    (["missing.mp4", "--prompt", "x"], "does not exist"),
    (["text.mp4", "--prompt", "x"], "not a readable video"),
    (["cut.mp4", "--prompt", "x"], "truncated"),
    (["sample", "--prompt", "x", "-o", "no/such/dir/out.mp4"], "does not exist"),
    (["sample", "--prompt", "x", "-o", "exists.mp4"], "--overwrite"),
    (["sample", "--prompt", "x", "-o", "out.avi"], ".mp4"),
    (["sample", "--prompt", "x", "--frames", "0"], "--frames"),
    (["sample", "--prompt", "x", "--stride", "0"], "--stride"),
    (["sample", "--prompt", "x", "--start", "-3"], "--start"),
    (["sample", "--prompt", "x", "--pnp-attn-t", "2"], "pnp_attn_t"),
    (["sample", "--prompt", "x", "--width", "100"], "multiple of 8"),
    (["sample", "--prompt", "x", "--quiet", "--verbose"], "not allowed with"),
    (["sample", "--prompt", "x", "--match-reference", "--resize", "pad"], "conflicts"),
    (["sample", "--prompt", "x", "--mode", "magic"], "invalid choice"),
    (["sample"], "prompt is empty"),
    (["invert", "sample", "--png"], "unrecognized"),
    (["sample", "--prompt", "x", "--config", "missing.yaml"], "config file"),
    (["sample", "--prompt", "x", "--backend", "nope"], "backend 'nope'"),
])
def test_bad_input_exits_2_with_one_line(bad_inputs, args, words):
    before = visible(bad_inputs)
    r = cli(*args, "--model", "tiny-random", cwd=bad_inputs)  # never a download, should a case get that far
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.strip() and not _tiny_banner(line)]
    assert len(errors) == 1 and errors[0].startswith("tokenflow-edit: error: "), r.stderr
    assert words in errors[0]
    assert "Traceback" not in r.stderr and "loading model" not in r.stderr  # found before anything loads
    assert visible(bad_inputs) == before  # no partial output, no default output folder
    assert (bad_inputs / "exists.mp4").read_bytes() == b"do not touch"


def _tiny_banner(line: str) -> bool:
    return line.startswith("!!!") or "WARNING" in line


# -- with the engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    pytest.importorskip("tokenflow.editor")
    d = tmp_path_factory.mktemp("run")
    r = cli("sample", "--prompt", "a red car", *TINY, "--frames", "10", "-o", "edit.mp4", "--png", "--side-by-side",
            cwd=d)
    assert r.returncode == 0, r.stderr
    return d, r


def test_outputs(run_dir):
    d, r = run_dir
    assert visible(d) == ["edit.mp4", "edit.yaml", "edit_frames", "edit_side_by_side.mp4"]
    info = probe(d / "edit.mp4")
    assert info.frames == 10 and info.fps == Fraction(24) and (info.width, info.height) == (64, 64)
    assert info.has_audio and abs(audio_seconds(d / "edit.mp4") - 10 / 24) < 0.05
    sbs = probe(d / "edit_side_by_side.mp4")
    assert sbs.frames == 10 and (sbs.width, sbs.height) == (128, 64) and sbs.has_audio
    assert len(list((d / "edit_frames").glob("*.png"))) == 10
    summary = r.stdout.strip().splitlines()
    assert len(summary) == 1 and "done: 10 frames 64x64" in summary[0] and "peak GPU memory" in summary[0]
    assert "MEANINGLESS" in r.stderr and "MEANINGLESS" in r.stdout  # tiny-random says so loudly
    cfg = config_keys(d / "edit.yaml")
    assert cfg["input"] == "sample" and cfg["prompt"] == "a red car" and cfg["n_frames"] == 10
    EditConfig.from_mapping({k: v for k, v in cfg.items() if k in EditConfig.keys()})


def test_written_config_reproduces_the_run(run_dir):
    d, _ = run_dir
    r = cli("--config", "edit.yaml", "-o", "again.mp4", "--png", "-q", cwd=d)
    assert r.returncode == 0, r.stderr
    a, b = config_keys(d / "edit.yaml"), config_keys(d / "again.yaml")
    assert a == b
    # PNGs compare the edits themselves (H.264 of tiny noisy frames is not bit-reproducible). The first run
    # edited from the inversion it had just computed, the second from the store: float rounding may move a
    # few pixels by one level.
    diff = (read_frames(d / "edit_frames").int() - read_frames(d / "again_frames").int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert probe(d / "again.mp4").frames == 10
    assert "inversion reused" in r.stdout  # the latent store of the first run served the second


def test_existing_output_needs_overwrite(run_dir):
    d, _ = run_dir
    before = (d / "edit.mp4").read_bytes()
    r = cli("--config", "edit.yaml", "-o", "edit.mp4", "-q", cwd=d)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (d / "edit.mp4").read_bytes() == before
    r = cli("--config", "edit.yaml", "-o", "edit.mp4", "-q", "--overwrite", "--seed", "7", cwd=d)
    assert r.returncode == 0, r.stderr
    assert config_keys(d / "edit.yaml")["seed"] == 7


def test_reference_config_and_selection(tmp_path):
    pytest.importorskip("tokenflow.editor")
    (tmp_path / "config_pnp.yaml").write_text("""\
# general
seed: 1
device: 'cpu'
output_path: 'tokenflow-results'
# data
data_path: 'sample'
latents_path: 'latents' # should be the same as 'save_dir' arg used in preprocess
n_inversion_steps: 500 # for retrieving the latents of the inversion
n_frames: 40
# diffusion
sd_version: '2.1'
guidance_scale: 7.5
n_timesteps: 50
prompt: "a marble sculpture of a woman running, Venus de Milo"
negative_prompt: "ugly, blurry, low res, unrealistic, unaesthetic"
batch_size: 8
# pnp params -- injection thresholds in [0, 1]
pnp_attn_t: 0.5
pnp_f_t: 0.8
""")
    # flags override the file: the tiny model and tiny step counts; frames 4, 6, ..., 18 of the clip
    r = cli("--config", "config_pnp.yaml", *TINY, "--frames", "8", "--start", "4", "--stride", "2",
            "-o", "ref.mp4", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = probe(tmp_path / "ref.mp4")
    assert info.frames == 8 and info.fps == Fraction(12)  # every 2nd frame: half the rate, same duration
    assert info.has_audio and abs(audio_seconds(tmp_path / "ref.mp4") - 8 / 12) < 0.05
    cfg = config_keys(tmp_path / "ref.yaml")
    assert cfg["prompt"] == "a marble sculpture of a woman running, Venus de Milo"
    assert (cfg["first_frame"], cfg["stride"], cfg["n_frames"], cfg["model"]) == (4, 2, 8, "tiny-random")


def test_invert_then_edit_and_folder_input(tmp_path):
    pytest.importorskip("tokenflow.editor")
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    from PIL import Image
    for i, f in enumerate(read_frames(SAMPLE_PATH, count=8)):
        Image.fromarray(f.permute(1, 2, 0).numpy()).save(frames_dir / f"{i}.png")
    r = cli("invert", "frames", *TINY, "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "inverted 8 frames 64x64" in r.stdout and visible(tmp_path) == ["frames"]
    r = cli("edit", "frames", "--prompt", "a blue car", *TINY, "--fps", "12", "-o", "out.mp4", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "inversion reused" in r.stdout
    info = probe(tmp_path / "out.mp4")
    assert info.frames == 8 and info.fps == 12 and not info.has_audio


def test_sigint_during_editing(tmp_path):
    """Ctrl-C after the inversion: exit 130, no output or temporary file, and the store serves the rerun."""
    pytest.importorskip("tokenflow.editor")
    slow = ["--model", "tiny-random", "--batch-size", "4", "--n-inversion-steps", "20", "--n-timesteps", "20",
            "--width", "64", "--height", "64"]
    cache = tmp_path / "cache"
    cache.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(cache))
    # Output to files, not pipes: a full pipe would block the run before the event it is waited for. SIGINT
    # as a terminal delivers it: a pytest-xdist worker ignores SIGINT, and children inherit an ignored signal.
    with open(cache / "stderr.txt", "w+") as log, open(cache / "stdout.txt", "w") as stdout:
        p = subprocess.Popen([str(SCRIPT), "sample", "--prompt", "x", *slow, "-o", "out.mp4", "--png"],
                             cwd=tmp_path, env=env, stdout=stdout, stderr=log, text=True,
                             preexec_fn=default_signals)
        # The event: the edit checkpoint appears after the first finished editing step.
        stop_when(p, lambda: list(cache.glob("latents/*/edit_*.safetensors")), signal.SIGINT, cache / "stderr.txt")
        err = (cache / "stderr.txt").read_text()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert visible(tmp_path) == []  # no output, no temporary names
    r = cli("sample", "--prompt", "x", *slow, "-o", "out.mp4", "-q", cwd=tmp_path, cache=cache)
    assert r.returncode == 0, r.stderr
    assert "inversion reused" in r.stdout
    assert probe(tmp_path / "out.mp4").frames == 48
    shutil.rmtree(cache)

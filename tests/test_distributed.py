"""One video on several processes (tokenflow.distributed): gloo ranks on the CPU, started by torchrun, equal one
process; faults end every rank with one message and a rerun resumes. Tiny model, 64x64, 2 steps; 19 frames in
groups of 4 (5 groups) divide neither the group size nor 2 or 3 ranks. Tests wait on process exit, never on a
clock (a hung rank is ended by the product's own collective timeout)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_latents_match
from dist_driver import clip, config

from tokenflow.errors import TokenFlowError

DRIVER = Path(__file__).with_name("dist_driver.py")
SCRIPT = Path(sys.executable).with_name("tokenflow-edit")
N = 19
TINY = ["--model", "tiny-random", "--batch-size", "4", "--n-inversion-steps", "2", "--n-timesteps", "2",
        "--width", "64", "--height", "64"]


def run(args: list, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(DRIVER.parent),
                **{k: str(v) for k, v in env.items()})
    return subprocess.run([str(a) for a in args], env=full, capture_output=True, text=True)


def torchrun(n: int, *args, **env) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args], **env)


def launched(n: int, module: str, *args, **env) -> subprocess.CompletedProcess:
    """`python -m module args` on n ranks through tokenflow.distributed.launch (what --nproc runs)."""
    return run([sys.executable, "-c", f"import sys; from tokenflow.distributed import launch; "
                f"sys.exit(launch({n}, {module!r}, sys.argv[1:]))", *args], **env)


def ranks_edit(tmp: Path, n: int, *pairs: str, cache: Path | None = None, **env) -> tuple[subprocess.CompletedProcess, list]:
    """The driver's edit of the 19-frame clip on n ranks; every rank's output."""
    tmp.mkdir(parents=True, exist_ok=True)
    r = launched(n, "dist_driver", tmp, cache or tmp / "cache", N, *pairs, **env)
    outs = [torch.load(tmp / f"rank{i}.pt") for i in range(n)] if r.returncode == 0 else []
    return r, outs


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tokenflow-edit: error:")]


@pytest.fixture(scope="module")
def one_process(tiny_editor, tmp_path_factory):
    """The edit in this process: what every rank count must give."""
    return tiny_editor.edit(clip(N), config(str(tmp_path_factory.mktemp("one")), []), progress=False)


def records_per_keyframe(unet, dtype=torch.float32) -> int:
    from tokenflow.planner import records_bytes
    return records_bytes(unet, 1, 8, 8, dtype)


def gathered_per_step(unet, ranks: int, most: int) -> int:
    """Bytes a rank receives per keyframe pass: at every self-attention layer, from each other rank `most` keyframes
    (padded) of [S, C] float32 per gather; 4 gathers (two branches' keys and values), or 3 where Q/K injection
    shares the source keys (the decoder's layers, at step 0 of 2); averaged over the 2 steps."""
    from tokenflow.layers import self_attention_layers
    total = sum((8 >> L.level) ** 2 * L.channels * ((3 if L.qk_injection else 4) + 4) for L in self_attention_layers(unet))
    return total * 4 * (ranks - 1) * most // 2


@pytest.mark.parametrize("n_ranks, pairs", [(2, ["chunk_frames=1"]), (3, [])], ids=["2 ranks, keyframe chunks of 1",
                                                                                   "3 ranks"])
def test_ranks_equal_one_process(tmp_path, tiny_editor, one_process, n_ranks, pairs):
    r, outs = ranks_edit(tmp_path, n_ranks, *pairs)
    assert r.returncode == 0, r.stderr[-3000:]
    # contiguous groups per rank: 5 groups as 3 + 2 or 2 + 2 + 1, so frames [0, 12) [12, 19) or [0, 8) [8, 16) [16, 19)
    want = {2: [[0, 12], [12, 19]], 3: [[0, 8], [8, 16], [16, 19]]}[n_ranks]
    assert [o["frames"] for o in outs] == want
    assert_latents_match(torch.cat([o["latents"] for o in outs]), one_process.latents)
    frames = outs[0]["all_frames"]  # rank 0 received every rank's frames as its writer would
    assert frames.shape == one_process.frames.shape
    assert (frames.int() - one_process.frames.int()).abs().max() <= 1
    unet = tiny_editor.models.unet
    most = {2: 3, 3: 2}[n_ranks]  # the busiest rank's keyframes
    for i, o in enumerate(outs):
        assert o["comm"]["gathered_bytes"] == gathered_per_step(unet, n_ranks, most)
        assert o["comm"]["boundary_bytes"] == (0 if i == 0 else records_per_keyframe(unet))


def test_controlnet_ranks_equal_one_process(tmp_path, tiny_editor, one_process):
    """Mode controlnet on 2 ranks: each rank's UNet calls take the condition maps of its own frames."""
    pytest.importorskip("cv2")  # canny maps
    one = tiny_editor.edit(clip(N), config(str(tmp_path / "one"), ["mode=controlnet"]), progress=False)
    assert (one.latents - one_process.latents).abs().max() > 1e-2  # the ControlNet changes the edit
    r, outs = ranks_edit(tmp_path / "ranks", 2, "mode=controlnet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_latents_match(torch.cat([o["latents"] for o in outs]), one.latents)


def test_sdxl_ranks_equal_one_process(tmp_path):
    """SDXL on 2 ranks: its added conditioning (pooled text, size numbers) goes into every rank's UNet calls."""
    from tokenflow.editor import TokenFlowEditor
    cfg = config(str(tmp_path / "one"), ["model=tiny-random-sdxl"])
    one = TokenFlowEditor.from_config(cfg).edit(clip(N), cfg, progress=False)
    r, outs = ranks_edit(tmp_path / "ranks", 2, "model=tiny-random-sdxl")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_latents_match(torch.cat([o["latents"] for o in outs]), one.latents)


def test_cli_nproc_writes_what_one_process_writes(tmp_path):
    """`tokenflow-edit --nproc 2` (torch.distributed.run inside): the same PNG frames, the same settings file, one
    tiny-model warning and one summary line; the side-by-side is streamed from rank 1 a second time."""
    from tokenflow.video import probe, read_frames

    sel = ["sample", "--prompt", "a red car", *TINY, "--frames", N, "--png"]
    one = run([SCRIPT, *sel, "-o", tmp_path / "one.mp4", "-q"], TOKENFLOW_CACHE=tmp_path / "c1")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([SCRIPT, "--nproc", "2", *sel, "--side-by-side", "-o", tmp_path / "two.mp4"], TOKENFLOW_CACHE=tmp_path / "c2")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_frames(tmp_path / "one_frames"), read_frames(tmp_path / "two_frames")
    assert a.shape == (N, 3, 64, 64) and (a.int() - b.int()).abs().max() <= 1
    assert probe(tmp_path / "two.mp4").frames == N and probe(tmp_path / "two_side_by_side.mp4").frames == N
    strip = lambda p: [line for line in p.read_text().splitlines() if not line.startswith("#")]  # noqa: E731
    assert strip(tmp_path / "one.yaml") == strip(tmp_path / "two.yaml")
    assert two.stdout.count("done: 19 frames") == 1 and "most of 2 ranks" in two.stdout
    assert two.stderr.count("WARNING: --model tiny-random") == 1
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_inversion_resumes_only_missing_chunks_with_another_rank_count(tmp_path):
    """Three ranks invert (torchrun -m tokenflow.cli invert); a chunk lost as in a crash before it was written is
    the only one two ranks invert again, and it comes back the same."""
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    args = ["-m", "tokenflow.cli", "invert", "sample", *TINY, "--frames", N, "-v"]
    r = torchrun(3, *args, TOKENFLOW_CACHE=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    inverted = lambda err: sorted(re.findall(r"rank (\d)/\d: inverted frames \[(\d+), (\d+)\)", err))  # noqa: E731
    assert inverted(r.stderr) == [("0", "0", "8"), ("1", "8", "16"), ("2", "16", "19")]  # every 3rd missing chunk
    entry = next((cache / "latents").iterdir())
    lost = entry / "frames_000008_000016.safetensors"
    before = load_file(lost)
    lost.unlink()
    (entry / "complete").unlink()
    r = torchrun(2, *args, TOKENFLOW_CACHE=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert inverted(r.stderr) == [("0", "8", "16")]
    assert (entry / "complete").exists()
    after = load_file(lost)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_failing_rank_stops_every_rank_and_the_rerun_resumes(tmp_path, one_process):
    """Rank 1 raises at the start of step 1: every rank ends, rank 1 says why in one line (no traceback) and rank 0
    that it lost contact; nothing finished is lost: the rerun reuses the inversion and resumes at step 1 on both
    ranks, and gives the uninterrupted edit."""
    cache = tmp_path / "cache"
    r, _ = ranks_edit(tmp_path / "a", 2, "resume=true", cache=cache, TOKENFLOW_TEST_FAULT="1:1:raise",
                      TOKENFLOW_TEST_FAULT_FILE=tmp_path / "fault")
    assert r.returncode == 2, r.stderr[-3000:]
    assert (tmp_path / "fault").read_text() == "raise"
    lines = errors(r.stderr)
    assert "tokenflow-edit: error: rank 1/2: injected failure" in lines
    assert all("rank 1/2: injected failure" in x or "rank 0/2: lost contact" in x for x in lines), lines
    assert "Traceback" not in r.stderr
    r, outs = ranks_edit(tmp_path / "b", 2, "resume=true", cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(o["reused"], o["resumed"]) for o in outs] == [(True, 1), (True, 1)]
    assert_latents_match(torch.cat([o["latents"] for o in outs]), one_process.latents)


def test_a_killed_rank_is_named_and_the_others_stop(tmp_path):
    """SIGKILL (as the out-of-memory killer sends): the launcher names the rank; the others stop."""
    r, _ = ranks_edit(tmp_path, 2, TOKENFLOW_TEST_FAULT="1:0:exit", TOKENFLOW_TEST_FAULT_FILE=tmp_path / "fault")
    assert (tmp_path / "fault").read_text() == "exit"
    assert r.returncode == 1
    assert "tokenflow-edit: error: rank 1/2 was killed by SIGKILL" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_hung_rank_ends_the_run_at_the_collective_timeout(tmp_path):
    """Rank 1 stops answering inside the edit: rank 0's next collective gives up after TOKENFLOW_DIST_TIMEOUT (10 s
    here; the setup before it waits longer) with one line naming the timeout, and the launcher stops rank 1. The
    test waits for the processes to end."""
    r, _ = ranks_edit(tmp_path, 2, TOKENFLOW_TEST_FAULT="1:0:hang", TOKENFLOW_TEST_FAULT_FILE=tmp_path / "fault",
                      TOKENFLOW_DIST_TIMEOUT=10)
    assert (tmp_path / "fault").read_text() == "hang"
    assert r.returncode == 1
    lines = errors(r.stderr)
    assert len(lines) == 1 and "rank 0/2: lost contact" in lines[0] and "within 10 s (TOKENFLOW_DIST_TIMEOUT)" in lines[0]


def test_more_ranks_than_groups_is_one_line_before_any_work(tmp_path):
    r = torchrun(3, "-m", "tokenflow.cli", "sample", "--prompt", "x", *TINY, "--frames", 8, "-o", tmp_path / "o.mp4",
                 TOKENFLOW_CACHE=tmp_path / "cache")
    assert r.returncode != 0
    assert errors(r.stderr) == ["tokenflow-edit: error: 3 ranks share 2 group(s) of 4 frames: every rank needs at least "
                                "one group (a keyframe of its own); use at most 2 ranks, a smaller --batch-size, or "
                                "more frames (flag --batch-size, config key batch_size)"]
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("o*"))


# -- in this process ---------------------------------------------------------------------------------

def test_nproc_beyond_the_gpus_is_refused(monkeypatch):
    from tokenflow.distributed import Ranks, check_nproc, LaunchError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TokenFlowError, match="--nproc 3 starts 3 processes, one GPU each, but this machine has 2"):
        check_nproc(3, None)
    check_nproc(2, None)
    check_nproc(8, "cpu")  # CPU ranks: any number
    with pytest.raises(TokenFlowError, match="--nproc 0 must be at least 1"):
        check_nproc(0, "cpu")
    # Under torchrun with more processes than GPUs: the first rank without one says so, the others stay quiet.
    for local, speaks in ((2, True), (3, False)):
        with pytest.raises(LaunchError) as e:
            Ranks(local, 4, local).join(None)
        assert e.value.speak is speaks and "has 2 GPU(s)" in str(e.value)


class FakeGather:
    """Comm.gather_rows's all-gather played in one process: the calling rank sends its rows of one of `rows` (each
    [K, ...]), padded to the busiest rank's count; every rank's block of that tensor lands in its place, padding
    as NaN (it must never be read)."""

    def __init__(self, rows: list[torch.Tensor], counts: list[int], rank: int):
        self.rows, self.counts, self.rank = rows, counts, rank

    def __call__(self, out, send):
        m, lo = max(self.counts), sum(self.counts[:self.rank])
        c = self.counts[self.rank]
        assert len(send) == m
        whole = next(t for t in self.rows if torch.equal(t[lo:lo + c], send[:c]))
        pos = 0
        for r, c in enumerate(self.counts):
            out[r * m:r * m + c] = whole[pos:pos + c]
            out[r * m + c:(r + 1) * m] = float("nan")
            pos += c


@pytest.mark.parametrize("counts", [[2, 2, 1], [1, 3, 2, 3]])
def test_gathered_rows_come_in_rank_order_without_padding(counts):
    from tokenflow.distributed import Ranks
    from tokenflow.distributed_edit import Comm

    full = torch.randn(sum(counts), 6, 16)
    for rank in range(len(counts)):
        ranks = Ranks(rank, len(counts))
        ranks.comm_device = torch.device("cpu")
        comm = Comm(ranks, counts)
        comm._all_gather = FakeGather([full], counts, rank)
        lo = sum(counts[:rank])
        got = comm.gather_rows(full[lo:lo + counts[rank]])
        assert torch.equal(got, full)
        assert comm.stats.gathered_bytes == (len(counts) - 1) * max(counts) * 6 * 16 * 4


@pytest.mark.parametrize("shared_qk, window", [(False, None), (True, None), (False, 2), (True, 1)])
def test_a_ranks_keyframe_attention_is_its_rows_of_the_whole(shared_qk, window):
    """Each rank's keyframes against every rank's keys (faked gather) equal their rows of the one-process extended
    attention (tokenflow.ops reference; the windowed one with a window narrower than the 5 keyframes)."""
    from tokenflow import ops
    from tokenflow.distributed import Ranks
    from tokenflow.distributed_edit import Comm, RankPart
    from tokenflow.windowed import windowed_extended_attention

    g = torch.Generator().manual_seed(1)
    K, S, C, heads, scale = 5, 6, 16, 2, 0.3
    q, k = (torch.randn(1 if shared_qk else 3, K, S, C, generator=g) for _ in range(2))
    v = torch.randn(3, K, S, C, generator=g)
    if window:
        whole = windowed_extended_attention(q, k, v, heads, shared_qk=shared_qk, scale=scale, window=window,
                                            backend="torch")
    else:
        whole = ops.extended_attention(q, k, v, heads, shared_qk=shared_qk, scale=scale, backend="torch")
    parts = [range(0, 2), range(2, 4), range(4, 5)]
    counts = [len(p) for p in parts]
    rows = [*k, *v]
    for rank, p in enumerate(parts):
        ranks = Ranks(rank, 3)
        ranks.comm_device = torch.device("cpu")
        comm = Comm(ranks, counts)
        comm._all_gather = FakeGather(rows, counts, rank)
        part = RankPart(p, range(p.start * 4, p.stop * 4), comm)
        sl = slice(p.start, p.stop)
        got = part.keyframe_attention(q[:, sl], k[:, sl], v[:, sl], heads, shared_qk=shared_qk, scale=scale,
                                      window=window, backend="torch")
        torch.testing.assert_close(got, whole[:, sl], rtol=1e-5, atol=1e-6)
    # Not a tautology: the rows of a rank attending to its own keys only differ.
    alone = ops.extended_attention(q[:, :2], k[:, :2], v[:, :2], heads, shared_qk=shared_qk, scale=scale, backend="torch")
    assert (alone[1:] - whole[1:, :2]).abs().max() > 1e-2


def test_split_groups_is_contiguous_and_even():
    from tokenflow.keyframes import split_groups
    assert split_groups(5, 2, 4) == [range(0, 3), range(3, 5)]
    assert split_groups(5, 3, 4) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split_groups(3, 3, 4) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(TokenFlowError, match="use at most 2 ranks"):
        split_groups(2, 3, 4)


@pytest.mark.slow  # two CPU ranks of the tiny model
def test_bench_pipeline_nproc_smoke(tmp_path):
    """bench/bench_pipeline.py --nproc: the simulated per-rank figures always, measured ones from real ranks (here gloo
    on the CPU: it checks the script, the timings mean nothing)."""
    import json

    out = tmp_path / "ranks.json"
    r = run([sys.executable, DRIVER.parents[1] / "bench" / "bench_pipeline.py", "--smoke", "--nproc", "2", "--json", out,
             "--markdown", tmp_path / "ranks.md"])
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    sim, meas = row["simulated"], row["measured"]
    assert row["ranks"] == 2 and sim["rank_keyframes"] == 3 and sim["gathered_bytes_per_step"] > 0
    assert [rec["frames"] for rec in meas["per_rank"]] == [12, 7]
    # what the ranks counted in the edit (2 steps) against the simulation of one step without Q/K injection
    assert 0 < meas["received_bytes_per_step_max"] <= sim["gathered_bytes_per_step"]
    assert meas["scaling_efficiency"] is None  # no 1-rank run to compare with
    assert "| 19 | 2 | 3 of 5 |" in (tmp_path / "ranks.md").read_text()


def test_records_reserve_the_received_keyframe_in_front():
    from tokenflow.state import KeyframeRecords

    rec = KeyframeRecords(lead=1)
    f, o = torch.randn(3, 5, 8), torch.randn(3, 3, 5, 8)
    rec.put_feats("l", f)
    rec.put_out("l", o)
    last_f, last_o = rec.last("l")
    assert torch.equal(last_f, f[-1:]) and torch.equal(last_o, o[:, -1:])
    pf, po = torch.randn(1, 5, 8), torch.randn(3, 1, 5, 8)
    rec.fill_lead("l", pf, po)
    feats, out = rec.take("l", 0, 4, torch.device("cpu"))  # the received keyframe, then this rank's three
    assert torch.equal(feats, torch.cat([pf, f])) and torch.equal(out, torch.cat([po, o], dim=1))
    assert rec.layers() == ["l"]


class TwoRanks:
    """all_gather_object of rank 0 of two, the other rank's values given in turn."""

    def __init__(self, others: list):
        self.others, self.rank, self.world = list(others), 0, 2

    def all_gather_object(self, obj, what=""):
        return [obj, self.others.pop(0)]


@pytest.mark.parametrize("other_latest, other_has, want", [(0, True, 0), (1, True, 1), (-1, True, None), (0, False, None)],
                         ids=["other a step behind", "same step", "other has none", "other lost its step"])
def test_rank_checkpoints_resume_at_the_step_every_rank_holds(tmp_path, other_latest, other_has, want):
    """This rank saved steps 0 and 1 (its two files); the other rank's saves are at most one step behind. All
    resume at the latest step every rank holds, or restart together."""
    from tokenflow.distributed_edit import RankCheckpoint
    from tokenflow.editing import Part
    from tokenflow.latent_store import LatentStore

    store = LatentStore(tmp_path, {"k": 1}, 8)
    ck = RankCheckpoint(store, {"prompt": "x"}, Part(range(0, 2), range(0, 8), 0), TwoRanks([other_latest, other_has]))
    x0, x1 = torch.randn(8, 4, 2, 2), torch.randn(8, 4, 2, 2)
    ck.save(0, x0)
    ck.save(1, x1)
    got = ck.load()
    if want is None:
        assert got is None and ck.step() is None
    else:
        assert got[0] == want and torch.equal(got[1], (x0, x1)[want])

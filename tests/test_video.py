"""Video I/O (tokenflow.video) and the bundled sample clip (tokenflow.sample)."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tokenflow.config import EditConfig
from tokenflow.errors import TokenFlowError
from tokenflow.sample import FPS, HEIGHT, N_FRAMES, SAMPLE_PATH, WIDTH, flow, motion, render
from tokenflow.video import (Resize, probe, read_frames, resize_for, resize_frames, side_by_side, write_png_frames,
                             write_video)


def smooth_clip(n=12, h=64, w=96):
    """Frames that H.264 keeps nearly exactly: smooth gradients that shift a little per frame."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    frames = []
    for i in range(n):
        r = (x * 2 + i * 3) % 256
        g = (y * 3 + i * 2) % 256
        b = torch.full_like(x, 40 + 10 * i)
        frames.append(torch.stack([r, g, b]).to(torch.uint8))
    return torch.stack(frames)


def audio_duration(path) -> float:
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        return sum(p.duration for p in c.demux(a) if p.size) * float(a.time_base)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- the sample clip ---------------------------------------------------------------------------------

def test_sample_asset():
    info = probe(SAMPLE_PATH)
    assert (info.frames, info.fps, info.width, info.height) == (N_FRAMES, FPS, WIDTH, HEIGHT)
    assert info.fps == Fraction(24) and isinstance(info.fps, Fraction)
    assert info.has_audio and info.audio_codec == "aac"
    assert SAMPLE_PATH.stat().st_size < 2_000_000
    # the committed file is the rendered clip (up to H.264 loss)
    err = (read_frames(SAMPLE_PATH).float() - render().float()).abs().mean()
    assert err < 8


def test_sample_is_deterministic(tmp_path):
    assert torch.equal(render(), render())
    from tokenflow.sample import make_sample
    a, b = make_sample(tmp_path / "a.mp4", n_frames=6), make_sample(tmp_path / "b.mp4", n_frames=6)
    assert a.read_bytes() == b.read_bytes()
    assert probe(a).frames == 6 and probe(a).has_audio


def test_sample_ground_truth_motion():
    """Every pixel of the (never occluded) square and of the visible background moves by flow()."""
    frames = render(8).numpy()
    from tokenflow.sample import _layers
    m = motion(8)
    for i in range(7):
        d = flow(i, 8)
        lab0, lab1 = _layers(m, i), _layers(m, i + 1)
        ys, xs = np.nonzero(lab0 != 1)  # square and background (the disc is occluded by the square)
        xt, yt = xs + d[0, ys, xs].astype(int), ys + d[1, ys, xs].astype(int)
        ok = (xt >= 0) & (xt < WIDTH) & (yt >= 0) & (yt < HEIGHT)
        ys, xs, xt, yt = ys[ok], xs[ok], xt[ok], yt[ok]
        same_layer = lab1[yt, xt] == lab0[ys, xs]
        assert same_layer.mean() > 0.9
        ys, xs, xt, yt = ys[same_layer], xs[same_layer], xt[same_layer], yt[same_layer]
        assert np.array_equal(frames[i + 1][:, yt, xt], frames[i][:, ys, xs])


# -- reading -----------------------------------------------------------------------------------------

def test_selection_matches_full_decode():
    full = read_frames(SAMPLE_PATH)
    assert full.shape == (N_FRAMES, 3, HEIGHT, WIDTH) and full.dtype == torch.uint8
    part = read_frames(SAMPLE_PATH, start=5, count=7, stride=3)
    assert torch.equal(part, full[5:5 + 7 * 3:3])
    tail = read_frames(SAMPLE_PATH, start=40, stride=4)  # count None: to the end
    assert torch.equal(tail, full[40::4])


def test_read_resizes_while_decoding():
    out = read_frames(SAMPLE_PATH, count=3, resize=Resize(128, 128, "crop"))
    assert out.shape == (3, 3, 128, 128)
    ref = resize_frames(read_frames(SAMPLE_PATH, count=3), 128, 128, "crop")
    assert torch.equal(out, ref)


def test_folder_of_frames_natural_order(tmp_path):
    for k in (1, 2, 10, 11):  # lexical order would put 10 and 11 before 2
        Image.fromarray(np.full((16, 24, 3), k, np.uint8)).save(tmp_path / f"frame{k}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    info = probe(tmp_path)
    assert info.is_folder and info.frames == 4 and (info.width, info.height) == (24, 16) and not info.has_audio
    assert read_frames(tmp_path)[:, 0, 0, 0].tolist() == [1, 2, 10, 11]
    assert read_frames(tmp_path, start=1, stride=2)[:, 0, 0, 0].tolist() == [2, 11]


def test_gif(tmp_path):
    ims = [Image.fromarray(np.full((40, 60, 3), 20 * k, np.uint8)) for k in range(5)]
    ims[0].save(tmp_path / "a.gif", save_all=True, append_images=ims[1:], duration=100, loop=0)
    info = probe(tmp_path / "a.gif")
    assert info.frames == 5 and info.fps == 10
    assert read_frames(tmp_path / "a.gif").shape == (5, 3, 40, 60)


# -- bad inputs --------------------------------------------------------------------------------------

def _truncated_faststart(tmp_path) -> Path:
    """A cut mp4 whose index is at the front: it opens, then runs out of frames."""
    fs = tmp_path / "faststart.mp4"
    with av.open(str(SAMPLE_PATH)) as i, av.open(str(fs), "w", options={"movflags": "faststart"}) as o:
        s = o.add_stream_from_template(i.streams.video[0])
        for p in i.demux(i.streams.video[0]):
            if p.dts is not None:
                p.stream = s
                o.mux(p)
    cut = tmp_path / "cut_faststart.mp4"
    data = fs.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    return cut


def test_bad_inputs(tmp_path):
    (tmp_path / "text.mp4").write_text("this is not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    data = SAMPLE_PATH.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])  # the index (moov) is at the end: gone
    (tmp_path / "nothing").mkdir()
    cases = {
        tmp_path / "missing.mp4": "does not exist",
        tmp_path / "text.mp4": "not a readable video",
        tmp_path / "empty.mp4": "empty",
        tmp_path / "cut.mp4": "truncated",
        _truncated_faststart(tmp_path): "truncated",
        tmp_path / "nothing": "no image frames",
    }
    for path, words in cases.items():
        with pytest.raises(TokenFlowError, match=words):
            read_frames(path)
    with pytest.raises(TokenFlowError, match="no frames selected"):
        read_frames(SAMPLE_PATH, start=N_FRAMES)
    for kw in ({"stride": 0}, {"count": 0}, {"start": -1}):
        with pytest.raises(TokenFlowError):
            read_frames(SAMPLE_PATH, **kw)


# -- sizes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src, kw, want", [
    ((1920, 1080), {}, (512, 288)),
    ((1080, 1920), {}, (288, 512)),
    ((720, 480), {}, (512, 336)),                      # crop: rounds down, cuts the excess
    ((720, 480), {"resize": "pad"}, (512, 344)),       # pad: rounds up, adds borders
    ((720, 480), {"resize": "stretch"}, (512, 344)),   # stretch: nearest
    ((320, 240), {}, (512, 384)),                      # small inputs come up to 512
    ((1920, 1080), {"width": 768}, (768, 432)),
    ((1920, 1080), {"height": 384}, (680, 384)),
    ((1920, 1080), {"width": 512, "height": 512}, (512, 512)),
    ((640, 480), {"match_reference": True, "resize": "stretch"}, (512, 512)),
    ((640, 480), {"match_reference": True, "resize": "stretch", "width": 672, "height": 384}, (672, 384)),
    ((500, 500), {"match_reference": True, "resize": "stretch", "width": 384, "height": 384}, (512, 512)),
])
def test_resize_for(src, kw, want):
    EditConfig(**kw).validate()  # the same keys as the config's
    r = resize_for(*src, **kw)
    assert (r.width, r.height) == want and r.width % 8 == 0 and r.height % 8 == 0


def test_reference_mode_stretches_square_inputs_twice():
    # the reference extracted frames at W x H, then resized square ones to 512 x 512
    r = resize_for(500, 500, match_reference=True, resize="stretch", width=384, height=384)
    assert r == Resize(512, 512, "stretch", via=(384, 384))
    assert resize_for(640, 480, match_reference=True, resize="stretch").via is None


def test_resize_policies():
    f = torch.zeros(1, 3, 40, 80, dtype=torch.uint8)
    f[:, 0, :, :20] = 255  # red left quarter
    f[:, 1, :, 20:60] = 255  # green middle
    crop = resize_frames(f, 40, 40, "crop")  # cuts the sides: all green
    assert crop.shape == (1, 3, 40, 40) and crop[0, 1].float().mean() > 250 and crop[0, 0].float().mean() < 5
    pad = resize_frames(f, 40, 40, "pad")  # fits 40x20 in the middle, black above and below
    assert pad.shape == (1, 3, 40, 40) and pad[0, :, :9].max() == 0 and pad[0, :, 31:].max() == 0
    assert pad[0, 0, 20, :8].float().mean() > 250
    stretch = resize_frames(f, 40, 40, "stretch")
    ref = np.asarray(Image.fromarray(f[0].permute(1, 2, 0).numpy()).resize((40, 40), Image.Resampling.LANCZOS))
    assert torch.equal(stretch[0], torch.from_numpy(ref.copy()).permute(2, 0, 1))  # as the reference: PIL Lanczos
    with pytest.raises(TokenFlowError):
        resize_frames(f, 40, 40, "zoom")


# -- writing -----------------------------------------------------------------------------------------

def test_round_trip_exact_fps(tmp_path):
    clip = smooth_clip()
    for fps in (Fraction(30000, 1001), Fraction(24), Fraction(25, 2)):
        out = write_video(tmp_path / f"v{fps.numerator}.mp4", clip, fps)
        info = probe(out)
        assert info.fps == fps and isinstance(info.fps, Fraction)
        assert (info.frames, info.width, info.height, info.codec) == (len(clip), 96, 64, "h264")
        back = read_frames(out)
        assert back.shape == clip.shape and (back.float() - clip.float()).abs().mean() < 3
    assert leftovers(tmp_path) == []


def test_iterable_chunks_and_odd_sizes(tmp_path):
    clip = smooth_clip(6, 33, 47)
    out = write_video(tmp_path / "odd.mp4", (clip[i:i + 4] for i in range(0, 6, 4)), Fraction(24))
    info = probe(out)
    assert info.frames == 6 and (info.width, info.height) == (48, 34)  # padded to even for yuv420p


def test_audio_copied_and_trimmed(tmp_path):
    frames = read_frames(SAMPLE_PATH, start=12, count=24)
    out = write_video(tmp_path / "a.mp4", frames, FPS, audio_from=SAMPLE_PATH, audio_start=12 / 24,
                      audio_duration=24 / 24)
    info = probe(out)
    assert info.has_audio and info.audio_codec == "aac" and info.fps == FPS and info.frames == 24
    assert abs(audio_duration(out) - 1.0) < 0.05
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.sample_rate == 48000


def test_audio_reencoded_when_mp4_cannot_hold_it(tmp_path):
    src = tmp_path / "in.webm"
    with av.open(str(src), "w") as o:  # VP9 + Opus: Opus goes to AAC in the mp4
        v = o.add_stream("libvpx-vp9", rate=12)
        v.width, v.height, v.pix_fmt = 64, 64, "yuv420p"
        a = o.add_stream("libopus", rate=48000)
        a.layout = "stereo"
        for k in range(12):
            vf = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 10 * k, np.uint8), format="rgb24")
            vf.pts = k
            o.mux(v.encode(vf))
        o.mux(v.encode(None))
        t = np.arange(48000) / 48000
        tone = np.stack([np.sin(2 * np.pi * 330 * t)] * 2).astype(np.float32) * 0.2
        for s in range(0, 48000, 960):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, s:s + 960]), format="fltp", layout="stereo")
            af.sample_rate, af.pts = 48000, s
            o.mux(a.encode(af))
        o.mux(a.encode(None))
    info = probe(src)
    assert info.audio_codec == "opus" and info.frames == 12
    out = write_video(tmp_path / "out.mp4", read_frames(src), info.fps, audio_from=src)
    got = probe(out)
    assert got.has_audio and got.audio_codec == "aac" and got.fps == 12
    assert abs(audio_duration(out) - 1.0) < 0.1


def test_existing_and_missing_outputs(tmp_path):
    clip = smooth_clip(3)
    target = tmp_path / "v.mp4"
    target.write_bytes(b"keep me")
    with pytest.raises(TokenFlowError, match="already exists"):
        write_video(target, clip, Fraction(24), overwrite=False)
    assert target.read_bytes() == b"keep me"
    write_video(target, clip, Fraction(24), overwrite=True)
    assert probe(target).frames == 3
    with pytest.raises(TokenFlowError, match="does not exist"):
        write_video(tmp_path / "missing" / "v.mp4", clip, Fraction(24))
    assert leftovers(tmp_path) == []


def test_interrupted_write_leaves_nothing(tmp_path):
    clip = smooth_clip(8)

    def frames_then_interrupt():
        yield from clip[:4]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_video(tmp_path / "v.mp4", frames_then_interrupt(), Fraction(24), audio_from=SAMPLE_PATH)
    with pytest.raises(KeyboardInterrupt):
        write_png_frames(tmp_path / "frames", frames_then_interrupt())
    assert list(tmp_path.iterdir()) == []


def test_png_frames_and_side_by_side(tmp_path):
    clip = smooth_clip(5)
    d = write_png_frames(tmp_path / "frames", clip)
    names = sorted(os.listdir(d))
    assert names == [f"frame_{i:05d}.png" for i in range(5)]
    assert torch.equal(read_frames(d), clip)  # lossless
    sbs = torch.stack(list(side_by_side(clip, clip.flip(3))))
    assert sbs.shape == (5, 3, 64, 192) and torch.equal(sbs[..., 96:], clip.flip(3))
    assert leftovers(tmp_path) == []


def test_truncated_file_warns_when_the_selection_is_readable(tmp_path, caplog):
    """A cut file whose index is at the front: a selection in its readable part is read with a warning,
    one reaching past the cut is an error, the intact file says nothing."""
    cut = _truncated_faststart(tmp_path)
    intact = tmp_path / "faststart.mp4"
    with caplog.at_level("WARNING", logger="tokenflow"):
        assert read_frames(intact, count=3).shape[0] == 3
        assert caplog.text == ""
        assert torch.equal(read_frames(cut, count=3), read_frames(intact, count=3))
    assert "is damaged: its last frames are missing" in caplog.text and f"announces {N_FRAMES} frames" in caplog.text
    with pytest.raises(TokenFlowError, match="truncated"):
        read_frames(cut)


def test_frame_folder_takes_the_rate_of_its_video(tmp_path):
    frames = tmp_path / "clip"
    write_png_frames(frames, smooth_clip(3))
    assert probe(frames).fps == 24 and probe(frames).fps_from is None  # alone: the default
    write_video(tmp_path / "clip.mp4", smooth_clip(3), Fraction(30000, 1001))
    info = probe(frames)
    assert info.fps == Fraction(30000, 1001) and info.fps_from == tmp_path / "clip.mp4"
    with pytest.raises(TokenFlowError, match=r"input .*/cli does not exist; check the path"):
        probe(tmp_path / "cli")
    with pytest.raises(TokenFlowError, match=r"input .*/vid does not exist; did you mean .*/vid\.mp4\?"):
        (tmp_path / "vid.mp4").write_bytes((tmp_path / "clip.mp4").read_bytes())
        probe(tmp_path / "vid")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_full_disk_is_an_os_error_naming_the_file():
    """A full device fails the write (or the index written on close) with ENOSPC, as an OSError the
    caller can name and explain, not an FFmpeg error."""
    with pytest.raises(OSError) as e:
        from tokenflow.video import encode_video
        encode_video(Path("/dev/full"), smooth_clip(3), Fraction(24))
    assert e.value.errno == 28 and e.value.filename == "/dev/full" and not isinstance(e.value, av.FFmpegError)

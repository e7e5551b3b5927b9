"""The bundled sample clip, made procedurally, with its ground-truth motion.

Two textured objects (a striped disc and a checkered square) move over a textured background that
pans; a sine tone plays under it (AAC), so the quick start and the tests exercise the audio path.
Every position is a whole number of pixels, so the motion is known exactly: `motion()` gives each
layer's offset per frame and `flow(i)` the dense displacement from frame i to frame i + 1.

`make_sample(path)` is deterministic (seeded textures, fixed encoder settings); the committed
`tokenflow/assets/sample.mp4` was made with the defaults:  python -m tokenflow.sample
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

SAMPLE_PATH = Path(__file__).parent / "assets" / "sample.mp4"
WIDTH, HEIGHT = 512, 288
N_FRAMES = 48
FPS = Fraction(24)
PAN = 3  # background content moves PAN px left per frame (the camera pans right)
DISC_R = 40  # disc radius
SQUARE = 72  # square side
TONE_HZ = 440.0
SAMPLE_RATE = 48000


def sample_path() -> Path:
    return SAMPLE_PATH


@dataclass(frozen=True)
class Motion:
    """Integer positions per frame, in pixels of the WIDTH x HEIGHT clip."""

    background_x: np.ndarray  # [N] horizontal offset of the background texture (content at x shows texture x + offset)
    disc: np.ndarray  # [N, 2] disc centre (x, y)
    square: np.ndarray  # [N, 2] square top-left (x, y)


def motion(n_frames: int = N_FRAMES) -> Motion:
    i = np.arange(n_frames)
    bg = PAN * i
    # the disc crosses left to right and bobs; the square drifts right to left along a shallow arc
    disc = np.stack([60 + 8 * i, np.round(150 + 40 * np.sin(2 * math.pi * i / n_frames))], 1).astype(np.int64)
    square = np.stack([400 - 5 * i, np.round(40 + 30 * np.sin(math.pi * i / n_frames))], 1).astype(np.int64)
    return Motion(bg.astype(np.int64), disc, square)


def _textures(seed: int = 0):
    rng = np.random.default_rng(seed)
    # background: smooth colour blobs plus fine grain, wide enough for the whole pan
    bw = WIDTH + PAN * N_FRAMES + 8
    yy, xx = np.mgrid[0:HEIGHT, 0:bw].astype(np.float32)
    bg = np.zeros((HEIGHT, bw, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            fx, fy, ph = rng.uniform(0.005, 0.04), rng.uniform(0.005, 0.04), rng.uniform(0, 2 * math.pi)
            bg[..., c] += np.sin(xx * fx + yy * fy + ph)
    bg = 100 + 25 * bg
    bg += ((xx // 32 + yy // 32) % 2)[..., None] * 30  # a coarse tiling: trackable structure
    bg += rng.normal(0, 6, bg.shape)
    disc = np.zeros((2 * DISC_R, 2 * DISC_R, 3), np.float32)
    y, x = np.mgrid[-DISC_R:DISC_R, -DISC_R:DISC_R].astype(np.float32)
    stripes = (np.sin((x + y) * 0.5) > 0).astype(np.float32)
    disc[...] = np.stack([230 * stripes + 20, 60 + 120 * (1 - stripes), 40 * np.ones_like(x)], -1)
    disc_mask = (x + 0.5) ** 2 + (y + 0.5) ** 2 < DISC_R ** 2
    sy, sx = np.mgrid[0:SQUARE, 0:SQUARE]
    checks = ((sx // 12 + sy // 12) % 2).astype(np.float32)
    square = np.stack([30 + 40 * checks, 80 + 150 * checks, 220 - 60 * checks], -1)
    return np.clip(bg, 0, 255), disc, disc_mask, square


def _layers(m: Motion, i: int):
    """Label map [H, W]: 0 background, 1 disc, 2 square (the square is in front)."""
    lab = np.zeros((HEIGHT, WIDTH), np.int64)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    cx, cy = m.disc[i]
    lab[((xx - cx + 0.5) ** 2 + (yy - cy + 0.5) ** 2) < DISC_R ** 2] = 1
    sx, sy = m.square[i]
    lab[(xx >= sx) & (xx < sx + SQUARE) & (yy >= sy) & (yy < sy + SQUARE)] = 2
    return lab


def render(n_frames: int = N_FRAMES, seed: int = 0) -> torch.Tensor:
    """The clip's frames, uint8 [N, 3, HEIGHT, WIDTH]."""
    bg, disc, disc_mask, square = _textures(seed)
    m = motion(n_frames)
    frames = np.empty((n_frames, HEIGHT, WIDTH, 3), np.uint8)
    for i in range(n_frames):
        img = bg[:, m.background_x[i]:m.background_x[i] + WIDTH].copy()
        _paste(img, disc, disc_mask, m.disc[i][0] - DISC_R, m.disc[i][1] - DISC_R)
        _paste(img, square, None, *m.square[i])
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()


def _paste(img, sprite, mask, x0: int, y0: int) -> None:
    h, w = sprite.shape[:2]
    H, W = img.shape[:2]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if xa >= xb or ya >= yb:
        return
    s = sprite[ya - y0:yb - y0, xa - x0:xb - x0]
    if mask is None:
        img[ya:yb, xa:xb] = s
    else:
        mk = mask[ya - y0:yb - y0, xa - x0:xb - x0]
        img[ya:yb, xa:xb][mk] = s[mk]


def flow(i: int, n_frames: int = N_FRAMES) -> np.ndarray:
    """Ground-truth forward displacement (dx, dy) of every pixel of frame i to frame i + 1: [2, H, W]
    float32 (the layer visible at the pixel in frame i decides; occlusions are not marked)."""
    m = motion(n_frames)
    if not 0 <= i < n_frames - 1:
        raise ValueError(f"flow is defined for frames 0..{n_frames - 2}")
    lab = _layers(m, i)
    d = np.zeros((2, HEIGHT, WIDTH), np.float32)
    d[0][lab == 0] = -PAN
    for k, pos in ((1, m.disc), (2, m.square)):
        d[0][lab == k], d[1][lab == k] = pos[i + 1] - pos[i]
    return d


def tone(n_frames: int = N_FRAMES) -> np.ndarray:
    """The audio track: a sine tone with 10 ms fades, float32 [1, samples] at SAMPLE_RATE."""
    n = int(SAMPLE_RATE * n_frames / FPS)
    t = np.arange(n) / SAMPLE_RATE
    env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
    return (0.3 * env * np.sin(2 * math.pi * TONE_HZ * t)).astype(np.float32)[None]


def make_sample(path: str | Path = SAMPLE_PATH, *, n_frames: int = N_FRAMES, seed: int = 0, crf: int = 20) -> Path:
    """Render and encode the sample clip (H.264 + AAC mp4) to `path` (atomically)."""
    import av

    from tokenflow.video import atomic_output

    path = Path(path)
    frames = render(n_frames, seed)
    audio = tone(n_frames)
    with atomic_output(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            out.metadata.clear()
            v = out.add_stream("libx264", rate=FPS)
            v.width, v.height, v.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            v.time_base = 1 / FPS
            # one thread: x264 output then does not depend on the machine's core count
            v.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
            a = out.add_stream("aac", rate=SAMPLE_RATE)
            a.layout = "mono"
            a.bit_rate = 64_000
            for i, f in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(f.permute(1, 2, 0).numpy(), format="rgb24")
                vf.pts = i
                out.mux(v.encode(vf))
            out.mux(v.encode(None))
            step = 1024  # AAC frame size
            for s in range(0, audio.shape[1], step):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, s:s + step]), format="fltp", layout="mono")
                af.sample_rate = SAMPLE_RATE
                af.pts = s
                af.time_base = Fraction(1, SAMPLE_RATE)
                out.mux(a.encode(af))
            out.mux(a.encode(None))
    return path


if __name__ == "__main__":
    p = make_sample()
    print(f"wrote {p} ({p.stat().st_size / 1e3:.0f} kB)")

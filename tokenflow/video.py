"""Video in and out with PyAV (its wheels bundle FFmpeg: no system ffmpeg needed).

In: `probe` a video file or a folder of image frames, `read_frames` decodes only the selected frames
(streamed: nothing beyond the selection is kept) and resizes each one as it arrives, so a long or
large video never sits in memory at full size.
Out: `write_video` (H.264 mp4 at the input's exact rational frame rate, the input's audio copied),
`write_png_frames`, `side_by_side`. Every output is written under a temporary name in its target
directory and renamed when complete, so an interrupted or failed write leaves nothing behind.

Frames are torch.uint8 [N, 3, H, W] (RGB) throughout, as the engine takes them.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np
import torch
from PIL import Image

from tokenflow.errors import TokenFlowError
from tokenflow.progress import bar

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
log = logging.getLogger("tokenflow")
DEFAULT_FOLDER_FPS = Fraction(24)  # a folder of frames has no rate of its own; the CLI's --fps overrides
DEFAULT_LONG_SIDE = 512  # the resolution SD 1.x/2.x-base were trained at
# Audio codecs an mp4 holds as they are (copied packet for packet); anything else is re-encoded to AAC.
MP4_AUDIO = {"aac", "mp3", "alac", "ac3", "eac3"}


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    frames: int  # frames in the file (counted by demuxing when the container does not say)
    fps: Fraction  # exact rational rate, e.g. 30000/1001
    width: int
    height: int
    has_audio: bool
    audio_codec: str | None = None
    is_folder: bool = False
    codec: str | None = None
    fps_from: Path | None = None  # a folder of frames: the video of the same name beside it that gave `fps`


# -- input -------------------------------------------------------------------------------------------

def _natural_key(name: str):
    # frame_2.png before frame_10.png
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                  key=lambda p: _natural_key(p.name))


@contextmanager
def _open(path: Path):
    """av.open with every FFmpeg failure turned into a one-line TokenFlowError."""
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise TokenFlowError(f"{path} is not a readable video: FFmpeg says '{_why(e)}' (the file is damaged, "
                             f"truncated or not a video); give an mp4/mov/webm/mkv/gif file or a folder of "
                             f"image frames") from None
    try:
        yield container
    finally:
        container.close()


def _why(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return msg.splitlines()[0] if msg else type(e).__name__


def videos_named_like(path: Path) -> list[Path]:
    """Videos beside `path` with its name and a video suffix: `data/wolf` -> `data/wolf.mp4`. (The
    reference's preprocessing extracted data/wolf.mp4 into the frame folder data/wolf.)"""
    return [v for v in (path.with_name(path.name + sfx) for sfx in VIDEO_SUFFIXES) if v.is_file()]


def probe(path: str | os.PathLike) -> VideoInfo:
    """What `path` (a video file or a folder of frames) holds, without decoding it. A folder of frames
    takes the frame rate of a video of the same name beside it (`data/wolf/` and `data/wolf.mp4`), else 24."""
    path = Path(path)
    if not path.exists():
        like = videos_named_like(path)
        hint = f"did you mean {like[0]}?" if like else "check the path (or use `sample` for the bundled clip)"
        raise TokenFlowError(f"input {path} does not exist; {hint}")
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise TokenFlowError(f"folder {path} has no image frames ({', '.join(IMAGE_SUFFIXES)})")
        try:
            with Image.open(files[0]) as im:
                w, h = im.size
        except OSError as e:
            raise TokenFlowError(f"{files[0]} is not a readable image ({_why(e)})") from None
        fps, source = DEFAULT_FOLDER_FPS, None
        for video in videos_named_like(path):
            try:  # its rate only: the header, not a count of its packets
                with _open(video) as c:
                    if c.streams.video:
                        fps, source = _rate(c.streams.video[0]), video
                        break
            except TokenFlowError:  # an unreadable neighbour does not make the frames unreadable
                continue
        return VideoInfo(path, len(files), fps, w, h, False, is_folder=True, fps_from=source)
    if path.stat().st_size == 0:
        raise TokenFlowError(f"{path} is empty (0 bytes); give a video file")
    with _open(path) as c:
        if not c.streams.video:
            raise TokenFlowError(f"{path} has no video stream; give a video file or a folder of frames")
        s = c.streams.video[0]
        fps = _rate(s)
        n = s.frames
        if not n:  # webm/gif/mkv often do not store a count: count packets (no decoding)
            try:
                n = sum(1 for p in c.demux(s) if p.size)
            except av.FFmpegError as e:
                raise TokenFlowError(f"{path} is damaged ({_why(e)})") from None
        if n == 0:
            raise TokenFlowError(f"{path} has no video frames")
        a = c.streams.audio[0] if c.streams.audio else None
        return VideoInfo(path, int(n), fps, s.codec_context.width, s.codec_context.height, a is not None,
                         a.codec_context.name if a is not None else None, False, s.codec_context.name)


def _rate(stream) -> Fraction:
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(fps) if fps else DEFAULT_FOLDER_FPS


@dataclass(frozen=True)
class Resize:
    """How each frame is brought to the processing size. `via`: an intermediate stretch first (the
    reference's two resizes of square inputs, see `resize_for`)."""

    width: int
    height: int
    policy: str = "crop"  # crop | pad | stretch
    via: tuple[int, int] | None = None


def _mult8(x: float, how: str) -> int:
    f = {"floor": math.floor, "ceil": math.ceil, "round": round}[how]
    return max(8, int(f(x / 8)) * 8)


def resize_for(src_w: int, src_h: int, *, width: int | None = None, height: int | None = None,
               resize: str = "crop", match_reference: bool = False, long_side: int = DEFAULT_LONG_SIDE) -> Resize:
    """The processing size and policy for a src_w x src_h input (the EditConfig keys of the same names).

    Default: aspect ratio kept, longer side `long_side` (512; SDXL: 1024) or the given width/height,
    multiples of 8. When the
    aspect ratio does not fit the multiple-of-8 grid exactly, `crop` rounds the size down and cuts the
    excess, `pad` rounds it up and adds black borders, `stretch` rounds to the nearest and distorts.
    With width AND height given, the frame goes to exactly that size by the policy.
    `match_reference`: exactly the reference: frames stretched (Lanczos) to width x height (default
    512 x 512), and a square result stretched again to 512 x 512.
    """
    if match_reference:
        W, H = width or 512, height or 512
        if W == H and W != 512:  # the reference resized square frames to 512 after extracting them at W x H
            return Resize(512, 512, "stretch", via=(W, H))
        return Resize(W, H, "stretch")
    how = {"crop": "floor", "pad": "ceil", "stretch": "round"}[resize]
    if width and height:
        return Resize(width, height, resize)
    if width:
        return Resize(width, _mult8(width * src_h / src_w, how), resize)
    if height:
        return Resize(_mult8(height * src_w / src_h, how), height, resize)
    scale = long_side / max(src_w, src_h)
    return Resize(_mult8(src_w * scale, how), _mult8(src_h * scale, how), resize)


def _scaled_size(w: int, h: int, W: int, H: int, policy: str) -> tuple[int, int]:
    """crop/pad: the size a w x h frame is scaled to before it is cut to, or centred in, W x H."""
    # crop covers the target and cuts the centre out; pad fits inside it and adds black borders
    s = max(W / w, H / h) if policy == "crop" else min(W / w, H / h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    if policy == "crop":
        return max(nw, W), max(nh, H)
    return min(nw, W), min(nh, H)


def _resize_image(im: Image.Image, W: int, H: int, policy: str) -> Image.Image:
    w, h = im.size
    if (w, h) == (W, H):
        return im
    if policy == "stretch":
        return im.resize((W, H), Image.Resampling.LANCZOS)
    nw, nh = _scaled_size(w, h, W, H, policy)
    im = im.resize((nw, nh), Image.Resampling.LANCZOS) if (nw, nh) != (w, h) else im
    if policy == "crop":
        x, y = (nw - W) // 2, (nh - H) // 2
        return im.crop((x, y, x + W, y + H))
    canvas = Image.new("RGB", (W, H))
    canvas.paste(im, ((W - nw) // 2, (H - nh) // 2))
    return canvas


def restore_size(frames: torch.Tensor, resize: Resize, src_w: int, src_h: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] at the processing size of `resize` -> [N, 3, src_h, src_w], aligned pixel for pixel
    with the source frames `resize` was applied to: stretched back, or the pad borders cut off first.
    `crop` cannot be undone (the borders it cut are gone): a TokenFlowError says so."""
    if resize.policy == "crop" and (resize.width, resize.height) != (src_w, src_h):
        raise TokenFlowError("frames resized with `crop` cannot be mapped back onto the source: the cut borders "
                             "are gone; use resize stretch or pad")
    box = None  # the padded picture inside the frame, the same for every frame
    if resize.policy == "pad" and resize.via is None:
        nw, nh = _scaled_size(src_w, src_h, resize.width, resize.height, "pad")
        x, y = (resize.width - nw) // 2, (resize.height - nh) // 2
        box = (x, y, x + nw, y + nh)
    out = []
    for f in frames:
        im = _to_image(f)
        if box is not None:
            im = im.crop(box)
        if im.size != (src_w, src_h):
            im = im.resize((src_w, src_h), Image.Resampling.LANCZOS)
        out.append(_to_tensor(im))
    return torch.stack(out) if out else frames.new_zeros((0, 3, src_h, src_w))


def _apply(im: Image.Image, r: Resize | None) -> Image.Image:
    if r is None:
        return im
    if r.via is not None:
        im = _resize_image(im, *r.via, "stretch")
    return _resize_image(im, r.width, r.height, r.policy)


def resize_frames(frames: torch.Tensor, W: int, H: int, policy: str = "crop") -> torch.Tensor:
    """uint8 [N, 3, h, w] -> uint8 [N, 3, H, W] by `policy` (crop | pad | stretch), Lanczos."""
    if policy not in ("crop", "pad", "stretch"):
        raise TokenFlowError(f"resize policy {policy!r} is not one of crop, pad, stretch")
    out = [_to_tensor(_resize_image(_to_image(f), W, H, policy)) for f in frames]
    return torch.stack(out) if out else frames.new_zeros((0, 3, H, W))


def _to_image(frame: torch.Tensor) -> Image.Image:
    return Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy())


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def _selected(start: int, count: int | None, stride: int, total: int | None) -> int | None:
    if start < 0 or stride < 1 or (count is not None and count < 1):
        raise TokenFlowError(f"bad frame selection start={start} count={count} stride={stride}: "
                             f"start must be >= 0, count and stride >= 1")
    if total is None:
        return count
    avail = max(0, math.ceil((total - start) / stride))
    return avail if count is None else min(count, avail)


def count_selected(info: VideoInfo, start: int = 0, count: int | None = None, stride: int = 1) -> int:
    """How many frames the selection start, start+stride, ... (at most `count`) takes from `info`; none
    is an error naming the fix."""
    n = _selected(start, count, stride, info.frames)
    if n == 0:
        raise TokenFlowError(f"no frames selected: {info.path} has {info.frames} frames and the selection starts "
                             f"at frame {start}; lower --start (at most {info.frames - 1})")
    return n


def read_frames(path: str | os.PathLike, *, start: int = 0, count: int | None = None, stride: int = 1,
                resize: Resize | None = None, progress: bool = False) -> torch.Tensor:
    """Frames start, start+stride, ... (at most `count`) of a video file or folder of frames,
    as uint8 [N, 3, H, W] RGB, each resized by `resize` as it is decoded (None: native size).

    Decoding stops after the last selected frame; only selected frames are kept. A file whose end is
    missing (truncated) is an error when the selection reaches into the missing part, else a warning."""
    info = probe(path)
    n = count_selected(info, start, count, stride)
    out: list[torch.Tensor] = []
    with bar(desc="reading frames", enabled=progress, total=n, unit="frame") as pb:
        for im in _images(info, start, n, stride):
            out.append(_to_tensor(_apply(im, resize)))
            pb.update()
    if not out:
        raise TokenFlowError(f"{info.path} has no decodable frames in the selection")
    return torch.stack(out)


def _images(info: VideoInfo, start: int, n: int, stride: int) -> Iterator[Image.Image]:
    if info.is_folder:
        for p in image_files(info.path)[start::stride][:n]:
            try:
                with Image.open(p) as im:
                    yield im.convert("RGB")
            except OSError as e:
                raise TokenFlowError(f"{p} is not a readable image ({_why(e)})") from None
        return
    with _open(info.path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"  # frame-threaded decoding
        announced = s.frames  # 0 when the container does not say
        i = kept = 0
        try:
            for frame in c.decode(s):
                if i >= start and (i - start) % stride == 0:
                    yield frame.to_image()
                    kept += 1
                    if kept == n:
                        if announced and i + 1 < announced and tail_missing(info):
                            log.warning("%s is damaged: its last frames are missing (the file looks truncated; "
                                        "its index announces %d frames). The %d selected frames are readable, "
                                        "so they are used; re-export the file to use the rest", info.path,
                                        announced, n)
                        return
                i += 1
        except av.FFmpegError as e:
            raise TokenFlowError(f"{info.path} could not be decoded after {i} frames ({_why(e)}): "
                                 f"the file is damaged or truncated; re-export it") from None
    if kept < n and announced:  # the container promised frames the file does not hold
        # A frame or two short happens in intact files (edit lists, encoder priming); more is a cut file.
        if announced - i > max(2, announced // 100):
            raise TokenFlowError(f"{info.path} ended after {i} of {info.frames} frames: the file looks truncated; "
                                 f"re-export it")
        log.warning("%s: %d frames decoded where the container announced %d", info.path, i, announced)


def tail_missing(info: VideoInfo) -> bool:
    """Whether the video's last packet is gone (a cut file whose index, at its front, still lists it):
    a seek to the end of the stream finds no data. Costs one seek, not a decode of the rest."""
    try:
        with av.open(str(info.path), metadata_errors="ignore") as c:
            s = c.streams.video[0]
            if not s.duration:
                return False  # no duration to seek to: the container cannot say
            c.seek((s.start_time or 0) + s.duration, stream=s, backward=True, any_frame=True)
            return not any(p.size for p in c.demux(s))
    except av.FFmpegError:
        return True


# -- output ------------------------------------------------------------------------------------------

def check_output(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Raise unless `path` can be written: its directory exists and, without overwrite, it does not."""
    path = Path(path)
    if not path.parent.is_dir():
        raise TokenFlowError(f"output directory {path.parent} does not exist; create it or choose another "
                             f"output path")
    if path.exists() and not overwrite:
        raise TokenFlowError(f"{path} already exists; pass --overwrite to replace it or choose another output path")
    if path.is_dir() and path.suffix:
        raise TokenFlowError(f"{path} is a folder; give a file path for the output")
    return path


def check_writable(folder: str | os.PathLike) -> None:
    """Raise unless a file can be created in `folder` (tried for real: permission bits do not tell about a
    read-only mount, and root ignores them)."""
    folder = Path(folder)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tokenflow-write-check.")
    except OSError as e:
        raise TokenFlowError(f"cannot write to the output folder {folder} ({e.strerror}); make it writable or "
                             f"choose another output path (-o)") from None
    os.close(fd)
    os.unlink(tmp)


def temp_path(path: Path, *, directory: bool = False) -> Path:
    """A fresh hidden name next to `path` (same filesystem, so the final rename is atomic)."""
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; outputs get the usual permissions
        return tmp
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def commit(tmp: Path, path: Path) -> None:
    """Move a finished temporary file or folder to its final name (replacing what is there)."""
    if tmp.is_dir():
        if path.exists():  # os.replace cannot replace a non-empty folder: move the old one aside first
            old = temp_path(path, directory=True)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
    else:
        os.replace(tmp, path)


@contextmanager
def atomic_output(path: str | os.PathLike, *, directory: bool = False):
    """Yield a temporary path next to `path`; rename it to `path` on success, remove it on any failure
    (KeyboardInterrupt included)."""
    path = Path(path)
    tmp = temp_path(path, directory=directory)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    commit(tmp, path)


def _frame_iter(frames) -> Iterator[torch.Tensor]:
    """One uint8 [3, H, W] at a time from a tensor [N, 3, H, W] or an iterable of [3, H, W] / [n, 3, H, W]."""
    if isinstance(frames, torch.Tensor) and frames.dim() == 3:
        frames = [frames]
    for chunk in frames:
        if chunk.dim() == 3:
            yield chunk
        else:
            yield from chunk


def encode_video(path: Path, frames, fps: Fraction, *, audio_from: str | os.PathLike | None = None,
                 audio_start: float = 0.0, audio_duration: float | None = None, crf: int = 18,
                 total: int | None = None, progress: bool = False) -> int:
    """Write H.264 (yuv420p) mp4 to `path` directly (no temporary name; see `write_video`).

    The audio of `audio_from` between audio_start and audio_start + audio_duration seconds (None: to
    the end of the video written) is copied, or re-encoded to AAC when mp4 cannot hold its codec.
    Returns the number of frames written."""
    fps = Fraction(fps)
    out = av.open(str(path), mode="w", format="mp4")
    src = None
    closed = False
    try:
        v = None
        audio = None
        n = 0
        with bar(desc="writing video", enabled=progress, total=total, unit="frame") as pb:
            for f in _frame_iter(frames):
                if f.dtype != torch.uint8 or f.shape[0] != 3:
                    raise TokenFlowError(f"frames must be uint8 [3, H, W]; got {f.dtype} {tuple(f.shape)}")
                if v is None:
                    v = out.add_stream("libx264", rate=fps)
                    H, W = f.shape[1:]
                    # yuv420p needs even sizes: pad odd ones by one pixel (edge-replicated)
                    v.width, v.height = W + W % 2, H + H % 2
                    v.pix_fmt = "yuv420p"
                    v.time_base = 1 / fps
                    v.options = {"crf": str(crf), "preset": "medium"}
                    if audio_from is not None:
                        src = _open_audio(Path(audio_from))
                        if src is not None:
                            audio = _AudioCopy(src, out, audio_start, audio_duration)
                if f.shape[1] != v.height or f.shape[2] != v.width:
                    f = torch.nn.functional.pad(f[None].float(), (0, v.width - f.shape[2], 0, v.height - f.shape[1]),
                                                mode="replicate")[0].to(torch.uint8)
                frame = av.VideoFrame.from_ndarray(f.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
                frame.pts = n
                out.mux(v.encode(frame))
                n += 1
                if audio is not None:  # interleave: audio up to the video time written so far
                    audio.mux_until(float(n / fps))
                pb.update()
        if v is None:
            raise TokenFlowError("no frames to write")
        out.mux(v.encode(None))
        if audio is not None:
            audio.mux_until(float(n / fps) if audio_duration is None else audio_duration, final=True)
        closed = True
        out.close()  # writes the index: a full disk may only show here
        return n
    except av.FFmpegError as e:
        if isinstance(e, OSError) and e.errno:  # the disk, not the data: the caller names the output and the fix
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from None
        raise TokenFlowError(f"could not write {path} ({_why(e)})") from None
    finally:
        if not closed:
            try:
                out.close()
            except av.FFmpegError:
                pass  # the error that got here is the one to report
        if src is not None:
            src.close()


def _open_audio(path: Path):
    if path.is_dir():
        return None
    c = av.open(str(path), metadata_errors="ignore")
    if not c.streams.audio:
        c.close()
        return None
    return c


class _AudioCopy:
    """Moves the first audio stream of `src` into `out` from `start` seconds on, rebased to 0: packets
    copied as they are when mp4 holds the codec, else decoded and re-encoded to AAC. Cut at packet
    (or decoded-frame) granularity, about 20 ms for AAC."""

    def __init__(self, src, out, start: float, duration: float | None):
        self.a = src.streams.audio[0]
        self.start = start
        self.duration = duration
        self.copy = self.a.codec_context.name in MP4_AUDIO
        if self.copy:
            self.o = out.add_stream_from_template(self.a)
        else:
            rate = self.a.codec_context.sample_rate or 48000
            self.o = out.add_stream("aac", rate=rate)
            self.o.layout = self.a.codec_context.layout.name if self.a.codec_context.layout else "stereo"
            self.o.bit_rate = 160_000
            self.resampler = av.AudioResampler(format="fltp", layout=self.o.layout, rate=rate)
            self.next_pts = 0
        self.out = out
        self.items = self._items(src)
        self.pending = None
        self.done = False

    def _items(self, src):
        # (time relative to start, packet-or-frame), in order
        source = src.demux(self.a) if self.copy else src.decode(self.a)
        try:
            for item in source:
                if item.pts is None or (self.copy and not item.size):
                    continue
                t = float(item.pts * self.a.time_base) - self.start
                if t < -1e-3:
                    continue
                yield t, item
        except av.FFmpegError:
            return  # damaged audio tail: keep what was read

    def mux_until(self, t_end: float, *, final: bool = False) -> None:
        limit = t_end if self.duration is None else min(t_end, self.duration)
        while not self.done:
            if self.pending is None:
                self.pending = next(self.items, None)
                if self.pending is None:
                    self.done = True
                    break
            t, item = self.pending
            if t >= limit - 1e-6:
                if final:
                    self.done = True
                break
            self.pending = None
            self._mux(t, item)
        if final and not self.copy:
            self.out.mux(self.o.encode(None))

    def _mux(self, t: float, item) -> None:
        if self.copy:
            shift = round(self.start / self.a.time_base)
            item.pts -= shift
            if item.dts is not None:
                item.dts -= shift
            item.stream = self.o
            self.out.mux(item)
            return
        for fr in self.resampler.resample(item):
            fr.pts = self.next_pts
            fr.time_base = Fraction(1, self.o.rate)
            self.next_pts += fr.samples
            self.out.mux(self.o.encode(fr))


def write_video(path: str | os.PathLike, frames, fps: Fraction, *, audio_from: str | os.PathLike | None = None,
                audio_start: float = 0.0, audio_duration: float | None = None, crf: int = 18,
                overwrite: bool = True, progress: bool = False) -> Path:
    """H.264 mp4 at the exact rational `fps` with the audio of `audio_from` (see `encode_video`), written
    to a temporary name in the same folder and renamed when complete. `frames`: uint8 [N, 3, H, W] or an
    iterable of [3, H, W] / [n, 3, H, W] chunks."""
    path = check_output(path, overwrite=overwrite)
    total = len(frames) if isinstance(frames, torch.Tensor) else None
    with atomic_output(path) as tmp:
        encode_video(tmp, frames, fps, audio_from=audio_from, audio_start=audio_start,
                     audio_duration=audio_duration, crf=crf, total=total, progress=progress)
    return path


def save_png_frames(folder: Path, frames) -> int:
    """frame_00000.png, ... into an existing folder; returns the count."""
    n = 0
    for f in _frame_iter(frames):
        _to_image(f).save(folder / f"frame_{n:05d}.png")
        n += 1
    return n


def write_png_frames(folder: str | os.PathLike, frames, *, overwrite: bool = True) -> Path:
    """Frames as frame_00000.png, ... in `folder`, written into a temporary folder then renamed."""
    folder = check_output(folder, overwrite=overwrite)
    with atomic_output(folder, directory=True) as tmp:
        save_png_frames(tmp, frames)
    return folder


def side_by_side(left: Iterable[torch.Tensor], right: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """(input | edit) frames, uint8 [3, H, W1 + W2], one at a time (heights must match)."""
    for a, b in zip(_frame_iter(left), _frame_iter(right)):
        if a.shape[1] != b.shape[1]:
            raise TokenFlowError(f"side-by-side needs equal heights; got {a.shape[1]} and {b.shape[1]}")
        yield torch.cat([a, b], dim=2)

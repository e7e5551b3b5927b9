"""Where each suite's evaluation code reads a method's output, and writing it there.

- plain: `ROOT/<name>.mp4` + `ROOT/<name>.yaml`, exactly as a single edit writes them.
- fivebench: `ROOT/<video_name>/<save_dir>/img_ode/00000.png ...` + `config.yaml` beside `img_ode`; read by
  FiVE-Bench's `evaluation/evaluate.py` with TokenFlow's entry (ROOT, "img_ode").
- v2vbench: `ROOT/<video_id>/<edit index>/00000.png ...` + `<edit index>.yaml` beside it; read by
  `EvaluatorWrapper.evaluate(edit_video=ROOT, ...)`.
- loveu: `ROOT/<subset>/<video>/<style|object|background|multiple>/00000.jpg ...` + `<edit>.yaml` beside it: the
  submission tree of `scripts/run_eval.py --submission_path ROOT`.

The suites compare the edit with the source frame by frame (FiVE-Bench's background PSNR/SSIM, V2VBench's
motion alignment), so their frames are written at the source's size, mapped back onto it pixel for pixel
(`tokenflow.video.restore_size`: stretched back, pad borders cut off), one per edited frame from the first.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tokenflow.outputs import Outputs, Staging, config_text, write_outputs

LAYOUTS = ("plain", "fivebench", "v2vbench", "loveu")
JPEG = {"quality": 95, "subsampling": 0}  # LOVEU-TGVE takes .jpg: full-resolution chroma keeps edges clean


@dataclass
class Written:
    """What `write` needs beyond the edited frames."""

    cfg: object  # EditConfig
    sel: dict  # first_frame, stride, fps (None: the video's own)
    info: object  # VideoInfo of the source
    src: Path
    fps: object  # Fraction: the source's rate
    resize: object  # video.Resize the frames were processed with
    timings: dict
    crf: int
    quiet: bool


class Layout:
    name = "plain"
    keys: tuple[str, ...] = ("name",)
    frame_aligned = False  # frames mapped back onto the source's size

    def paths(self, root: Path, a: dict) -> list[Path]:
        """The final files and folders one item writes."""
        return [root / f"{a['name']}.mp4", root / f"{a['name']}.yaml"]

    def write(self, root: Path, a: dict, edited, w: Written) -> list[Path]:
        video, _ = self.paths(root, a)
        video.parent.mkdir(parents=True, exist_ok=True)
        out = Outputs(video, png=False, side_by_side=False)
        size = (edited.shape[3], edited.shape[2])
        sel = {**w.sel, "input": str(w.src)}
        write_outputs(out, edited, None, w.cfg, sel, w.info, w.src, w.fps, size, w.crf, w.timings, w.quiet)
        return out.paths()


class FrameLayout(Layout):
    """Frame folders at the source's size plus a side YAML, staged and renamed together."""

    frame_aligned = True
    suffix = ".png"

    def folder(self, root: Path, a: dict) -> Path:
        raise NotImplementedError

    def config(self, root: Path, a: dict) -> Path:
        raise NotImplementedError

    def paths(self, root: Path, a: dict) -> list[Path]:
        return [self.folder(root, a), self.config(root, a)]

    def write(self, root: Path, a: dict, edited, w: Written) -> list[Path]:
        from tokenflow.video import restore_size
        folder, config = self.paths(root, a)
        folder.parent.mkdir(parents=True, exist_ok=True)
        config.parent.mkdir(parents=True, exist_ok=True)
        frames = restore_size(edited, w.resize, w.info.width, w.info.height)
        staged = Staging()
        try:
            tmp = staged.stage(folder, directory=True)
            for i, f in enumerate(frames):
                im = Image.fromarray(f.permute(1, 2, 0).contiguous().numpy())
                im.save(tmp / f"{i:05d}{self.suffix}", **(JPEG if self.suffix == ".jpg" else {}))
            size = (edited.shape[3], edited.shape[2])
            out_fps = w.fps / w.sel["stride"]
            staged.stage(config).write_text(config_text(w.cfg, w.sel, str(w.src.resolve()), size, len(edited), out_fps,
                                                        w.timings, str(folder.relative_to(root)), config.name))
            staged.commit()
        except BaseException:
            staged.discard()
            raise
        return [folder, config]


class FiveBench(FrameLayout):
    # TokenFlow's entry in FiVE-Bench's evaluate.py: (ROOT, "img_ode"), read from <video_name>/<save_dir>/img_ode
    name = "fivebench"
    keys = ("video_name", "save_dir")

    def folder(self, root, a):
        return root / a["video_name"] / a["save_dir"] / "img_ode"

    def config(self, root, a):
        return root / a["video_name"] / a["save_dir"] / "config.yaml"


class V2VBench(FrameLayout):
    # V2VBench reads <edit_video>/<video_id>/<edit index> (a folder of frames, or that name + .mp4/.gif)
    name = "v2vbench"
    keys = ("video_id", "edit_id")

    def folder(self, root, a):
        return root / a["video_id"] / str(a["edit_id"])

    def config(self, root, a):
        return root / a["video_id"] / f"{a['edit_id']}.yaml"


class Loveu(FrameLayout):
    # the LOVEU-TGVE 2023 submission tree: <subset>/<video>/<edit type>/00000.jpg
    name = "loveu"
    keys = ("subset", "video", "edit")
    suffix = ".jpg"

    def folder(self, root, a):
        return root / a["subset"] / a["video"] / a["edit"]

    def config(self, root, a):
        return root / a["subset"] / a["video"] / f"{a['edit']}.yaml"


def get(name: str) -> Layout:
    return {"plain": Layout, "fivebench": FiveBench, "v2vbench": V2VBench, "loveu": Loveu}[name]()

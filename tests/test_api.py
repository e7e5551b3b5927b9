"""The README's Python API example, on the bundled sample and the tiny model."""
import torch

from tokenflow import EditConfig, TokenFlowEditor
from tokenflow.sample import sample_path
from tokenflow.video import plan_resize, probe, read_frames


def test_readme_api_example(tmp_path):
    cfg = EditConfig(prompt="a marble sculpture", model="tiny-random", width=96, height=64, n_frames=6,
                     batch_size=4, n_inversion_steps=4, n_timesteps=2, cache_dir=str(tmp_path))
    editor = TokenFlowEditor.from_config(cfg)
    info = probe(sample_path())
    frames = read_frames(info.path, count=6, resize=plan_resize(info.width, info.height, cfg))
    assert frames.shape == (6, 3, 64, 96) and frames.dtype == torch.uint8
    inv = editor.invert(frames, cfg, progress=False)
    result = editor.edit(frames, cfg, inversion=inv, progress=False)
    assert result.frames.shape == frames.shape and set(result.timings) >= {"edit", "decode"}

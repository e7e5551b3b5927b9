"""The README's Python API example, on the bundled sample and the tiny model."""
import torch

from tokenflow import EditConfig, TokenFlowEditor
from tokenflow.inversion import decode_latents
from tokenflow.sample import sample_path
from tokenflow.video import probe, read_frames, resize_for


def test_readme_api_example(tmp_path):
    cfg = EditConfig(prompt="a marble sculpture", model="tiny-random", width=96, height=64, n_frames=6,
                     batch_size=4, n_inversion_steps=4, n_timesteps=2, cache_dir=str(tmp_path))
    editor = TokenFlowEditor.from_config(cfg)
    info = probe(sample_path())
    frames = read_frames(info.path, count=6, resize=resize_for(info.width, info.height, width=96, height=64))
    assert frames.shape == (6, 3, 64, 96) and frames.dtype == torch.uint8
    inv = editor.invert(frames, cfg, progress=False)
    assert inv.path.parent == tmp_path  # in the given cache_dir
    result = editor.edit(frames, cfg, inversion=inv, progress=False)
    assert result.frames.shape == frames.shape and set(result.timings) >= {"edit", "decode"}
    # The frames are the decoded latents, and the resolved-job path gives the same edit as the frames path.
    assert torch.equal(result.frames, torch.cat(list(decode_latents(editor.models, result.latents, 8))))
    job = editor.prepare(frames, cfg)
    again = editor.edit(job, progress=False)
    assert again.inversion_reused and torch.equal(again.frames, result.frames)
    assert again.memory_plan == result.memory_plan == job.memory  # nothing had to shrink on the CPU

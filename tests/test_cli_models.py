"""`tokenflow-edit` with ControlNets and SDXL, run for real in a subprocess (tiny random models)."""
from __future__ import annotations

import pytest
import torch
import yaml

from tokenflow.sample import SAMPLE_PATH
from tokenflow.video import probe, read_frames
from test_cli import SCRIPT, TINY, cli, visible

pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed (pip install -e .)")


def errors(r):
    return [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("!!!") and "WARNING" not in line]


def test_two_controlnets_with_a_condition_video_and_the_written_config(tmp_path):
    """Two ControlNets from comma lists; the second's maps come from a folder of condition frames, read with the
    input's selection (--start 2 --stride 2). The folder holds the canny maps of every input frame, so the edit
    must equal the one whose second ControlNet makes canny maps itself. The side YAML holds the lists and reruns
    the edit."""
    from PIL import Image

    from tokenflow.control_maps import canny
    from tokenflow.video import resize_for

    info = probe(SAMPLE_PATH)
    maps = tmp_path / "maps"
    maps.mkdir()
    for i, m in enumerate(canny(read_frames(SAMPLE_PATH, count=12, resize=resize_for(
            info.width, info.height, width=64, height=64)))):
        Image.fromarray(m.permute(1, 2, 0).numpy()).save(maps / f"{i}.png")
    args = ["sample", "--prompt", "a red car", *TINY, "--mode", "controlnet", "--controlnet", "tiny-random,tiny-random",
            "--controlnet-conditioning-scale", "0.5,1.0", "--control-guidance-end", "0.5", "--frames", "4",
            "--start", "2", "--stride", "2", "--png", "-q"]
    r = cli(*args, "--control", "canny,canny", "-o", "made.mp4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli(*args, "--control", "canny,maps", "-o", "given.mp4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load((tmp_path / "given.yaml").read_text())
    assert cfg["controlnet"] == ["tiny-random", "tiny-random"] and cfg["control"] == ["canny", "maps"]
    assert cfg["controlnet_conditioning_scale"] == [0.5, 1.0] and cfg["control_guidance_end"] == 0.5
    assert probe(tmp_path / "given.mp4").frames == 4
    r = cli("--config", "given.yaml", "-o", "again.mp4", "--png", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    given = read_frames(tmp_path / "given_frames")
    assert torch.equal(read_frames(tmp_path / "again_frames"), given)
    assert torch.equal(read_frames(tmp_path / "made_frames"), given)  # a fresh and a stored inversion edit alike


@pytest.mark.parametrize("args, words", [
    (["--controlnet", "tiny-random"], "controlnet is set but mode is 'pnp'"),
    (["--mode", "controlnet", "--controlnet", "tiny-random", "--control-guidance-start", "0.9",
      "--control-guidance-end", "0.5"], "flag --control-guidance-start"),
    (["--mode", "controlnet", "--controlnet", "tiny-random", "--control", "canny,depth"], "control has 2 entries"),
    (["--mode", "controlnet", "--controlnet", "tiny-random", "--control", "missing.mp4"], "missing.mp4"),
    (["--mode", "controlnet", "--controlnet", "tiny-random", "--controlnet-conditioning-scale", "big"],
     "--controlnet-conditioning-scale"),
    (["--mode", "controlnet", "--controlnet", "nobody/someones-canny"], "hf download nobody/someones-canny"),
])
def test_bad_controlnet_settings_exit_2_with_one_line(tmp_path, args, words):
    r = cli("sample", "--prompt", "x", *TINY, *args, "-q", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = errors(r)
    assert len(lines) == 1 and lines[0].startswith("tokenflow-edit: error: ") and words in lines[0], r.stderr
    assert visible(tmp_path) == []


def test_a_controlnet_for_another_family_fails_before_any_work(tmp_path):
    from tokenflow.models import load_models
    from tokenflow.tiny import build_tiny_controlnet

    build_tiny_controlnet(load_models("tiny-random", device=torch.device("cpu"), dtype=torch.float32).unet) \
        .save_pretrained(tmp_path / "sd-canny")
    r = cli("sample", "--prompt", "x", *TINY, "--model", "tiny-random-sdxl", "--mode", "controlnet", "--controlnet",
            "sd-canny", "-q", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    (line,) = errors(r)
    assert "sd-canny is made for a UNet attending to 32-wide text embeddings" in line and "model tiny-random-sdxl is SDXL" in line
    assert line.endswith("(flag --controlnet, config key controlnet)")
    assert visible(tmp_path) == ["sd-canny"] and not (tmp_path / "cache").exists()  # nothing inverted


def test_sdxl_from_the_cli_at_its_default_size(tmp_path):
    """SDXL's default processing size is longer side 1024 (the sample is 512x288: 1024x576)."""
    r = cli("invert", "sample", "--model", "tiny-random-sdxl", "--frames", "1", "--n-inversion-steps", "2",
            "--n-timesteps", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "-> 1024x576 (crop)" in r.stderr and "inverted 1 frame 1024x576" in r.stdout
    r = cli("sample", "--prompt", "a red car", *TINY, "--model", "tiny-random-sdxl", "--frames", "4", "-o", "xl.mp4",
            "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = probe(tmp_path / "xl.mp4")
    assert (info.width, info.height, info.frames) == (64, 64, 4)

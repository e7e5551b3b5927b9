"""Mode controlnet on the tiny random models: the residuals reach the UNet (and only where they should),
zero ControlNets change nothing, multi-ControlNet adds, the guidance window, chunking, OOM retries, resume,
condition maps, mismatches before any work, the CLI."""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from conftest import assert_latents_match, pass_kind

from tokenflow import control_maps
from tokenflow.config import DEFAULT_MODEL, EditConfig
from tokenflow.control import SD15, SD15_CANNY, kind_of, resolve_spec
from tokenflow.errors import TokenFlowError
from tokenflow.tiny import build_tiny_controlnet


@pytest.fixture(scope="module")
def nets(tiny_editor, tmp_path_factory):
    """Tiny ControlNets saved as diffusers folders: `zero` (every weight zero), `a` and `b` (random zero convs);
    named like canny ControlNets, so their condition maps are canny edges."""
    d = tmp_path_factory.mktemp("controlnets")
    unet = tiny_editor.models.unet
    for name, kw in (("zero", dict(zero=True)), ("a", dict(seed=1)), ("b", dict(seed=2))):
        build_tiny_controlnet(unet, **kw).save_pretrained(d / f"{name}-canny")
    return {name: str(d / f"{name}-canny") for name in ("zero", "a", "b")}


def cn_cfg(tiny_cfg, net, **kw):
    return tiny_cfg.replace(mode="controlnet", controlnet=net, **kw)


@pytest.fixture
def short_cfg(tiny_cfg):
    """Two inversion and two sampling steps: enough where the number of steps is not the subject."""
    return tiny_cfg.replace(n_inversion_steps=2, n_timesteps=2)


@contextlib.contextmanager
def unet_kwargs_spy(editor):
    """Records (pass kind, step, the UNet call's kwargs) of every UNet call."""
    seen = []
    h = editor.models.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((pass_kind(editor), editor.hooks.state.step if editor.hooks else -1,
                                             args[0].shape[0], kwargs)), with_kwargs=True)
    try:
        yield seen
    finally:
        h.remove()


def row_norms(kwargs, n):
    """Per branch (source, uncond, cond) of a call of n frames per branch: the largest |residual|."""
    res = [*kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"]]
    return [max(float(r[b * n:(b + 1) * n].abs().max()) for r in res) for b in range(3)]


def test_residuals_reach_the_unet_on_the_edited_rows_only(tiny_editor, clip, short_cfg, nets):
    """A zero ControlNet gives exactly the plain edit; a random one changes it, through residuals that every
    keyframe and group call receives on its uncond and cond rows (the source rows get none)."""
    inv = tiny_editor.invert(clip, short_cfg, progress=False)
    plain = tiny_editor.edit(clip, short_cfg, progress=False, inversion=inv)
    zero = tiny_editor.edit(clip, cn_cfg(short_cfg, nets["zero"]), progress=False, inversion=inv)
    assert torch.equal(zero.latents, plain.latents)
    with unet_kwargs_spy(tiny_editor) as seen:
        ctrl = tiny_editor.edit(clip, cn_cfg(short_cfg, nets["a"]), progress=False, inversion=inv)
    assert (ctrl.latents - plain.latents).abs().max() > 1e-2
    calls = [(kind, kw) for kind, _, rows, kw in seen]
    assert {kind for kind, _ in calls} == {"keyframe", "group"}
    for kind, _, rows, kw in seen:
        src, uncond, cond = row_norms(kw, rows // 3)
        assert src == 0 and uncond > 0 and cond > 0, (kind, src, uncond, cond)


def test_guess_mode_and_the_guidance_window(tiny_editor, clip, tiny_cfg, nets):
    """guess_mode: only the cond rows get residuals. control_guidance_start/end 0.4/0.8 of 5 steps: diffusers'
    rule (i / n < start or (i + 1) / n > end leaves step i out) keeps steps 2 and 3."""
    inv = tiny_editor.invert(clip, tiny_cfg, progress=False)
    with unet_kwargs_spy(tiny_editor) as seen:
        tiny_editor.edit(clip, cn_cfg(tiny_cfg, nets["a"], guess_mode=True), progress=False, inversion=inv)
    for _, _, rows, kw in seen:
        src, uncond, cond = row_norms(kw, rows // 3)
        assert src == 0 and uncond == 0 and cond > 0
    with unet_kwargs_spy(tiny_editor) as seen:
        tiny_editor.edit(clip, cn_cfg(tiny_cfg, nets["a"], control_guidance_start=0.4, control_guidance_end=0.8),
                         progress=False, inversion=inv)
    controlled = {step for _, step, _, kw in seen if "down_block_additional_residuals" in kw}
    assert controlled == {2, 3} and {step for _, step, _, _ in seen} == set(range(5))


def test_several_controlnets_add_their_residuals(tiny_editor, clip, short_cfg, nets):
    """[A, A] at scales 0.5 each is A at 1 (halving and adding are exact), [A, B] is neither A nor B alone,
    and a ControlNet outside its window is as if absent."""
    inv = tiny_editor.invert(clip, short_cfg, progress=False)
    a = tiny_editor.edit(clip, cn_cfg(short_cfg, nets["a"]), progress=False, inversion=inv)
    aa = tiny_editor.edit(clip, cn_cfg(short_cfg, [nets["a"], nets["a"]], controlnet_conditioning_scale=[0.5, 0.5]),
                          progress=False, inversion=inv)
    assert torch.equal(a.latents, aa.latents)
    ab = tiny_editor.edit(clip, cn_cfg(short_cfg, [nets["a"], nets["b"]]), progress=False, inversion=inv)
    b = tiny_editor.edit(clip, cn_cfg(short_cfg, nets["b"]), progress=False, inversion=inv)
    assert (ab.latents - a.latents).abs().max() > 1e-2 and (ab.latents - b.latents).abs().max() > 1e-2
    b_off = tiny_editor.edit(clip, cn_cfg(short_cfg, [nets["a"], nets["b"]], control_guidance_start=[0.0, 0.2],
                                          control_guidance_end=[1.0, 0.2001]), progress=False, inversion=inv)
    assert torch.equal(b_off.latents, a.latents)  # B's window holds no step


def test_chunking_and_oom_retries_are_exact(tiny_editor, clip, short_cfg, nets, caplog):
    """The ControlNet runs in the keyframe pass's chunks: one keyframe at a time equals all at once, and an
    OOM inside it halves the chunk and retries; group calls of 1 or 3 groups agree."""
    cfg = cn_cfg(short_cfg, nets["a"])
    inv = tiny_editor.invert(clip, cfg, progress=False)
    whole = tiny_editor.edit(clip, cfg.replace(chunk_frames=12), progress=False, inversion=inv)
    net = tiny_editor.models.controlnets[nets["a"]]
    rows = []
    h = net.register_forward_pre_hook(lambda m, args: rows.append((pass_kind(tiny_editor), args[0].shape[0])))
    try:
        chunked = tiny_editor.edit(clip, cfg.replace(chunk_frames=1), progress=False, inversion=inv)
    finally:
        h.remove()
    assert ("keyframe", 2) in rows and ("keyframe", 6) not in rows  # 1 keyframe x (uncond, cond) per call
    assert_latents_match(whole.latents, chunked.latents)

    def oom(m, args):
        if pass_kind(tiny_editor) == "keyframe" and args[0].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("fake: out of memory")
    h = net.conv_in.register_forward_pre_hook(oom)
    try:
        with caplog.at_level(logging.WARNING, logger="tokenflow"):
            got = tiny_editor.edit(clip, cfg.replace(chunk_frames=4), progress=False, inversion=inv)
    finally:
        h.remove()
    assert "CUDA out of memory in the keyframe pass (3 keyframes, 3 per chunk); retrying with 1" in caplog.text
    assert got.memory_plan.keyframes_per_chunk == 1
    assert_latents_match(got.latents, whole.latents)


def test_an_interrupted_controlnet_edit_resumes(tiny_editor, clip, tiny_cfg, nets):
    cfg = cn_cfg(tiny_cfg, nets["a"], resume=True, seed=4, n_inversion_steps=3, n_timesteps=3)
    inv = tiny_editor.invert(clip, cfg, progress=False)
    whole = tiny_editor.edit(clip, cfg.replace(cache_dir=str(inv.path.parent.parent / "other")), progress=False)
    armed = [True]

    def interrupt(m, args):
        if pass_kind(tiny_editor) == "group" and tiny_editor.hooks.state.step == 2 and armed:
            armed.clear()
            raise KeyboardInterrupt
    h = tiny_editor.models.unet.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            tiny_editor.edit(clip, cfg, progress=False, inversion=inv)
        resumed = tiny_editor.edit(clip, cfg, progress=False, inversion=inv)
    finally:
        h.remove()
    assert resumed.resumed_steps == 2 and torch.equal(resumed.latents, whole.latents)
    # other condition maps are another edit: its checkpoint is not picked up
    other = tiny_editor.edit(clip, cfg.replace(control="softedge"), progress=False, inversion=inv)
    assert other.resumed_steps == 0


def test_condition_maps_from_the_frames():
    frames = torch.zeros(2, 3, 32, 48, dtype=torch.uint8)
    frames[:, :, 8:24, 16:32] = 200  # a bright square on black
    edges = control_maps.canny(frames)
    assert edges.shape == frames.shape and set(edges.unique().tolist()) == {0, 255}
    on = edges[0, 0] > 0
    assert on[8:24, 16].any() and on[8, 16:32].any()  # its border
    assert not on[12:20, 20:28].any() and not on[:, :8].any()  # not its inside, not the empty side
    assert torch.equal(edges[:, 0], edges[:, 2])
    soft = control_maps.softedge(frames)
    assert soft.dtype == torch.uint8 and soft[0, 0, 16, 16] > 200 and soft[0, 0, 16, 24] == 0 and soft[0, 0, 2, 2] == 0
    given = torch.rand(3, 1, 16, 24)
    fitted = control_maps.fit(given, 2, (32, 48), "maps")
    assert fitted.shape == (2, 3, 32, 48) and fitted.dtype == torch.uint8
    with pytest.raises(TokenFlowError, match="has 3 frames but the input has 4"):
        control_maps.fit(given, 4, (32, 48), "control video x")


def test_depth_maps_from_a_cached_estimator(tiny_editor, clip, tmp_path, monkeypatch):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    monkeypatch.setattr(control_maps, "DPT_REPOS", ("nobody/no-such-dpt",))
    monkeypatch.setattr(tiny_editor.models, "depth_estimator", None)
    with pytest.raises(TokenFlowError, match="hf download nobody/no-such-dpt"):
        control_maps.depth(tiny_editor.models, clip, 4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        DPTForDepthEstimation(DPTConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3],
            reassemble_factors=[4, 2, 1, 0.5])).save_pretrained(tmp_path / "dpt")
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(tmp_path / "dpt")
    monkeypatch.setattr(control_maps, "DPT_REPOS", ("nobody/no-such-dpt", str(tmp_path / "dpt")))
    d = control_maps.depth(tiny_editor.models, clip, 4)
    assert d.shape == clip.shape and d.dtype == torch.uint8
    assert int(d.max()) == 255 and torch.equal(d[:, 0], d[:, 1])  # one scale for the video, grey maps


def test_settings_and_defaults():
    cfg = EditConfig(prompt="x", mode="controlnet")
    assert (cfg.model, cfg.controlnet) == (SD15, SD15_CANNY)  # neither given: SD 1.5 with its canny ControlNet
    assert EditConfig(prompt="x", mode="controlnet", controlnet="a/b,c/d").controlnet == ["a/b", "c/d"]
    assert EditConfig(prompt="x").model == DEFAULT_MODEL
    assert [kind_of(n) for n in ("lllyasviel/control_v11p_sd15_canny", "lllyasviel/control_v11f1p_sd15_depth",
                                 "lllyasviel/control_v11p_sd15_softedge", "lllyasviel/sd-controlnet-hed")] == \
        ["canny", "depth", "softedge", "softedge"]
    with pytest.raises(TokenFlowError, match="say --control canny"):
        kind_of("someone/controlnet-openpose")
    bad = [({"controlnet": "x/y"}, "mode is 'pnp'"),
           ({"mode": "controlnet", "controlnet": ["x/canny", "y/canny"], "control": ["canny"]}, "control has 1 entries"),
           ({"mode": "controlnet", "controlnet": ["x/canny"] * 2, "controlnet_conditioning_scale": [1, 1, 1]},
            "3 values for 2 ControlNets"),
           ({"mode": "controlnet", "controlnet": "x/canny", "control_guidance_start": 0.8, "control_guidance_end": 0.5},
            "0 <= start < end <= 1"),
           ({"mode": "controlnet", "controlnet": "x/canny", "controlnet_conditioning_scale": -1}, ">= 0")]
    for kw, match in bad:
        with pytest.raises(TokenFlowError, match=match):
            EditConfig(prompt="x", **kw).validate()


def test_spec_broadcasts_one_value_to_every_controlnet(tiny_editor, tiny_cfg):
    spec = resolve_spec(cn_cfg(tiny_cfg, ["p/canny", "q/depth"], controlnet_conditioning_scale=0.7,
                               control_guidance_end=[1.0, 0.5]), tiny_editor.models)
    assert spec.controls == ("canny", "depth") and spec.scales == (0.7, 0.7) and spec.ends == (1.0, 0.5)
    assert spec.scales_at(0, 10) == [0.7, 0.7] and spec.scales_at(5, 10) == [0.7, 0.0]
    assert resolve_spec(tiny_cfg.replace(mode="controlnet"), tiny_editor.models).names == ("tiny-random",)


@pytest.mark.parametrize("which", ["sdxl", "width"])
def test_a_mismatched_controlnet_fails_before_any_work(tiny_editor, clip, tiny_cfg, tmp_path, which, unet_calls):
    from diffusers import ControlNetModel

    from tokenflow.models import load_models

    if which == "sdxl":
        net = build_tiny_controlnet(load_models("tiny-random-sdxl", device=torch.device("cpu"), dtype=torch.float32).unet)
        match = r"is made for SDXL \(text width 64\) but model tiny-random is .*use a ControlNet trained on"
    else:
        net = ControlNetModel(**{**dict(build_tiny_controlnet(tiny_editor.models.unet).config), "cross_attention_dim": 48})
        match = r"text width 48\) but model tiny-random is .*\(text width 32\)"
    net.save_pretrained(tmp_path / "net-canny")
    cfg = cn_cfg(tiny_cfg, str(tmp_path / "net-canny"))
    with pytest.raises(TokenFlowError, match=match) as e:
        tiny_editor.edit(clip, cfg, progress=False)
    assert "\n" not in str(e.value) and e.value.key == "controlnet"
    assert unet_calls.n == 0 and not (tmp_path / "cache").exists()  # nothing inverted, nothing stored

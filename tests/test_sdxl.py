"""SDXL on the tiny random SDXL model (and SDXL's real UNet config on the meta device): the added conditioning
reaches every UNet call, the layers TokenFlow treats specially, end to end edits with chunking, OOM retries and
resume, loading folders and single files, the VAE's float16 guard, the default size."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import assert_latents_match, pass_kind

from tokenflow.editor import TokenFlowEditor
from tokenflow.errors import ModelNotFoundError, TokenFlowError
from tokenflow.layers import conv_injection_module, self_attention_layers
from tokenflow.models import load_models
from tokenflow.sdxl import SDXL_UNET_CONFIG, default_long_side, single_file_is_sdxl
from tokenflow.tiny import TINY_SDXL, build_tiny_models, build_tiny_second_encoder

CPU = dict(device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def xl_editor():
    return TokenFlowEditor(load_models(TINY_SDXL, **CPU))


@pytest.fixture
def xl_cfg(tiny_cfg):
    return tiny_cfg.replace(model=TINY_SDXL)


def test_sdxl_layers_by_structure():
    """SDXL base's UNet (its published config, on meta): 70 self-attentions, 10 at the 64x64 level and 60 at
    32x32 (of a 1024 image); Q/K injection in the decoder's attention blocks but the first module of the
    first (up_blocks.0.attentions.1-2: 20, up_blocks.1: 6); conv injection in up_blocks.0.resnets.1."""
    from tokenflow.memsim import meta_unet

    unet = meta_unet(SDXL_UNET_CONFIG)
    layers = self_attention_layers(unet)
    assert len(layers) == 70
    assert {lv: sum(layer.level == lv for layer in layers) for lv in (0, 1, 2)} == {0: 0, 1: 10, 2: 60}
    assert {layer.channels for layer in layers if layer.level == 1} == {640}
    qk = [layer.name for layer in layers if layer.qk_injection]
    assert len(qk) == 26
    assert all(n.startswith(("up_blocks.0.attentions.1.", "up_blocks.0.attentions.2.", "up_blocks.1.")) for n in qk)
    assert conv_injection_module(unet) is unet.up_blocks[0].resnets[1].conv2


def test_added_conditioning_reaches_every_unet_call(xl_editor, clip, xl_cfg):
    """Inversion, keyframe and group calls all get the pooled embeddings of their rows' prompts and the size
    numbers of the processing size; and the UNet's output depends on them."""
    m = xl_editor.models
    seen = []
    h = m.unet.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((pass_kind(xl_editor), args[0].shape[0], kw["added_cond_kwargs"])),
        with_kwargs=True)
    try:
        xl_editor.edit(clip, xl_cfg, progress=False)
    finally:
        h.remove()
    prompts = m.prompt_embeds([xl_cfg.inversion_prompt, xl_cfg.negative_prompt, xl_cfg.prompt], (64, 64))
    source = m.prompt_embeds([xl_cfg.inversion_prompt], (64, 64))  # the inversion encodes its prompt alone
    assert {kind for kind, _, _ in seen} == {"off", "keyframe", "group"}
    for kind, rows, added in seen:
        assert torch.equal(added["time_ids"], torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(rows, -1))
        want = source.pooled.expand(rows, -1) if kind == "off" else prompts.pooled.repeat_interleave(rows // 3, 0)
        assert torch.equal(added["text_embeds"], want)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = prompts.select([0, 2]).unet_kwargs(1, m.device, m.dtype)
    with torch.no_grad():
        base = m.unet(x, 500, **kw).sample
        kw["added_cond_kwargs"]["time_ids"] = torch.tensor([[96.0, 64, 0, 0, 96, 64]] * 2)
        sized = m.unet(x, 500, **kw).sample
        kw["added_cond_kwargs"]["time_ids"][:] = torch.tensor([64.0, 64, 0, 0, 64, 64])
        kw["added_cond_kwargs"]["text_embeds"] = kw["added_cond_kwargs"]["text_embeds"].flip(0)
        pooled = m.unet(x, 500, **kw).sample
    assert (sized - base).abs().max() > 1e-3 and (pooled - base).abs().max() > 1e-3


def test_sdxl_edit_end_to_end_chunked_and_injected(xl_editor, clip, xl_cfg):
    """Fresh and reused inversions edit alike; one keyframe per chunk and one group per call give the same
    latents; conv injection hits up_blocks.0.resnets.1 only."""
    inv = xl_editor.invert(clip, xl_cfg, progress=False)
    assert not inv.reused
    injected = set()
    handles = []
    for name, mod in xl_editor.models.unet.named_modules():
        if name.endswith("conv2") and "resnets" in name:
            def hook(m, args, out, name=name):
                F = out.shape[0] // 3
                if pass_kind(xl_editor) != "off" and torch.equal(out[F:], out[:F].repeat(2, 1, 1, 1)):
                    injected.add(name)
            handles.append(mod.register_forward_hook(hook))
    try:
        whole = xl_editor.edit(clip, xl_cfg.replace(chunk_frames=12), progress=False)
    finally:
        for h in handles:
            h.remove()
    assert injected == {"up_blocks.0.resnets.1.conv2"}
    chunked = xl_editor.edit(clip, xl_cfg.replace(chunk_frames=1), progress=False, inversion=inv)
    assert whole.frames.shape == clip.shape and whole.latents.isfinite().all()
    assert_latents_match(whole.latents, chunked.latents)
    again = xl_editor.edit(clip, xl_cfg.replace(chunk_frames=12), progress=False)
    assert again.inversion_reused and torch.equal(again.latents, whole.latents)


def test_sdxl_oom_retry_and_resume(xl_editor, clip, xl_cfg, caplog):
    cfg = xl_cfg.replace(chunk_frames=12, resume=True, seed=5)
    inv = xl_editor.invert(clip, cfg, progress=False)
    whole = xl_editor.edit(clip, cfg.replace(cache_dir=str(inv.path.parent.parent / "other")), progress=False)
    armed = [True]

    def fail(m, args):
        if pass_kind(xl_editor) == "group" and args[0].shape[0] > 12:
            raise torch.cuda.OutOfMemoryError("fake: out of memory")
        if pass_kind(xl_editor) == "keyframe" and xl_editor.hooks.state.step == 3 and armed:
            armed.clear()
            raise KeyboardInterrupt
    h = xl_editor.models.unet.register_forward_pre_hook(fail)
    try:
        with caplog.at_level(logging.WARNING, logger="tokenflow"), pytest.raises(KeyboardInterrupt):
            xl_editor.edit(clip, cfg, progress=False, inversion=inv)
        resumed = xl_editor.edit(clip, cfg, progress=False, inversion=inv)
    finally:
        h.remove()
    assert "out of memory in the group passes" in caplog.text and resumed.resumed_steps == 3
    assert resumed.memory_plan.frames_per_call == 4
    assert_latents_match(resumed.latents, whole.latents)


def test_sdxl_folder_loads_both_encoders_and_says_what_is_missing(tmp_path):
    import shutil

    from diffusers import DDIMScheduler

    vae, tok, te, unet, sched = build_tiny_models(TINY_SDXL)
    tok2, te2 = build_tiny_second_encoder()
    for sub, mod in (("vae", vae), ("unet", unet), ("text_encoder", te), ("tokenizer", tok), ("text_encoder_2", te2),
                     ("tokenizer_2", tok2)):
        mod.save_pretrained(tmp_path / sub)
    DDIMScheduler.from_config(sched).save_config(tmp_path / "scheduler")
    m = load_models(str(tmp_path), **CPU)
    assert m.is_sdxl and m.family == "SDXL" and torch.equal(m.text_encoder_2.text_projection.weight, te2.text_projection.weight)
    assert m.fingerprint() == load_models(TINY_SDXL, **CPU).fingerprint()  # the same weights
    assert default_long_side(str(tmp_path)) == 1024 and default_long_side("tiny-random") == 512
    shutil.rmtree(tmp_path / "text_encoder_2")
    with pytest.raises(ModelNotFoundError, match="SDXL-shaped but its second text encoder is missing"):
        load_models(str(tmp_path), **CPU)


def test_single_file_sdxl_is_told_by_its_keys(tmp_path, monkeypatch):
    """A single file holding SDXL's second text encoder goes to diffusers' SDXL single-file loader."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
    from safetensors.torch import save_file

    xl, sd = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors"
    save_file({CHECKPOINT_KEY_NAMES["xl_base"]: torch.zeros(1)}, str(xl))
    save_file({CHECKPOINT_KEY_NAMES["v1"]: torch.zeros(1)}, str(sd))
    assert single_file_is_sdxl(xl, None) and not single_file_is_sdxl(sd, None)
    assert default_long_side(str(xl)) == 1024 and default_long_side(str(sd)) == 512
    vae, tok, te, unet, sched = build_tiny_models(TINY_SDXL)
    tok2, te2 = build_tiny_second_encoder()

    class Pipe:
        scheduler = type("S", (), {"config": sched})()
    pipe = Pipe()
    pipe.vae, pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.tokenizer_2, pipe.text_encoder_2 = vae, tok, te, unet, tok2, te2
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", classmethod(lambda cls, *a, **k: pipe))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    m = load_models(str(xl), **CPU)
    assert m.is_sdxl and m.text_encoder_2 is te2 and m.prompt_embeds(["x"], (64, 64)).pooled.shape == (1, 32)


def test_fp16_vae_is_upcast_where_it_says_it_overflows():
    """SDXL's VAE config says force_upcast: in a float16 model the VAE stays float32, the UNet does not."""
    m = load_models(TINY_SDXL, device=torch.device("cpu"), dtype=torch.float16)
    assert m.unet.dtype == torch.float16 and m.vae.dtype == torch.float32
    assert load_models("tiny-random", device=torch.device("cpu"), dtype=torch.float16).vae.dtype == torch.float16


def test_vae_overflow_is_caught_not_written_as_black_frames(caplog):
    """A half-precision VAE whose output is NaN: that batch runs again in float32 (with a warning naming the
    fp16-safe VAE) and the VAE stays there; NaN even in float32 is a one-line error."""
    from tokenflow.inversion import decode_latents

    m = load_models("tiny-random", device=torch.device("cpu"), dtype=torch.bfloat16)
    lat = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def overflow(mod, args, out):
        return out * float("nan") if out.dtype != torch.float32 else out
    h = m.vae.decoder.register_forward_hook(overflow)
    try:
        with caplog.at_level(logging.WARNING, logger="tokenflow"):
            frames = torch.cat(list(decode_latents(m, lat, 2)))
    finally:
        h.remove()
    assert "the VAE overflowed in bfloat16 while it ran decoding latents" in caplog.text
    assert "--vae madebyollin/sdxl-vae-fp16-fix" in caplog.text and caplog.text.count("overflowed") == 1
    assert m.vae.dtype == torch.float32 and frames.float().std() > 1  # not black
    assert torch.equal(frames, torch.cat(list(decode_latents(m, lat, 2))))  # the same VAE, now in float32
    with pytest.raises(TokenFlowError, match="not finite .* even in float32"):
        list(decode_latents(m, lat * float("nan"), 2))


def test_resize_default_longer_side():
    from tokenflow.video import resize_for

    r = resize_for(1920, 1080, long_side=1024)
    assert (r.width, r.height) == (1024, 576)
    assert (resize_for(1920, 1080).width, resize_for(1920, 1080).height) == (512, 288)


def test_another_vae_replaces_the_models(tmp_path):
    from tokenflow.tiny import build_tiny_models as b

    vae = b("tiny-random", seed=7)[0]
    vae.save_pretrained(tmp_path / "vae7")
    m = load_models("tiny-random", vae=str(tmp_path / "vae7"), **CPU)
    assert torch.equal(m.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert m.fingerprint() != load_models("tiny-random", **CPU).fingerprint()  # the store keys the VAE too
    with pytest.raises(ModelNotFoundError, match="VAE 'nobody/no-vae' could not be loaded"):
        load_models("tiny-random", vae="nobody/no-vae", **CPU)


def test_default_long_side_reads_a_cached_config(tmp_path, monkeypatch):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    default_long_side.cache_clear()
    assert default_long_side(str(tmp_path)) == 1024
    assert default_long_side("stabilityai/stable-diffusion-xl-base-1.0") == 1024  # known even when not cached
    assert default_long_side("someone/not-cached") == 512

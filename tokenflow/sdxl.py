"""Stable Diffusion XL: what it adds to an SD model, found by structure.

An SDXL UNet (`addition_embed_type == "text_time"`) takes, besides the token embeddings, a pooled text
embedding and six size numbers per row (`added_cond_kwargs`: `text_embeds`, `time_ids`). Its prompts go
through two CLIP text encoders: the penultimate hidden states of both, concatenated (768 + 1280 = 2048
channels), and the projected pooled output of the second (1280), as diffusers' SDXL pipeline computes
them. The size numbers are (original height, width, crop top, crop left, target height, width): the
processing size, uncropped, for every row.

Its native resolution is 1024 x 1024 (the CLI's default longer side for SDXL-shaped models); its VAE
overflows in float16 (see tokenflow/vae.py).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
LONG_SIDE = 1024  # SDXL's native resolution (sample_size 128 latents)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that differ from diffusers'
# defaults): what tokenflow.memsim simulates and `sdxl-random` builds.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
# Its VAE (vae/config.json): SD's architecture, another scale, and the flag that it overflows in float16.
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP ViT-bigG/14) config.json.
SDXL_TEXT_ENCODER_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                projection_dim=768)
SDXL_TEXT_ENCODER_2_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                                  projection_dim=1280)


def is_sdxl_unet(unet_or_config) -> bool:
    config = getattr(unet_or_config, "config", unet_or_config)
    return dict(config).get("addition_embed_type") == "text_time"


@torch.no_grad()
def encode(models, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, 77, D1 + D2] token embeddings, [n, D2'] pooled embeddings) of `prompts`."""
    hidden, pooled = [], None
    for tok, enc in ((models.tokenizer, models.text_encoder), (models.tokenizer_2, models.text_encoder_2)):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids.to(enc.device), output_hidden_states=True)
        if out[0].dim() == 2:  # the projected pooled output (CLIPTextModelWithProjection's text_embeds)
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        from tokenflow.errors import TokenFlowError
        raise TokenFlowError(f"model {models.name!r}: an SDXL UNet needs a second text encoder with a projection "
                             f"(text_encoder_2, CLIPTextModelWithProjection)")
    return torch.cat(hidden, dim=-1).to(models.dtype), pooled.to(models.dtype)


def time_ids(height: int, width: int) -> torch.Tensor:
    """The six size numbers of an uncropped height x width image: original size, crop top-left, target size."""
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


def single_file_is_sdxl(path: Path, model_config: str | None) -> bool:
    """Whether a single-file checkpoint is SDXL: its config folder has a second text encoder, or the file
    holds the second text encoder's weights (the key diffusers' own single-file loader looks for)."""
    if model_config and (Path(model_config) / "text_encoder_2").is_dir():
        return True
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    return CHECKPOINT_KEY_NAMES["xl_base"] in checkpoint_keys(path)


def checkpoint_keys(path: Path) -> set[str]:
    """Tensor names of a .safetensors (header only) or .ckpt file (memory-mapped, not read)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                return set(f.keys())
        sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        return set(sd.get("state_dict", sd))
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader that follows
        return set()


@lru_cache(maxsize=64)
def default_long_side(model: str, model_config: str | None = None, fallback: int = 512) -> int:
    """The longer side the CLI scales inputs to for `model` (before loading it): 1024 for SDXL-shaped
    models, `fallback` for the others or when the configuration cannot be read without loading."""
    from tokenflow.models import ALIASES, SINGLE_FILE_SUFFIXES, TINY_VARIANTS

    if model in TINY_VARIANTS:
        return LONG_SIDE if "sdxl" in model else fallback
    path = Path(ALIASES.get(model, model)).expanduser()
    try:
        if path.suffix in SINGLE_FILE_SUFFIXES:
            return LONG_SIDE if path.is_file() and single_file_is_sdxl(path, model_config) else fallback
        if (path / "unet" / "config.json").is_file():
            config = json.loads((path / "unet" / "config.json").read_text())
        else:
            from huggingface_hub import hf_hub_download
            config = json.loads(Path(hf_hub_download(str(path), "unet/config.json", local_files_only=True)).read_text())
    except Exception:  # noqa: BLE001 - not in the cache, not a repository: the loader says what is wrong
        return LONG_SIDE if model == SDXL_BASE else fallback
    return LONG_SIDE if is_sdxl_unet(config) else fallback

"""A tiny Stable-Diffusion-shaped model with random weights, for tests and smoke runs.

Same module structure as SD 1.x/2.x (4 down and 4 up blocks, 2 layers per block, cross-attention
transformers at three levels), so every code path of the engine runs; its output is meaningless.
`tiny-random-sdxl` has SDXL's structure (3 levels, no attention at the first, deeper transformer stacks
below, added text-time conditioning, two text encoders, the second with a projection); `build_tiny_controlnet`
makes a ControlNet from a tiny UNet with diffusers' own constructor.
The CLIP tokenizer is built from a byte-level vocabulary written to a temporary folder: nothing is
downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from tokenflow.models import TINY_VARIANTS

TINY_MODEL = "tiny-random"
SD21_RANDOM = "sd21-random"  # the full SD 2.1-base architecture with random weights, for benchmarks
TINY_SDXL = "tiny-random-sdxl"
SDXL_RANDOM = "sdxl-random"  # the full SDXL base architecture with random weights, for benchmarks
# SD 2.1-base's UNet (stabilityai/stable-diffusion-2-1-base unet/config.json, the fields that differ from
# diffusers' defaults); also what tokenflow.memsim simulates for the benchmarks.
SD21_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
# SD 1.5's UNet (stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json): SD 2.1-base's blocks with 8 heads
# everywhere, 768-wide text and convolutional projections; what most ControlNets are made for (benchmarks).
SD15_UNET_CONFIG = {**SD21_UNET_CONFIG, "cross_attention_dim": 768, "attention_head_dim": 8,
                    "use_linear_projection": False}


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-to-printable-character table (the BPE base alphabet).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def tokenizer_dir() -> str:
    """Write a byte-level CLIP vocabulary (no merges) once per machine and return its folder."""
    d = Path(tempfile.gettempdir()) / "tokenflow-tiny-tokenizer-v1"
    if (d / "merges.txt").exists():
        return str(d)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tmp = Path(tempfile.mkdtemp(prefix="tokenflow-tiny-tokenizer-"))
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    try:
        os.rename(tmp, d)  # atomic: concurrent processes either win or find it complete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(d)


def build_tiny_models(variant: str = TINY_MODEL, seed: int = 0, device: str | torch.device = "cpu"):
    """Build (vae, tokenizer, text_encoder, unet, scheduler_config) with seeded random weights.

    `device`: where the weights are created and initialised (a GPU initialises a full-size model in
    a fraction of the CPU's time)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny model {variant!r}; choose one of {', '.join(TINY_VARIANTS)}")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir(), model_max_length=77)
    device = torch.device(device)
    gpus = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus, device_type="cuda"), device:
        torch.manual_seed(seed)  # seeded weights without touching the caller's RNG
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        if variant == SD21_RANDOM:
            return _sd21_random(tokenizer)
        if variant == SDXL_RANDOM:
            return _sdxl_random(tokenizer)
        if variant == TINY_SDXL:
            return _tiny_sdxl(tokenizer, text_encoder)
        sd1 = variant == "tiny-random-sd1"
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=5 if variant == "tiny-random-depth" else 4,
            out_channels=4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
            # SD 2.x: head dim 64 is spelled as per-level head counts; SD 1.x: 8 heads everywhere.
            attention_head_dim=8 if sd1 else (2, 2, 4, 4),
            use_linear_projection=not sd1,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64,
            scaling_factor=0.18215,
        )
    for m in (text_encoder, unet, vae):
        m.eval().requires_grad_(False)
    prediction = "v_prediction" if variant == "tiny-random-v" else "epsilon"
    return vae, tokenizer, text_encoder, unet, sd_scheduler_config(prediction)


def _tiny_sdxl(tokenizer, text_encoder):
    """SDXL's structure at toy size: levels (32, 64, 64), attention from the second level on with 1 and 2
    transformer blocks per module, text-time conditioning over two 32-wide encoders (called on the
    caller's device and seeded RNG)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        norm_num_groups=8, sample_size=64, scaling_factor=0.13025, force_upcast=True)
    for m in (text_encoder, unet, vae):
        m.eval().requires_grad_(False)
    return vae, tokenizer, text_encoder, unet, sd_scheduler_config()


def build_tiny_second_encoder(variant: str = TINY_SDXL, seed: int = 1, device: str | torch.device = "cpu"):
    """SDXL's second (tokenizer, text encoder with projection): tiny for tiny-random-sdxl, OpenCLIP bigG's
    shape for sdxl-random."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from tokenflow.sdxl import SDXL_TEXT_ENCODER_2_CONFIG

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir(), model_max_length=77)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG, **ids) if variant == SDXL_RANDOM else CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, **ids)
    device = torch.device(device)
    gpus = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus, device_type="cuda"), device:
        torch.manual_seed(seed)
        encoder = CLIPTextModelWithProjection(config)
    return tokenizer, encoder.eval().requires_grad_(False)


def build_tiny_controlnet(unet, seed: int = 0, zero: bool = False):
    """A ControlNet made from `unet` by diffusers' `ControlNetModel.from_unet` (the UNet's encoder weights
    copied, zero-initialised output convolutions), whose zero convolutions then get seeded random weights so
    its residuals are not zero; `zero=True` sets every weight to zero instead (residuals exactly zero)."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
        with torch.no_grad():
            if zero:
                for p in net.parameters():
                    p.zero_()
            else:
                for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
                    torch.nn.init.normal_(conv.weight, std=0.5)
                    torch.nn.init.normal_(conv.bias, std=0.1)
    return torch.nn.Module.to(net, unet.dtype).eval().requires_grad_(False)  # diffusers' to() warns needlessly


def sd_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The DDIM scheduler config of SD 1.x/2.x (scheduler/scheduler_config.json of the SD 2.1-base repo)."""
    from diffusers import DDIMScheduler

    return dict(DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type).config)


def _sd21_random(tokenizer):
    """SD 2.1-base's UNet, VAE and text encoder from their published configs (speed does not depend on
    the weights). The tokenizer is the tiny byte-level one: its ids are valid in the 49408-token encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        sample_size=768, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    for m in (text_encoder, unet, vae):
        m.eval().requires_grad_(False)
    return vae, tokenizer, text_encoder, unet, sd_scheduler_config()


def _sdxl_random(tokenizer):
    """SDXL base's UNet, VAE and first text encoder from their published configs (tokenflow.sdxl)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tokenflow.sdxl import SDXL_TEXT_ENCODER_CONFIG, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG

    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **SDXL_TEXT_ENCODER_CONFIG, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    for m in (text_encoder, unet, vae):
        m.eval().requires_grad_(False)
    return vae, tokenizer, text_encoder, unet, sd_scheduler_config()

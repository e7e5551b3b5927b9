"""How many frames go through the UNet (and VAE) at once: from the flag, or from free GPU memory."""
from __future__ import annotations

import torch

# Activation bytes per UNet row (one frame, one branch) per latent token per first-level channel,
# a conservative fit for SD 1.x/2.x inference with SDPA (fp16 at 512x512: about 130 MB per row).
BYTES_PER_TOKEN_CHANNEL = 48
CPU_CHUNK_FRAMES = 8
MAX_CHUNK_FRAMES = 64


def plan_chunk_frames(models, cfg, h: int, w: int) -> int:
    """Frames per UNet call (rounded to whole groups where it can be), within the GPU memory budget."""
    if cfg.chunk_frames:
        return cfg.chunk_frames
    if models.device.type != "cuda":
        return max(CPU_CHUNK_FRAMES, cfg.batch_size)
    free, _ = torch.cuda.mem_get_info(models.device)
    budget = cfg.max_gpu_mem * 2**30 - torch.cuda.memory_allocated(models.device) if cfg.max_gpu_mem else free
    c0 = models.unet.config.block_out_channels[0]
    per_frame = 3 * BYTES_PER_TOKEN_CHANNEL * h * w * c0 * torch.finfo(models.dtype).bits // 16
    frames = int(0.7 * max(budget, 0) // per_frame)
    frames = max(1, min(frames, MAX_CHUNK_FRAMES))
    return max(cfg.batch_size, frames // cfg.batch_size * cfg.batch_size) if frames >= cfg.batch_size else frames


def records_bytes(unet, K: int, h: int, w: int, dtype: torch.dtype) -> int:
    """Size of one step's keyframe records: per self-attention layer, [K, S, C] features and [3, K, S, C] outputs."""
    from tokenflow.layers import self_attention_layers

    total = 0
    for layer in self_attention_layers(unet):
        parts = layer.name.split(".")
        # down_blocks[i] runs at level i, up_blocks[j] at level 3 - j, the mid block at level 3
        level = 3 if parts[0] == "mid_block" else int(parts[1]) if parts[0] == "down_blocks" else 3 - int(parts[1])
        S = (h >> level) * (w >> level)
        C = unet.get_submodule(layer.name).to_q.in_features
        total += 4 * K * S * C
    return total * torch.finfo(dtype).bits // 8


def offload_records(models, cfg, K: int, h: int, w: int) -> bool:
    """Keep the keyframe records in pinned host memory when they would take over a quarter of the GPU budget."""
    if models.device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(models.device)
    budget = cfg.max_gpu_mem * 2**30 if cfg.max_gpu_mem else free + torch.cuda.memory_allocated(models.device)
    return records_bytes(models.unet, K, h, w, models.dtype) > budget / 4

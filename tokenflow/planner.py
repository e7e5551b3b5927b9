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

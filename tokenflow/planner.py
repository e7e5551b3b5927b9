"""How many frames go through the UNet (and VAE) at once, and where the keyframe records live: from the
flags, or from the GPU memory budget and a per-model estimate.

The estimate, per UNet row (one frame of one branch), in bytes per latent token per first-level channel
at 16 bits (scaled by the dtype's width), fitted to tokenflow.memsim's simulation of SD 2.1 at 512x512
(bench/results/memory_sim.json; tests/test_memsim.py checks plans against the simulation):
  - every frame of a UNet call (group pass, inversion; the keyframe pass's chunks): 48 (sim: 48.0);
  - every keyframe of the keyframe pass, whatever the chunk: 24 (sim: 22.2). diffusers' forward keeps the
    residual stream, the skip connections and a few block temporaries of all K keyframes at once, since
    each self-attention needs every keyframe at that layer;
  - the keyframe records, exactly (records_bytes), on the GPU unless offloaded to host memory;
  - the VAE, which runs on its own (nothing else held): 1536 bytes per pixel per frame (sim: decoder 1536,
    encoder 1280; 0.375 GiB per 512x512 frame, twice a UNet frame of three rows).
The planner fills 70% of the budget, for allocator fragmentation and library workspaces (not simulated).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("tokenflow")

BYTES_PER_TOKEN_CHANNEL = 48
KEYFRAME_BYTES_PER_TOKEN_CHANNEL = 24
VAE_BYTES_PER_PIXEL = 1536
FILL = 0.7
CPU_CHUNK_FRAMES = 8
MAX_CHUNK_FRAMES = 64


@dataclass
class MemoryPlan:
    chunk_frames: int  # frames per UNet call (group passes, inversion) and keyframes per chunk
    offload_records: bool  # keyframe records in pinned host memory
    vae_frames: int  # frames per VAE encode / decode call (and depth estimation)
    estimate: int = 0  # bytes the plan expects at its peak beyond the weights (0: not planned, e.g. on the CPU)


def budget(cfg, free: int, allocated: int) -> tuple[int, int]:
    """(bytes the planner may fill with activations, bytes it may use in all) on a GPU with `free` bytes
    free and `allocated` bytes already held (the weights): --max-gpu-mem, else all of the GPU."""
    total = int(cfg.max_gpu_mem * 2**30) if cfg.max_gpu_mem else free + allocated
    return total - allocated, total


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


def plan_for(unet, dtype: torch.dtype, cfg, h: int, w: int, keyframes: int, free: int, allocated: int) -> MemoryPlan:
    """The plan for latents h x w and `keyframes` keyframes (0: inversion) within the budget."""
    scale = h * w * unet.config["block_out_channels"][0] * torch.finfo(dtype).bits // 16
    rows = 3 if keyframes else 1  # an edit call runs three branches per frame; inversion one
    per_frame = rows * BYTES_PER_TOKEN_CHANNEL * scale
    keyframe_pass = keyframes * 3 * KEYFRAME_BYTES_PER_TOKEN_CHANNEL * scale
    records = records_bytes(unet, keyframes, h, w, dtype)
    per_keyframe_records = records // max(keyframes, 1)
    usable, total = budget(cfg, free, allocated)
    usable = int(FILL * usable)
    # Records stay on the GPU while they take at most a quarter of the budget and leave room for a group.
    offload = records > total / 4 or keyframe_pass + records + cfg.batch_size * per_frame > usable
    if offload:  # each group brings its keyframe's records (and one more for the first group of a call)
        per_frame += per_keyframe_records // cfg.batch_size
        fixed = keyframe_pass + per_keyframe_records
    else:
        fixed = keyframe_pass + records
    room = usable - fixed
    if cfg.chunk_frames:
        chunk = cfg.chunk_frames
    else:
        chunk = max(1, min(room // per_frame, MAX_CHUNK_FRAMES))
        if chunk >= cfg.batch_size:
            chunk = chunk // cfg.batch_size * cfg.batch_size
    # A group call holds whole groups (at least one), at most the whole video (about keyframes x B frames).
    per_call = min(max(chunk, cfg.batch_size), keyframes * cfg.batch_size) if keyframes else chunk
    estimate = fixed + per_call * per_frame
    vae = VAE_BYTES_PER_PIXEL * 64 * h * w * torch.finfo(dtype).bits // 16
    vae_frames = cfg.chunk_frames or max(1, min(usable // vae, MAX_CHUNK_FRAMES))
    if room < per_frame:
        log.warning("the keyframe pass of %d keyframes needs about %.1f GiB, beyond the %.1f GiB the planner may "
                    "fill; expect CUDA out of memory. Raise --max-gpu-mem, lower the resolution or edit the video "
                    "in parts", keyframes, estimate / 2**30, usable / 2**30)
    return MemoryPlan(int(chunk), bool(offload), int(vae_frames), int(estimate))


def plan_memory(models, cfg, h: int, w: int, keyframes: int = 0) -> MemoryPlan:
    """plan_for on this device's free memory; on the CPU, fixed chunks and no offload."""
    if models.device.type != "cuda":
        chunk = cfg.chunk_frames or max(CPU_CHUNK_FRAMES, cfg.batch_size)
        return MemoryPlan(chunk, False, chunk)
    free, _ = torch.cuda.mem_get_info(models.device)
    plan = plan_for(models.unet, models.dtype, cfg, h, w, keyframes, free, torch.cuda.memory_allocated(models.device))
    log.info("memory plan: %d frames per UNet call, %d per VAE call, keyframe records %s, about %.1f GiB of "
             "activations", plan.chunk_frames, plan.vae_frames, "in host memory" if plan.offload_records else
             "on the GPU", plan.estimate / 2**30)
    return plan

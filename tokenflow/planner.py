"""How many frames go through the UNet (and VAE) at once, and where the keyframe records live: from the
flags, or from the GPU memory budget and a per-model estimate.

The estimate, per UNet row (one frame of one branch), in bytes per latent token per first-level channel
at 16 bits (scaled by the dtype's width), fitted to tokenflow.memsim's simulation of SD 2.1 at 512x512
(bench/results/memory_sim.json; tests/test_memsim.py checks plans against the simulation):
  - every frame of a UNet call (group pass, inversion; the keyframe pass's chunks): 48 (sim: 52.2
    between 8 and 16 frames per call, tests/test_memsim.py; within its 10%);
  - every keyframe of the keyframe pass, whatever the chunk: 24 (sim: 22.2). diffusers' forward keeps the
    residual stream, the skip connections and a few block temporaries of all K keyframes at once, since
    each self-attention needs every keyframe at that layer;
  - the keyframe records, exactly (records_bytes), on the GPU unless offloaded to host memory;
  - the VAE, which runs on its own (nothing else held): 1536 bytes per pixel per frame (sim: decoder 1536,
    encoder 1280; 0.375 GiB per 512x512 frame, twice a UNet frame of three rows).
  - on a rank of a distributed edit (tokenflow.distributed), the keyframe pass holds its own keyframes (the
    two terms above for them, and their records plus the one before them) and, one attention layer at a
    time, the keys and values of every rank's keyframes for one branch: two rows of every keyframe at the
    first level, 4 bytes per token per channel (exact: two fp16 rows).
The planner fills 70% of the budget, for allocator fragmentation and library workspaces (not simulated).

SDXL (fitted the same way at 1024x1024, its native size; tests/test_memsim.py) has its own constants: its
first level (320 channels, 4x SD's tokens at 1024) has no attention, so per first-level channel a row
holds less than in SD. ControlNets (tokenflow/control.py) add, per row of a call, the residuals the UNet
receives (the size of its skip connections, zero rows included) and the ControlNet's own activations
while it runs; several ControlNets add into one set of residuals, so the count hardly matters beyond
their weights (which the planner finds already allocated).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("tokenflow")

BYTES_PER_TOKEN_CHANNEL = 48
KEYFRAME_BYTES_PER_TOKEN_CHANNEL = 24
GATHERED_BYTES_PER_TOKEN_CHANNEL = 4
VAE_BYTES_PER_PIXEL = 1536


@dataclass(frozen=True)
class Profile:
    """A model family's bytes per latent token per first-level channel at 16 bits (see the module docstring)."""

    row: float  # per row (frame x branch) of a UNet call
    keyframe: float  # per row of every keyframe of the keyframe pass
    control_row: float  # added per row of a call by ControlNets
    control_keyframe: float  # added per row of every keyframe of the keyframe pass by ControlNets
    gathered: float = GATHERED_BYTES_PER_TOKEN_CHANNEL  # per keyframe gathered from every rank (distributed)


# Simulated (tests/test_memsim.py): SD 2.1 row 52.2, keyframe 22.2, a ControlNet +14.4 and +14.4; SDXL at
# 1024x1024 row 31.6, keyframe 18.1, a ControlNet +11.5 and +14.0 (two ControlNets: as one, weights aside).
SD_PROFILE = Profile(BYTES_PER_TOKEN_CHANNEL, KEYFRAME_BYTES_PER_TOKEN_CHANNEL, 16, 14)
# SDXL's gathered keyframes are not simulated: SD's constant, an overestimate (its largest attention layer holds
# half of SD's tokens x channels per first-level token-channel).
SDXL_PROFILE = Profile(32, 20, 12, 14)


def profile(unet) -> Profile:
    from tokenflow.sdxl import is_sdxl_unet
    return SDXL_PROFILE if is_sdxl_unet(unet) else SD_PROFILE
FILL = 0.7
CPU_CHUNK_FRAMES = 8
MAX_CHUNK_FRAMES = 64


@dataclass(frozen=True)
class MemoryPlan:
    """How an edit uses GPU memory. The editor returns the plan that ran: an OOM retry (halving a count,
    moving the records to the host) shows in its `EditResult.memory_plan`."""

    frames_per_call: int  # frames per group-pass UNet call (whole groups: at least one per call)
    keyframes_per_chunk: int  # keyframes per chunk of the keyframe pass's per-row modules (tokenflow.chunking)
    inversion_frames_per_call: int  # frames per inversion UNet call (one row each)
    vae_frames_per_call: int  # frames per VAE encode / decode call (and depth estimation)
    offload_records: bool  # keyframe records in pinned host memory
    estimate: int = 0  # bytes the plan expects at its peak beyond the weights (0: not planned, e.g. on the CPU)

    def describe(self) -> str:
        return (f"{self.frames_per_call} frames per UNet call, {self.keyframes_per_chunk} keyframes per chunk, "
                f"{self.inversion_frames_per_call} frames per inversion call, {self.vae_frames_per_call} per VAE "
                f"call, keyframe records {'in host memory' if self.offload_records else 'on the GPU'}, about "
                f"{self.estimate / 2**30:.1f} GiB of activations")


def budget(max_gpu_mem: float | None, free: int, allocated: int) -> tuple[int, int]:
    """(bytes the planner may fill with activations, bytes it may use in all) on a GPU with `free` bytes
    free and `allocated` bytes already held (the weights): `max_gpu_mem` GiB, else all of the GPU."""
    total = int(max_gpu_mem * 2**30) if max_gpu_mem else free + allocated
    return total - allocated, total


def records_bytes(unet, K: int, h: int, w: int, dtype: torch.dtype) -> int:
    """Size of one step's keyframe records: per self-attention layer, [K, S, C] features and [3, K, S, C] outputs."""
    from tokenflow.layers import self_attention_layers

    total = 0
    for layer in self_attention_layers(unet):
        S = (h >> layer.level) * (w >> layer.level)
        total += 4 * K * S * layer.channels
    return total * torch.finfo(dtype).bits // 8


@dataclass(frozen=True)
class CallPlan:
    """One kind of UNet call planned against the budget: frames per call, records placement, peak estimate."""

    frames_per_call: int
    offload_records: bool
    vae_frames_per_call: int
    estimate: int


def plan_for(unet, dtype: torch.dtype, h: int, w: int, *, keyframes: int, batch_size: int,
             chunk_frames: int | None, max_gpu_mem: float | None, free: int, allocated: int,
             gathered_keyframes: int = 0, controlnets: int = 0, vae_dtype: torch.dtype | None = None) -> CallPlan:
    """Edit calls (keyframes > 0: three rows per frame, the keyframe pass and its records) or inversion
    calls (keyframes = 0: one row per frame) for latents h x w within the budget. `chunk_frames` (the
    user's --chunk-frames) fixes the frames per call instead. `gathered_keyframes`: on a rank of a
    distributed edit, the keyframes whose keys and values the keyframe pass gathers from every rank
    (`keyframes` is then the rank's own, plus the one before them). `controlnets`: how many ControlNets run
    in the edit's calls (not in the inversion's); `vae_dtype`: the VAE's (float32 when it is upcast)."""
    p = profile(unet)
    scale = h * w * unet.config["block_out_channels"][0] * torch.finfo(dtype).bits // 16
    rows = 3 if keyframes else 1
    control = bool(controlnets and keyframes)
    per_frame = int(rows * (p.row + (p.control_row if control else 0)) * scale)
    keyframe_pass = int((keyframes * 3 * (p.keyframe + (p.control_keyframe if control else 0))
                         + gathered_keyframes * p.gathered) * scale)
    records = records_bytes(unet, keyframes, h, w, dtype)
    per_keyframe_records = records // max(keyframes, 1)
    usable, total = budget(max_gpu_mem, free, allocated)
    usable = int(FILL * usable)
    # Records stay on the GPU while they take at most a quarter of the budget and leave room for a group.
    offload = records > total / 4 or keyframe_pass + records + batch_size * per_frame > usable
    if offload:  # each group brings its keyframe's records (and one more for the first group of a call)
        per_frame += per_keyframe_records // batch_size
        fixed = keyframe_pass + per_keyframe_records
    else:
        fixed = keyframe_pass + records
    room = usable - fixed
    if chunk_frames:
        chunk = chunk_frames
    else:
        chunk = max(1, min(room // per_frame, MAX_CHUNK_FRAMES))
        if chunk >= batch_size:
            chunk = chunk // batch_size * batch_size
    # A group call holds whole groups (at least one), at most the whole video (about keyframes x B frames).
    per_call = min(max(chunk, batch_size), keyframes * batch_size) if keyframes else chunk
    estimate = fixed + per_call * per_frame
    vae = VAE_BYTES_PER_PIXEL * 64 * h * w * torch.finfo(vae_dtype or dtype).bits // 16
    vae_frames = chunk_frames or max(1, min(usable // vae, MAX_CHUNK_FRAMES))
    if room < per_frame:
        log.warning("the keyframe pass of %d keyframes needs about %.1f GiB, beyond the %.1f GiB the planner may "
                    "fill; expect CUDA out of memory. Raise --max-gpu-mem, lower the resolution or edit the video "
                    "in parts", keyframes, estimate / 2**30, usable / 2**30)
    return CallPlan(int(chunk), bool(offload), int(vae_frames), int(estimate))


def plan_memory(models, h: int, w: int, *, keyframes: int, batch_size: int, chunk_frames: int | None,
                max_gpu_mem: float | None, gathered_keyframes: int = 0, controlnets: list | tuple = ()) -> MemoryPlan:
    """The edit's and the inversion's plan on this device's free memory; on the CPU, fixed counts and no
    offload (host memory is not planned). `gathered_keyframes`: see `plan_for`; `controlnets`: the edit's
    ControlNets (already loaded)."""
    if models.device.type != "cuda":
        n = chunk_frames or max(CPU_CHUNK_FRAMES, batch_size)
        return MemoryPlan(n, n, n, n, False)
    free, _ = torch.cuda.mem_get_info(models.device)
    allocated = torch.cuda.memory_allocated(models.device)
    common = dict(batch_size=batch_size, chunk_frames=chunk_frames, max_gpu_mem=max_gpu_mem, free=free,
                  allocated=allocated, controlnets=len(controlnets), vae_dtype=models.vae.dtype)
    edit = plan_for(models.unet, models.dtype, h, w, keyframes=keyframes, gathered_keyframes=gathered_keyframes,
                    **common)
    inversion = plan_for(models.unet, models.dtype, h, w, keyframes=0, **common)
    plan = MemoryPlan(edit.frames_per_call, edit.frames_per_call, inversion.frames_per_call,
                      edit.vae_frames_per_call, edit.offload_records, edit.estimate)
    log.info("memory plan: %s", plan.describe())
    return plan

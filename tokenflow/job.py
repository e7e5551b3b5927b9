"""One edit resolved once: frames, groups, schedule, memory plan, depth, ControlNet condition maps and backends,
from frames and config.

`TokenFlowEditor.prepare(frames, cfg)` builds an `EditJob`; `invert(job)` and `edit(job)` take it, so
nothing is validated, planned or estimated twice. Everything that can be wrong with the inputs is found
here, before any model runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenflow.batches import Batches
from tokenflow.config import EditConfig
from tokenflow.depth import depth_maps
from tokenflow.editing import EditLoop
from tokenflow.errors import TokenFlowError
from tokenflow.keyframes import make_groups, split_groups
from tokenflow.ops.backends import BackendError, resolve_forced
from tokenflow.planner import MemoryPlan, plan_memory
from tokenflow.schedule import Schedule


@dataclass
class EditJob:
    cfg: EditConfig  # validated
    frames: torch.Tensor  # uint8 [N, 3, H, W]: the frames edited (n_frames applied; the reference mode's rounding)
    groups: list[range]  # consecutive groups of batch_size frames, one keyframe each
    schedule: Schedule
    memory: MemoryPlan  # as planned; EditResult.memory_plan is what ran
    depth: torch.Tensor | None  # [N, 1, h, w] in [-1, 1] for depth models, host float32
    backends: dict[str, str | None]  # op -> backend forced by cfg.backend (None: auto)
    # The groups each rank edits (tokenflow.distributed); one range of every group in one process.
    parts: list[range] | None = None
    control: object = None  # tokenflow.control.ControlMaps in mode controlnet (settings, condition maps)
    # Frames per VAE call, shared by the encode and the decode: an OOM halving in one carries to the other.
    vae: Batches = field(init=False)

    def __post_init__(self):
        self.vae = Batches(self.memory.vae_frames_per_call, "the VAE")
        if self.parts is None:
            self.parts = [range(len(self.groups))]

    def loop(self) -> EditLoop:
        c = self.cfg
        return EditLoop(self.groups, c.batch_size, c.guidance_scale, self.schedule, c.seed)


def check_frames(frames) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        got = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise TokenFlowError(f"frames must be a uint8 tensor [N, 3, H, W]; got {got}")
    if len(frames) == 0:
        raise TokenFlowError("the video has no frames")
    H, W = frames.shape[2:]
    if H % 8 or W % 8:
        raise TokenFlowError(f"frame size {W}x{H} is not a multiple of 8 (the VAE downsamples by 8); "
                             f"resize to {W // 8 * 8}x{H // 8 * 8} (the CLI does this for you)")


def resolve(models, frames: torch.Tensor, cfg: EditConfig, depth: torch.Tensor | None = None,
            control=None, *, ranks: int = 1) -> EditJob:
    """Validate and resolve everything one edit needs on `models` (see the module docstring).

    depth: optional depth frames ([N, 1|3, H', W'], any numeric dtype) for a depth model; without them a
    depth model's estimator makes the maps.
    control: mode controlnet's given condition maps (tokenflow.control.prepare): a tensor, or a list with a
    tensor or None per ControlNet; the others are made as `cfg.control` says. The ControlNets are loaded
    and checked against the model here, before any work.
    ranks: processes sharing the edit (tokenflow.distributed): the groups are split between them and the
    memory plan is one rank's (the busiest)."""
    cfg.validate()
    check_frames(frames)
    if cfg.n_frames is not None:
        frames = frames[:cfg.n_frames]
    groups = make_groups(len(frames), cfg.batch_size, cfg.match_reference)
    frames = frames[:groups[-1].stop]
    parts = split_groups(len(groups), ranks, cfg.batch_size)
    schedule = Schedule.build(models.scheduler_config, n_inversion_steps=cfg.n_inversion_steps,
                              n_timesteps=cfg.n_timesteps, mode=cfg.mode, start=cfg.start,
                              pnp_attn_t=cfg.pnp_attn_t, pnp_f_t=cfg.pnp_f_t)
    try:  # from the backends' declared capabilities: no tensor is made
        backends = resolve_forced(cfg.backend, models.device, models.dtype)
    except BackendError as e:
        e.key = "backend"
        raise
    if cfg.mode == "depth" and not models.is_depth:
        raise TokenFlowError(f"mode 'depth' needs a depth model (5-channel UNet, e.g. "
                             f"sd2-community/stable-diffusion-2-depth); {models.name} is not one", key="mode")
    if control is not None and cfg.mode != "controlnet":
        raise TokenFlowError("condition maps were given but mode is not controlnet", key="mode")
    nets = []
    if cfg.mode == "controlnet":
        from tokenflow.control import controlnets, resolve_spec
        nets = controlnets(models, resolve_spec(cfg, models), cfg.controlnet_config)  # mismatches fail here
    h, w = frames.shape[2] // 8, frames.shape[3] // 8
    most = max(len(p) for p in parts)  # a rank also records the keyframe before its groups, and gathers every key
    memory = plan_memory(models, h, w, keyframes=most + (ranks > 1), batch_size=cfg.batch_size,
                         chunk_frames=cfg.chunk_frames, max_gpu_mem=cfg.max_gpu_mem,
                         gathered_keyframes=ranks * most if ranks > 1 else 0, controlnets=nets)
    maps = depth_maps(models, frames, depth, memory.vae_frames_per_call) if models.is_depth else None
    ctrl = None
    if cfg.mode == "controlnet":
        from tokenflow.control import prepare
        ctrl = prepare(models, cfg, frames, control, memory.vae_frames_per_call)
    return EditJob(cfg, frames, groups, schedule, memory, maps, backends, parts, ctrl)


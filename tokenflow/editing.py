"""The TokenFlow editing loop (spec sections 3 to 7): per step, a keyframe pass with extended
attention, then group passes that propagate the keyframes' self-attention outputs to every frame."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from tokenflow.batches import Batches
from tokenflow.errors import TokenFlowError
from tokenflow.inversion import model_input
from tokenflow.keyframes import blend_plan, draw_keyframes
from tokenflow.progress import bar
from tokenflow.state import GROUP, KEYFRAME, StepState

log = logging.getLogger("tokenflow")


@dataclass
class EditPlan:
    """What the loop needs beyond the models: the run's settings, resolved."""

    groups: list[range]
    batch_size: int
    guidance_scale: float
    timesteps: list[int]  # the full sampling schedule (n_timesteps of them), noisiest first
    first_step: int  # index of the first step run (SDEdit starts part-way)
    n_qk_steps: int  # Q/K injection while step index < n_qk_steps
    n_conv_steps: int
    seed: int
    groups_per_call: int  # groups sharing one UNet call in the group passes


def start_index(mode: str, start: float, timesteps: list[int], num_train: int) -> int:
    """PnP starts at the first sampling timestep. SDEdit starts at the first timestep <= start * T
    (the intended t; the reference's slicing started one step later)."""
    if mode != "sdedit":
        return 0
    for i, t in enumerate(timesteps):
        if t <= start * num_train:
            return i
    return len(timesteps) - 1


def initial_latents(sched: DDIMScheduler, x0: torch.Tensor, eps: torch.Tensor, t0: int) -> torch.Tensor:
    """x = sqrt(abar_t0) x0 + sqrt(1 - abar_t0) eps (the reference re-noises; it does not reuse the kept latent)."""
    return sched.add_noise(x0, eps, torch.tensor([t0]))


def inversion_noise(sched: DDIMScheduler, x0: torch.Tensor, x_T: torch.Tensor, T: int) -> torch.Tensor:
    """eps_T = (x_T - sqrt(abar_T) x0) / sqrt(1 - abar_T), from the noisiest kept latent."""
    a = sched.alphas_cumprod[T]
    return (x_T - a.sqrt() * x0) / (1 - a).sqrt()


def keyframe_pass(state: StepState, run, K: int) -> None:
    """Run a keyframe pass (`run()`), recording into state.records. On CUDA OOM: halve the keyframes per
    chunk down to 1, then keep the records in host memory, retrying each time (logged); then give up
    with what to change. Chunking and offloading are exact, so a retried pass gives the same result."""
    while True:
        state.records.clear()
        try:
            run()
            return
        except torch.cuda.OutOfMemoryError as e:
            state.records.clear()
            torch.cuda.empty_cache()
            chunk = min(state.keyframe_chunk or K, K)
            if chunk > 1:
                state.keyframe_chunk = chunk // 2
                log.warning("CUDA out of memory in the keyframe pass (%d keyframes, %d per chunk); retrying with %d",
                            K, chunk, state.keyframe_chunk)
            elif not state.records.offload:
                state.records.offload = True
                log.warning("CUDA out of memory in the keyframe pass; retrying with the keyframe records in host memory")
            else:
                raise TokenFlowError(
                    f"the keyframe pass of {K} keyframes does not fit the GPU even one keyframe per chunk with its "
                    "records in host memory: its self-attention needs every keyframe at once. Lower the "
                    "resolution, raise --batch-size (fewer keyframes) or edit the video in parts") from e


@torch.no_grad()
def edit_latents(models, state: StepState, plan: EditPlan, x: torch.Tensor, source_at, embs: torch.Tensor,
                 depth: torch.Tensor | None = None, progress: bool = True, checkpoint=None) -> torch.Tensor:
    """Denoise the edited latents `x` [N, 4, h, w] (host, float32) over `plan.timesteps`.

    source_at(t) -> [N, 4, h, w]: the kept inverted latents at t (the source branch is never advanced).
    embs: [3, 77, D] text embeddings of [source | uncond | cond].
    checkpoint: optional tokenflow.latent_store.EditCheckpoint: resume after the step it holds, and save
    the latents after every step.
    Returns the edited latents at t = 0 (host, float32).
    """
    sched = DDIMScheduler.from_config(models.scheduler_config)
    sched.set_timesteps(len(plan.timesteps))
    gen = torch.Generator().manual_seed(plan.seed)
    which_all, weights_all = blend_plan(plan.groups, plan.batch_size)
    dev, dt = models.device, models.dtype
    G = len(plan.groups)
    group_batches = Batches(plan.groups_per_call, "the group passes", unit="groups")

    def unet(src: torch.Tensor, lat: torch.Tensor, t: int, idx: torch.Tensor) -> torch.Tensor:
        """One UNet call on the triple batch of frames `idx`; returns the guided model output."""
        n = len(idx)
        rows = torch.cat([src[idx], lat[idx], lat[idx]]).to(dev)
        d = None if depth is None else depth[idx].repeat(3, 1, 1, 1).to(dev)
        e = embs.to(dev).repeat_interleave(n, dim=0)
        out = models.unet(model_input(rows, d).to(dt), t, encoder_hidden_states=e).sample.float()
        _, u, c = out.chunk(3)
        return u + plan.guidance_scale * (c - u)

    done = checkpoint.load() if checkpoint is not None else None
    if done is not None:
        log.info("resuming the edit after step %d of %d (%s)", done[0] + 1, len(plan.timesteps), checkpoint.path)
        x = done[1]
    try:
        for step in bar(range(plan.first_step, len(plan.timesteps)), "edit", progress, unit="step"):
            keyframes = draw_keyframes(plan.groups, plan.batch_size, gen)  # every step's draw, done or not
            if done is not None and step <= done[0]:
                continue
            t = plan.timesteps[step]
            src = source_at(t)
            state.t, state.step = t, step
            state.qk_inject = step < plan.n_qk_steps
            state.conv_inject = step < plan.n_conv_steps

            # Keyframe pass: extended attention over all keyframes; records features and outputs.
            state.kind = KEYFRAME
            keyframe_pass(state, lambda: unet(src, x, t, keyframes), len(keyframes))

            # Group passes: propagation from keyframes g and g-1; several groups may share one call.
            state.kind = GROUP
            x_next = torch.empty_like(x)

            def groups_call(first: int, stop: int):  # groups [first, stop) in one UNet call
                # Offloaded records: copy back only the keyframes these groups blend. On the device: pass
                # them whole, since a slice of [3, K, S, C] along K is not contiguous and would be copied.
                lo, hi = (max(first - 1, 0), stop) if state.records.offload else (0, G)
                idx = torch.arange(plan.groups[first].start, plan.groups[stop - 1].stop)
                which = which_all[idx]
                state.key_lo, state.key_hi = lo, hi
                state.which = torch.where(which >= 0, which - lo, which).to(dev)
                state.weights = weights_all[idx].to(dev)
                guided = unet(src, x, t, idx)
                x_next[idx] = sched.step(guided, t, x[idx].to(dev)).prev_sample.to(x_next.device)

            for _ in group_batches.run(G, groups_call):  # each batch of groups writes its frames of x_next
                pass
            x = x_next
            if checkpoint is not None:
                checkpoint.save(step, x)
    finally:  # an error or interruption mid-step must not leave the UNet in keyframe or group mode
        state.plain()
        state.records.clear()
    return x

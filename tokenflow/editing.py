"""The TokenFlow editing loop: per step, a keyframe pass with extended
attention, then group passes that propagate the keyframes' self-attention outputs to every frame."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from tokenflow.batches import Batches
from tokenflow.errors import TokenFlowError
from tokenflow.inversion import model_input
from tokenflow.keyframes import blend_weights, draw_keyframes
from tokenflow.processors import TokenFlowHooks
from tokenflow.progress import bar
from tokenflow.prompts import as_prompt_embeds
from tokenflow.schedule import Schedule
from tokenflow.state import GROUP, KEYFRAME

log = logging.getLogger("tokenflow")


@dataclass(frozen=True)
class EditLoop:
    """What the denoising loop needs beyond the models and the latents."""

    groups: list[range]
    batch_size: int
    guidance_scale: float
    schedule: Schedule
    seed: int


@dataclass
class Part:
    """The groups this process edits, and so their keyframes and frames: every group in one process; a
    contiguous range of them on each rank of a distributed edit (tokenflow.distributed.RankPart, which
    also gathers the other ranks' keys in the keyframe pass and brings the records of the keyframe
    before its first group in `exchange`)."""

    groups: range  # indices into the loop's groups
    frames: range  # the frames of those groups: the latents the loop gets and returns are these
    first_record: int  # index of the first keyframe the records hold (groups.start - 1 after the first rank)
    solo: bool = True  # False: other processes take part in every keyframe pass, so it cannot be retried alone

    @classmethod
    def whole(cls, groups: list[range]) -> "Part":
        return cls(range(len(groups)), range(groups[0].start, groups[-1].stop), 0)

    # Replaces the keyframe pass's extended attention (tokenflow.state.RunSettings.keyframe_attention).
    keyframe_attention = None

    def exchange(self, records) -> None:
        """After each keyframe pass: complete the records with the keyframes before `groups` (none here)."""


def initial_latents(sched: DDIMScheduler, x0: torch.Tensor, eps: torch.Tensor, t0: int) -> torch.Tensor:
    """x = sqrt(abar_t0) x0 + sqrt(1 - abar_t0) eps (the reference re-noises; it does not reuse the kept latent)."""
    return sched.add_noise(x0, eps, torch.tensor([t0]))


def inversion_noise(sched: DDIMScheduler, x0: torch.Tensor, x_T: torch.Tensor, T: int) -> torch.Tensor:
    """eps_T = (x_T - sqrt(abar_T) x0) / sqrt(1 - abar_T), from the noisiest kept latent."""
    a = sched.alphas_cumprod[T]
    return (x_T - a.sqrt() * x0) / (1 - a).sqrt()


def keyframe_pass(hooks: TokenFlowHooks, run, K: int, retry: bool = True) -> None:
    """Run a keyframe pass (`run()`), recording into hooks.records. On CUDA OOM: halve the keyframes per
    chunk down to 1, then keep the records in host memory, retrying each time (logged); then give up
    with what to change. Chunking and offloading are exact, so a retried pass gives the same result.
    What it changed stays in hooks.settings / hooks.records for the rest of the edit (and its report).
    retry=False (a distributed edit, whose other ranks are inside the same pass): no retry, the error."""
    settings, records = hooks.settings, hooks.records
    while True:
        records.clear()
        try:
            run()
            return
        except torch.cuda.OutOfMemoryError as e:
            records.clear()
            torch.cuda.empty_cache()
            if not retry:
                raise TokenFlowError(
                    f"CUDA out of memory in the keyframe pass ({K} keyframes on this rank); the other ranks are "
                    "in the same pass, so it is not retried with smaller chunks: set --chunk-frames lower, "
                    "lower --max-gpu-mem so the plan leaves room, or add ranks", key="chunk_frames") from e
            chunk = min(settings.keyframes_per_chunk or K, K)
            if chunk > 1:
                settings.keyframes_per_chunk = chunk // 2
                log.warning("CUDA out of memory in the keyframe pass (%d keyframes, %d per chunk); retrying with %d",
                            K, chunk, settings.keyframes_per_chunk)
            elif not records.offload:
                records.offload = True
                log.warning("CUDA out of memory in the keyframe pass; retrying with the keyframe records in host memory")
            else:
                raise TokenFlowError(
                    f"the keyframe pass of {K} keyframes does not fit the GPU even one keyframe per chunk with its "
                    "records in host memory: its self-attention needs every keyframe at once. Lower the "
                    "resolution, raise batch_size (fewer keyframes) or edit the video in parts", key="batch_size") from e


@torch.no_grad()
def edit_latents(models, hooks: TokenFlowHooks, loop: EditLoop, x: torch.Tensor, source_at, embs,
                 depth: torch.Tensor | None = None, *, group_batches: Batches, progress: bool = True,
                 checkpoint=None, part: Part | None = None, control=None) -> torch.Tensor:
    """Denoise the edited latents `x` [N, 4, h, w] (host, float32) over `loop.schedule`'s steps.

    hooks: the installed TokenFlow processors (tokenflow.processors.install), steered through hooks.state.
    source_at(t) -> [N, 4, h, w]: the kept inverted latents at t (the source branch is never advanced).
    embs: the text conditioning of [source | uncond | cond]: [3, 77, D] embeddings or a
    tokenflow.prompts.PromptEmbeds (SDXL's pooled embeddings and size numbers).
    group_batches: groups per group-pass UNet call (halved on CUDA OOM; the caller reads what ran).
    checkpoint: optional tokenflow.latent_store.EditCheckpoint: resume after the step it holds, and save
    the latents after every step.
    part: the groups this process edits (default: all); `x`, `source_at(t)`, `depth` and the result then
    hold the frames `part.frames` only.
    control: optional tokenflow.control.Control: ControlNet residuals added to every UNet call.
    Returns the edited latents at t = 0 (host, float32).
    """
    sched = loop.schedule.sampler()
    timesteps = loop.schedule.sampling
    gen = torch.Generator().manual_seed(loop.seed)
    which_all, weights_all = blend_weights(loop.groups, loop.batch_size)
    dev, dt = models.device, models.dtype
    part = part or Part.whole(loop.groups)
    f0, k0, mine = part.frames.start, part.first_record, part.groups
    st, records = hooks.state, hooks.records
    embs = as_prompt_embeds(embs)

    def unet(src: torch.Tensor, lat: torch.Tensor, t: int, idx: torch.Tensor) -> torch.Tensor:
        """One UNet call on the triple batch of frames `idx` (of this part); returns the guided model output."""
        n = len(idx)
        rows = torch.cat([src[idx], lat[idx], lat[idx]]).to(dev)
        d = None if depth is None else depth[idx].repeat(3, 1, 1, 1).to(dev)
        x_in = model_input(rows, d).to(dt)
        kw = embs.unet_kwargs(n, dev, dt)
        if control is not None:  # per row, in the keyframe pass's chunks like the UNet's per-row modules
            chunk = hooks.settings.keyframes_per_chunk if st.kind == KEYFRAME else None
            kw.update(control.unet_kwargs(x_in, t, kw, idx + f0, st.step, chunk))  # maps of every frame
        out = models.unet(x_in, t, **kw).sample.float()
        _, u, c = out.chunk(3)
        return u + loop.guidance_scale * (c - u)

    done = checkpoint.load() if checkpoint is not None else None
    if done is not None:
        log.info("resuming the edit after step %d of %d (%s)", done[0] + 1, len(timesteps), checkpoint.path)
        x = done[1]
    try:
        for step in bar(loop.schedule.steps, "edit", progress, unit="step"):
            keyframes = draw_keyframes(loop.groups, loop.batch_size, gen)  # every step's draw, done or not
            if done is not None and step <= done[0]:
                continue
            t = timesteps[step]
            src = source_at(t)
            st.t, st.step = t, step
            st.qk_inject = step < loop.schedule.n_qk_steps
            st.conv_inject = step < loop.schedule.n_conv_steps

            # Keyframe pass: extended attention over all keyframes; records features and outputs.
            st.kind = KEYFRAME
            own = keyframes[mine.start:mine.stop] - f0
            keyframe_pass(hooks, lambda: unet(src, x, t, own), len(own), retry=part.solo)
            part.exchange(records)

            # Group passes: propagation from keyframes g and g-1; several groups may share one call.
            st.kind = GROUP
            x_next = torch.empty_like(x)

            def groups_call(first: int, stop: int):  # groups [first, stop) in one UNet call
                # Offloaded records: copy back only the keyframes these groups blend. On the device: pass
                # them whole, since a slice of [3, K, S, C] along K is not contiguous and would be copied.
                lo, hi = (max(first - 1, 0), stop) if records.offload else (k0, mine.stop)
                idx = torch.arange(loop.groups[first].start, loop.groups[stop - 1].stop)
                which = which_all[idx]
                st.key_lo, st.key_hi = lo - k0, hi - k0  # records hold keyframes k0, k0 + 1, ...
                st.which = torch.where(which >= 0, which - lo, which).to(dev)
                st.weights = weights_all[idx].to(dev)
                guided = unet(src, x, t, idx - f0)
                x_next[idx - f0] = sched.step(guided, t, x[idx - f0].to(dev)).prev_sample.to(x_next.device)

            # each batch of groups writes its frames of x_next
            for _ in group_batches.run(len(mine), lambda a, b: groups_call(mine.start + a, mine.start + b)):
                pass
            x = x_next
            if checkpoint is not None:
                checkpoint.save(step, x)
    finally:  # an error or interruption mid-step must not leave the UNet in keyframe or group mode
        st.reset()
        records.clear()
    return x

"""VAE encoding/decoding and DDIM inversion of every frame."""
from __future__ import annotations

import logging
import math

import torch

from tokenflow.batches import Batches
from tokenflow.latent_store import LatentStore
from tokenflow.progress import bar
from tokenflow.prompts import as_prompt_embeds
from tokenflow.schedule import Schedule
from tokenflow.vae import run as run_vae

log = logging.getLogger("tokenflow")


def model_input(x: torch.Tensor, depth: torch.Tensor | None) -> torch.Tensor:
    """Depth models take the depth map as a fifth channel (repeated for every branch by the caller)."""
    return x if depth is None else torch.cat([x, depth.to(x)], dim=1)


@torch.no_grad()
def encode_frames(models, frames: torch.Tensor, batches: Batches | int, progress: bool = False) -> torch.Tensor:
    """uint8 frames [N, 3, H, W] -> latents [N, 4, H/8, W/8] (posterior mean x scaling), float32 on the host.
    batches: frames per VAE call, or a Batches object that keeps an OOM halving for later calls. The VAE runs
    in its own dtype (float32 where float16 overflows; tokenflow/vae.py)."""
    def encode(a, b):
        x = frames[a:b].to(models.device).float() / 127.5 - 1.0
        mean = run_vae(models, lambda v: models.vae.encode(v).latent_dist.mean, x, "encoding frames")
        return (mean.float() * models.scaling_factor).cpu()
    return torch.cat(list(Batches.of(batches).run(len(frames), encode, progress, what="encode")))


@torch.no_grad()
def decode_latents(models, latents: torch.Tensor, batches: Batches | int, progress: bool = False):
    """Latents [N, 4, h, w] -> uint8 frames [N, 3, H, W], batch by batch (a generator); `batches` as in
    `encode_frames`."""
    def decode(a, b):
        x = latents[a:b].to(models.device) / models.scaling_factor
        img = (run_vae(models, lambda v: models.vae.decode(v).sample, x, "decoding latents").float() / 2 + 0.5).clamp(0, 1)
        return (img * 255).round().to(torch.uint8).cpu()
    yield from Batches.of(batches).run(len(latents), decode, progress, what="decode")


@torch.no_grad()
def ddim_invert(models, x: torch.Tensor, emb, schedule: Schedule,
                depth: torch.Tensor | None = None, on_step=None) -> dict[int, torch.Tensor]:
    """DDIM-invert a batch of latents (guidance 1, one prompt); return the latents at the `keep` timesteps.

    At each inversion timestep t (ascending), with eps = UNet(x, t): x0 = (x - sqrt(1-a_prev) eps) / sqrt(a_prev),
    x = sqrt(a_t) x0 + sqrt(1-a_t) eps, a_prev the previous timestep's alpha (the final alpha at the first);
    diffusers' DDIMInverseScheduler does exactly this (and converts v-prediction outputs). Returns the latents
    at `schedule.kept`. emb: the prompt's [1, 77, D] embeddings or its tokenflow.prompts.PromptEmbeds.
    """
    sched = schedule.inverter()
    keep = set(schedule.kept)
    x = x.to(models.device, torch.float32)
    cond = as_prompt_embeds(emb).unet_kwargs(len(x), models.device, models.dtype)
    kept = {}
    for t in sched.timesteps:
        out = models.unet(model_input(x, depth).to(models.dtype), t, **cond).sample
        x = sched.step(out.float(), t, x).prev_sample
        if int(t) in keep:
            kept[int(t)] = x.cpu()
        if on_step is not None:
            on_step()
    return kept


def invert_into_store(models, store: LatentStore, x0: torch.Tensor, emb, schedule: Schedule,
                      depth: torch.Tensor | None, progress: bool, *, todo: list[tuple[int, int]] | None = None,
                      complete: bool = True) -> int:
    """Invert every chunk of frames the store lacks (or the chunks `todo`: one rank's share) and, with
    `complete`, mark the inversion complete; returns the number of chunks inverted."""
    n = len(x0)
    if todo is None:
        todo = [(a, b) for a, b in store.chunks(n) if not store.has_chunk(a, b)]
    done = 0
    steps = len(schedule.inversion)
    # The bar counts the steps asked for, once per chunk of frames (restarted, and named, for each chunk).
    with bar(total=steps, desc="invert", enabled=progress, unit="step") as pb:
        for a, b in store.claim(todo):  # locked while inverted; one another process made meanwhile is skipped
            if len(todo) > 1:
                pb.reset(total=steps)
                pb.set_description(f"invert frames {a}-{b - 1} of {n}")
            d = None if depth is None else depth[a:b].to(models.device)
            kept = ddim_invert(models, x0[a:b], emb, schedule, d, on_step=lambda: pb.update(1))
            store.save_chunk(a, b, kept)
            log.info("inverted frames [%d, %d) into %s", a, b, store.path)
            done += 1
    if complete:
        store.mark_complete()
    return done


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)

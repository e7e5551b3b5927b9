"""The Python API: build an editor from a model, invert a video, edit it with a prompt, get frames back.

    from tokenflow import EditConfig, TokenFlowEditor
    cfg = EditConfig(prompt="a marble sculpture of a woman running")
    editor = TokenFlowEditor.from_config(cfg)
    result = editor.edit(frames, cfg)      # frames: uint8 [N, 3, H, W], H and W multiples of 8
    result.frames                          # uint8 [N', 3, H, W]
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from tokenflow import __version__
from tokenflow.config import EditConfig
from tokenflow.depth import depth_maps
from tokenflow.editing import EditPlan, edit_latents, initial_latents, inversion_noise, start_index
from tokenflow.errors import TokenFlowError
from tokenflow.inversion import (decode_latents, encode_frames, invert_into_store, kept_timesteps, model_input,
                                 psnr, sampling_timesteps)
from tokenflow.keyframes import make_groups
from tokenflow.latent_store import EditCheckpoint, LatentStore, frames_digest
from tokenflow.models import Models, load_models, resolve_device, resolve_dtype
from tokenflow.ops.backends import resolve_forced
from tokenflow.planner import MemoryPlan, plan_memory
from tokenflow.processors import install
from tokenflow.state import KeyframeRecords, StepState

log = logging.getLogger("tokenflow")

# The settings an edit's result depends on beyond its inversion (whose store key covers model, weights,
# dtype, size, frames, depth, inversion prompt and steps): the key of its checkpoint.
EDIT_KEY_FIELDS = ("prompt", "negative_prompt", "mode", "seed", "guidance_scale", "n_timesteps", "batch_size",
                   "pnp_attn_t", "pnp_f_t", "start", "use_ddim_noise", "match_reference", "keyframe_window",
                   "backend")


@dataclass
class Inversion:
    """The inverted latents of one video, in the latent store."""

    store: LatentStore
    x0: torch.Tensor  # [N, 4, h, w] VAE latents (host, float32)
    timesteps: list[int]  # kept timesteps, ascending
    reused: bool  # every chunk was already in the store
    chunks_inverted: int
    depth: torch.Tensor | None = None  # [N, 1, h, w] depth maps the inversion used (depth models)
    reconstruction_psnr: float | None = None

    @property
    def path(self) -> Path:
        return self.store.path

    def latents_at(self, t: int) -> torch.Tensor:
        return self.store.latents_at(t, len(self.x0))


@dataclass
class EditResult:
    frames: torch.Tensor  # uint8 [N, 3, H, W]
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    peak_gpu_mem: int | None = None  # bytes, on CUDA
    inversion_reused: bool = False
    inversion_path: Path | None = None
    memory_plan: MemoryPlan | None = None  # the planner's choice (OOM retries, logged, may have shrunk it)
    resumed_steps: int = 0  # denoising steps an earlier, interrupted (or finished) run had already done


class TokenFlowEditor:
    def __init__(self, models: Models, *, cache_dir: str | Path | None = None):
        self.models = models
        self.cache_dir = cache_dir
        self.state = StepState()
        install(models.unet, self.state)

    @classmethod
    def from_config(cls, cfg: EditConfig) -> "TokenFlowEditor":
        device = resolve_device(cfg.device)
        models = load_models(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device),
                             model_config=cfg.model_config)
        return cls(models, cache_dir=cfg.cache_dir)

    # -- inputs --------------------------------------------------------------------------------------
    def _frames(self, frames: torch.Tensor, cfg: EditConfig) -> tuple[torch.Tensor, list[range]]:
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
            got = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise TokenFlowError(f"frames must be a uint8 tensor [N, 3, H, W]; got {got}")
        if len(frames) == 0:
            raise TokenFlowError("the video has no frames")
        H, W = frames.shape[2:]
        if H % 8 or W % 8:
            raise TokenFlowError(f"frame size {W}x{H} is not a multiple of 8 (the VAE downsamples by 8); "
                                 f"resize to {W // 8 * 8}x{H // 8 * 8} (the CLI does this for you)")
        if cfg.n_frames is not None:
            frames = frames[:cfg.n_frames]
        groups = make_groups(len(frames), cfg.batch_size, cfg.match_reference)
        return frames[:groups[-1].stop], groups

    def _depth(self, frames, cfg, depth, chunk):
        if not self.models.is_depth:
            if cfg.mode == "depth":
                raise TokenFlowError(f"mode 'depth' needs a depth model (5-channel UNet, e.g. "
                                     f"sd2-community/stable-diffusion-2-depth); {self.models.name} is not one")
            return None
        return depth_maps(self.models, frames, depth, chunk)

    def _key(self, frames, cfg, depth, keep: list[int]) -> dict:
        return {"model": self.models.name, "weights": self.models.fingerprint(), "dtype": str(self.models.dtype),
                "size": list(frames.shape[2:]), "frames": frames_digest(frames), "prompt": cfg.inversion_prompt,
                "steps": cfg.n_inversion_steps,
                "keep": keep,
                "depth": None if depth is None else frames_digest((depth * 127.5 + 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1))}

    # -- stages --------------------------------------------------------------------------------------
    def invert(self, frames: torch.Tensor, cfg: EditConfig, *, progress: bool = True,
               depth: torch.Tensor | None = None, _timings: dict | None = None) -> Inversion:
        """DDIM-invert `frames` (uint8 [N, 3, H, W]) into the latent store, or reuse/resume what is there."""
        cfg.validate()
        timings = {} if _timings is None else _timings
        m = self.models
        frames, _ = self._frames(frames, cfg)
        mem = plan_memory(m, cfg, frames.shape[2] // 8, frames.shape[3] // 8)
        chunk = mem.chunk_frames
        d = self._depth(frames, cfg, depth, mem.vae_frames)
        keep = kept_timesteps(m.scheduler_config, cfg.n_inversion_steps, cfg.n_timesteps)
        store = LatentStore(cfg.cache_dir or self.cache_dir, self._key(frames, cfg, d, keep), chunk)
        with _timed(timings, "encode"):
            x0 = store.load_x0()
            if x0 is None:
                store.save_x0(encode_frames(m, frames, mem.vae_frames, progress))
                x0 = store.load_x0()  # the stored copy, so a fresh and a reused inversion edit identically
        emb = m.encode_prompt([cfg.inversion_prompt])
        reused = store.complete
        with _timed(timings, "invert"):
            n = 0 if reused else invert_into_store(m, store, x0, emb, cfg.n_inversion_steps, keep, d, progress)
        inv = Inversion(store, x0, keep, reused, n, depth=d)
        if cfg.reconstruct:
            with _timed(timings, "reconstruct"):
                inv.reconstruction_psnr = self._reconstruction_psnr(frames, inv, emb, cfg, d, mem, progress)
            log.info("reconstruction PSNR: %.2f dB", inv.reconstruction_psnr)
        return inv

    @torch.no_grad()
    def _reconstruction_psnr(self, frames, inv, emb, cfg, depth, mem, progress) -> float:
        """DDIM-sample the noisiest kept latent back (no edit, guidance 1) and compare with the input."""
        m = self.models
        sched = DDIMScheduler.from_config(m.scheduler_config)
        sched.set_timesteps(cfg.n_timesteps)
        x = inv.latents_at(inv.timesteps[-1])
        chunk = mem.chunk_frames
        for t in sched.timesteps:
            for a in range(0, len(x), chunk):
                xa = x[a:a + chunk].to(m.device)
                d = None if depth is None else depth[a:a + chunk].to(m.device)
                out = m.unet(model_input(xa, d).to(m.dtype), t, encoder_hidden_states=emb.expand(len(xa), -1, -1)).sample
                x[a:a + chunk] = sched.step(out.float(), t, xa).prev_sample.cpu()
        recon = torch.cat(list(decode_latents(m, x, mem.vae_frames, progress)))
        return psnr(recon, frames)

    def edit(self, frames: torch.Tensor, cfg: EditConfig, *, progress: bool = True,
             depth: torch.Tensor | None = None, inversion: Inversion | None = None) -> EditResult:
        """Edit `frames` (uint8 [N, 3, H, W]) with `cfg.prompt`; inverts first unless the store has it."""
        cfg.validate()
        if not cfg.prompt.strip():
            raise TokenFlowError("the prompt is empty: say what the edited video should show (--prompt \"...\")")
        m = self.models
        if m.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(m.device)
        timings: dict[str, float] = {}
        frames, groups = self._frames(frames, cfg)
        # op -> backend (None: auto); a bad --backend fails here, before any work
        op_backends = resolve_forced(cfg.backend, m.device, m.dtype, source=f"--backend {cfg.backend}")
        if inversion is None:
            inversion = self.invert(frames, cfg, progress=progress, depth=depth, _timings=timings)
        mem = plan_memory(m, cfg, frames.shape[2] // 8, frames.shape[3] // 8, keyframes=len(groups))
        chunk = mem.chunk_frames
        d = inversion.depth if inversion.depth is not None else self._depth(frames, cfg, depth, mem.vae_frames)

        timesteps = sampling_timesteps(m.scheduler_config, cfg.n_timesteps)
        sched = DDIMScheduler.from_config(m.scheduler_config)
        first = start_index(cfg.mode, cfg.start, timesteps, sched.config.num_train_timesteps)
        x0 = inversion.x0
        T = inversion.timesteps[-1]
        if cfg.mode == "sdedit" and not cfg.use_ddim_noise:
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(cfg.seed))
        else:
            eps = inversion_noise(sched, x0, inversion.latents_at(T), T)
        x = initial_latents(sched, x0, eps, timesteps[first])
        plan = EditPlan(
            groups=groups, batch_size=cfg.batch_size, guidance_scale=cfg.guidance_scale, timesteps=timesteps,
            first_step=first,
            n_qk_steps=int(cfg.n_timesteps * cfg.pnp_attn_t) if cfg.mode != "sdedit" else 0,
            n_conv_steps=int(cfg.n_timesteps * cfg.pnp_f_t) if cfg.mode != "sdedit" else 0,
            seed=cfg.seed, groups_per_call=max(1, chunk // cfg.batch_size))
        embs = m.encode_prompt([cfg.inversion_prompt, cfg.negative_prompt, cfg.prompt])
        self.state.backends = op_backends
        self.state.keyframe_window = cfg.keyframe_window
        self.state.keyframe_chunk = chunk
        self.state.records = KeyframeRecords(offload=mem.offload_records)
        checkpoint = EditCheckpoint(inversion.store, {"tokenflow": __version__,
                                                       **{k: getattr(cfg, k) for k in EDIT_KEY_FIELDS}})
        if not cfg.resume:
            checkpoint.discard()
        done = checkpoint.step()
        resumed = 0 if done is None else max(0, done + 1 - first)
        with _timed(timings, "edit"):
            x = edit_latents(m, self.state, plan, x, inversion.latents_at, embs, d, progress, checkpoint)
        with _timed(timings, "decode"):
            out = torch.cat(list(decode_latents(m, x, mem.vae_frames, progress)))
        peak = torch.cuda.max_memory_allocated(m.device) if m.device.type == "cuda" else None
        return EditResult(out, timings, peak, inversion.reused, inversion.path, mem, resumed)


@contextmanager
def _timed(timings: dict, stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0

"""The Python API: build an editor from a model, invert a video, edit it with a prompt, get frames back.

    from tokenflow import EditConfig, TokenFlowEditor
    cfg = EditConfig(prompt="a marble sculpture of a woman running")
    editor = TokenFlowEditor.from_config(cfg)
    result = editor.edit(frames, cfg)      # frames: uint8 [N, 3, H, W], H and W multiples of 8
    result.frames                          # uint8 [N', 3, H, W]

The path of one edit: `prepare` resolves frames and settings into an `EditJob` (tokenflow.job) once;
`invert(job)` encodes the frames and DDIM-inverts them into the latent store (or reuses what it holds);
`edit(job)` installs the TokenFlow processors, denoises (keyframe pass, then group passes, every step),
removes them and decodes. `invert(frames, cfg)` and `edit(frames, cfg)` prepare the job themselves.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenflow import __version__
from tokenflow.batches import Batches
from tokenflow.config import EditConfig
from tokenflow.editing import Part, edit_latents, initial_latents, inversion_noise
from tokenflow.errors import TokenFlowError
from tokenflow.inversion import decode_latents, encode_frames, invert_into_store, model_input, psnr
from tokenflow.job import EditJob, resolve
from tokenflow.latent_store import EditCheckpoint, LatentStore, frames_digest
from tokenflow.models import Models, load_models, resolve_device, resolve_dtype
from tokenflow.planner import MemoryPlan
from tokenflow.processors import TokenFlowHooks, install
from tokenflow.state import KeyframeRecords, RunSettings

log = logging.getLogger("tokenflow")

# The settings an edit's result depends on beyond its inversion (whose store key covers model, weights,
# dtype, size, frames, depth, inversion prompt and steps): the key of its checkpoint.
# The ControlNets' condition maps join the key by content (a given video may change under the same name).
EDIT_KEY_FIELDS = ("prompt", "negative_prompt", "mode", "seed", "guidance_scale", "n_timesteps", "batch_size",
                   "pnp_attn_t", "pnp_f_t", "start", "use_ddim_noise", "match_reference", "keyframe_window",
                   "backend", "controlnet", "control", "controlnet_conditioning_scale", "guess_mode",
                   "control_guidance_start", "control_guidance_end")


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

    def latents_at(self, t: int, frames: range | None = None) -> torch.Tensor:
        """The kept latents at t of every frame, or of `frames` only."""
        return self.store.latents_at(t, len(self.x0), frames)


@dataclass
class EditResult:
    frames: torch.Tensor  # uint8 [N, 3, H, W]
    latents: torch.Tensor  # [N, 4, h, w] the edited latents at t = 0 (host, float32), before decoding
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    peak_gpu_mem: int | None = None  # bytes, on CUDA
    inversion_reused: bool = False
    inversion_path: Path | None = None
    memory_plan: MemoryPlan | None = None  # the plan that ran (OOM retries included)
    resumed_steps: int = 0  # denoising steps an earlier, interrupted (or finished) run had already done
    checkpoint: Path | None = None  # this edit's checkpoint in the store (None: not written): a rerun only decodes


class TokenFlowEditor:
    def __init__(self, models: Models, *, cache_dir: str | Path | None = None):
        self.models = models
        self.cache_dir = cache_dir
        self.hooks: TokenFlowHooks | None = None  # installed while an edit runs

    @classmethod
    def from_config(cls, cfg: EditConfig) -> "TokenFlowEditor":
        return cls(models_for(cfg), cache_dir=cfg.cache_dir)

    def prepare(self, frames: torch.Tensor, cfg: EditConfig, *, depth: torch.Tensor | None = None,
                control=None) -> EditJob:
        """Resolve `frames` (uint8 [N, 3, H, W]) and `cfg` into an EditJob for `invert` and `edit`.
        depth: depth frames for a depth model; control: mode controlnet's given condition maps, a tensor
        [N, 1|3, H', W'] or a list with one (or None: made as cfg.control says) per ControlNet."""
        return resolve(self.models, frames, cfg, depth, control)

    def _job(self, frames, cfg, depth, control=None) -> EditJob:
        if isinstance(frames, EditJob):
            if cfg is not None or depth is not None or control is not None:
                raise TypeError("an EditJob carries its config, depth and condition maps: pass the job alone")
            return frames
        if cfg is None:
            raise TypeError("give the frames with an EditConfig, or a job from prepare()")
        return self.prepare(frames, cfg, depth=depth, control=control)

    # -- stages --------------------------------------------------------------------------------------
    def invert(self, frames: torch.Tensor | EditJob, cfg: EditConfig | None = None, *, progress: bool = True,
               depth: torch.Tensor | None = None, control=None, _timings: dict | None = None) -> Inversion:
        """DDIM-invert the job's frames into the latent store, or reuse/resume what is there (without
        ControlNets: one inversion serves plain and ControlNet edits)."""
        job = self._job(frames, cfg, depth, control)
        cfg = job.cfg
        timings = {} if _timings is None else _timings
        m = self.models
        store = LatentStore(cfg.cache_dir or self.cache_dir, self._store_key(job),
                            job.memory.inversion_frames_per_call, max_size=cfg.cache_max_size)
        with _timed(timings, "encode"):
            x0 = store.load_x0()
            if x0 is None:
                store.save_x0(encode_frames(m, job.frames, job.vae, progress))
                x0 = store.load_x0()  # the stored copy, so a fresh and a reused inversion edit identically
        emb = m.prompt_embeds([cfg.inversion_prompt], tuple(job.frames.shape[2:]))
        reused = store.complete
        with _timed(timings, "invert"):
            n = 0 if reused else invert_into_store(m, store, x0, emb, job.schedule, job.depth, progress)
        inv = Inversion(store, x0, list(job.schedule.kept), reused, n, depth=job.depth)
        if cfg.reconstruct:
            with _timed(timings, "reconstruct"):
                inv.reconstruction_psnr = self._reconstruction_psnr(job, inv, emb, progress)
            log.info("reconstruction PSNR: %.2f dB", inv.reconstruction_psnr)
        return inv

    def _store_key(self, job: EditJob) -> dict:
        m, cfg, d = self.models, job.cfg, job.depth
        return {"model": m.name, "weights": m.fingerprint(), "dtype": str(m.dtype),
                "size": list(job.frames.shape[2:]), "frames": frames_digest(job.frames), "prompt": cfg.inversion_prompt,
                "steps": cfg.n_inversion_steps, "keep": list(job.schedule.kept),
                "depth": None if d is None else frames_digest((d * 127.5 + 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1))}

    @torch.no_grad()
    def _reconstruction_psnr(self, job: EditJob, inv: Inversion, emb, progress: bool) -> float:
        """DDIM-sample the noisiest kept latent back (no edit, guidance 1) and compare with the input."""
        m = self.models
        sched = job.schedule.sampler()
        x = inv.latents_at(job.schedule.noisiest_kept)
        chunk = job.memory.inversion_frames_per_call
        for t in sched.timesteps:
            for a in range(0, len(x), chunk):
                xa = x[a:a + chunk].to(m.device)
                d = None if job.depth is None else job.depth[a:a + chunk].to(m.device)
                out = m.unet(model_input(xa, d).to(m.dtype), t, **emb.unet_kwargs(len(xa), m.device, m.dtype)).sample
                x[a:a + chunk] = sched.step(out.float(), t, xa).prev_sample.cpu()
        recon = torch.cat(list(decode_latents(m, x, job.vae, progress)))
        return psnr(recon, job.frames)

    def edit(self, frames: torch.Tensor | EditJob, cfg: EditConfig | None = None, *, progress: bool = True,
             depth: torch.Tensor | None = None, inversion: Inversion | None = None, control=None) -> EditResult:
        """Edit the job's frames with its prompt; inverts first unless `inversion` is given or stored.
        `depth`, `control`: as in `prepare`."""
        job = self._job(frames, cfg, depth, control)
        cfg = job.cfg
        if not cfg.prompt.strip():
            raise TokenFlowError("the prompt is empty: say what the edited video should show", key="prompt")
        m = self.models
        if m.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(m.device)
        timings: dict[str, float] = {}
        if inversion is None:
            inversion = self.invert(job, progress=progress, _timings=timings)
        schedule = job.schedule
        sched = schedule.sampler()
        part = self._part(job)
        own = slice(part.frames.start, part.frames.stop)  # every frame, unless this is one rank of several
        x0 = inversion.x0[own]
        T = schedule.noisiest_kept
        if cfg.mode == "sdedit" and not cfg.use_ddim_noise:
            eps = torch.randn(inversion.x0.shape, generator=torch.Generator().manual_seed(cfg.seed))[own]
        else:
            eps = inversion_noise(sched, x0, inversion.latents_at(T, part.frames), T)
        x = initial_latents(sched, x0, eps, schedule.sampling[schedule.first_step])
        embs = m.prompt_embeds([cfg.inversion_prompt, cfg.negative_prompt, cfg.prompt], tuple(job.frames.shape[2:]))
        ctrl = None
        if job.control is not None:
            from tokenflow.control import Control, controlnets
            ctrl = Control(controlnets(m, job.control.spec, cfg.controlnet_config), job.control, schedule.steps)
        plan = job.memory
        settings = RunSettings(dict(job.backends), cfg.keyframe_window, plan.keyframes_per_chunk,
                               part.keyframe_attention)
        group_batches = Batches(max(1, plan.frames_per_call // cfg.batch_size), "the group passes", unit="groups")
        key = {"tokenflow": __version__, **{k: getattr(cfg, k) for k in EDIT_KEY_FIELDS}}
        if job.control is not None:
            key["control_maps"] = job.control.digest()
        checkpoint = self._checkpoint(inversion.store, key, part)
        if not cfg.resume:
            checkpoint.discard()
        done = checkpoint.step()
        resumed = 0 if done is None else max(0, done + 1 - schedule.first_step)
        records = KeyframeRecords(plan.offload_records, lead=part.groups.start - part.first_record)
        depth = None if job.depth is None else job.depth[own]
        with _timed(timings, "edit"), install(m.unet, settings, records) as hooks:
            self.hooks = hooks
            try:
                x = edit_latents(m, hooks, job.loop(), x, lambda t: inversion.latents_at(t, part.frames), embs, depth,
                                 group_batches=group_batches, progress=progress, checkpoint=checkpoint, part=part,
                                 control=ctrl)
            finally:
                self.hooks = None
        with _timed(timings, "decode"):
            out = torch.cat(list(decode_latents(m, x, job.vae, progress)))
        ran = dataclasses.replace(
            plan, frames_per_call=group_batches.size * cfg.batch_size, keyframes_per_chunk=settings.keyframes_per_chunk,
            vae_frames_per_call=job.vae.size, offload_records=hooks.records.offload)
        peak = torch.cuda.max_memory_allocated(m.device) if m.device.type == "cuda" else None
        return self._finish(job, part, EditResult(out, x, timings, peak, inversion.reused, inversion.path, ran, resumed,
                                                      checkpoint.path if checkpoint.path.is_file() else None))

    # -- what a distributed edit changes (tokenflow.distributed.DistributedEditor) ------------------------
    def _part(self, job: EditJob) -> Part:
        """The groups this process edits: all of them."""
        return Part.whole(job.groups)

    def _checkpoint(self, store: LatentStore, key_fields: dict, part: Part) -> EditCheckpoint:
        return EditCheckpoint(store, key_fields)

    def _finish(self, job: EditJob, part: Part, result: EditResult) -> EditResult:
        return result


def models_for(cfg: EditConfig, device: torch.device | None = None):
    """The models `cfg` names (model, VAE, ControlNets) on `device` (default: cfg.device's)."""
    device = device or resolve_device(cfg.device)
    models = load_models(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device),
                         model_config=cfg.model_config, vae=cfg.vae)
    if cfg.mode == "controlnet":  # loaded and checked against the model now (prepare finds them loaded)
        from tokenflow.control import controlnets, resolve_spec
        controlnets(models, resolve_spec(cfg.validate(), models), cfg.controlnet_config)
    return models


@contextmanager
def _timed(timings: dict, stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0

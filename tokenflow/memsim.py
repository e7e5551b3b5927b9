"""Simulated GPU memory of the editing loop, without a GPU: the real loop on the meta device.

The model is rebuilt from its config on the meta device (shapes only, no data), the TokenFlow processors
are installed as for an edit, and `edit_latents` runs its first denoising step(s) with every tensor on
meta, under a dispatch mode that adds up the bytes of the storages alive at each moment. What the
device holds is modelled as a fused backend would allocate it on a GPU:
  - `tokenflow.ops` on meta tensors call their registered operators, whose fake implementations allocate
    just the output (the Triton and CUDA kernels allocate nothing else);
  - PyTorch SDPA is replaced by an output-sized allocation plus a float32 log-sum-exp per row (flash and
    memory-efficient attention; the meta kernel would materialise the [L, L] matrix);
  - offloaded keyframe records live outside the tracked device memory, and each group pass's window
    of them is a tracked copy, as the host-to-device copy is on a GPU;
  - one rank of a distributed edit (`world` > 1, tokenflow.distributed): only its frames and keyframes run,
    and the collectives allocate what they would receive (the all-gathered keys and values of every
    rank's keyframes, the previous rank's last keyframe's records) without communicating.

Not modelled: the CUDA caching allocator's rounding and fragmentation, cuBLAS / cuDNN workspaces and the
CUDA context (a few hundred MB), so a GPU's `max_memory_allocated` reads somewhat higher and
`nvidia-smi` higher still. Numbers from here are labelled "simulated" wherever they are reported.

    from tokenflow.memsim import simulate_edit
    sim = simulate_edit(models.unet.config, frames=400, height=512, width=512, chunk_frames=16)
    sim.peak_bytes, sim.weights_bytes, sim.peak_at

SDXL-shaped UNets get SDXL's added conditioning (pooled embeddings, size numbers); `controlnets=k` adds k
ControlNets made from the UNet's config (tokenflow.control: residuals on the edited rows, the ControlNet
run in the keyframe pass's chunks), their weights counted in `weights_bytes`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from tokenflow.state import KeyframeRecords

META = torch.device("meta")


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created while active and still alive; `peak` is the most at any moment.

    A storage counts from the op that creates it (outputs that alias an input, i.e. views, do not) until
    its last reference dies (a weakref finalizer on the storage)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_at = ""  # the op and the pass kind at the peak, for reports
        self.peak_in: dict[str, int] = {}  # the peak while each pass kind ran
        self.where = lambda: ""
        self._sizes: dict[int, int] = {}

    def _free(self, key: int, n: int) -> None:
        if self._sizes.pop(key, None) is not None:
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._sizes or key in inputs:
                continue
            n = st.nbytes()
            self._sizes[key] = n
            self.live += n
            weakref.finalize(st, self._free, key, n)
        where = self.where()
        if self.live > self.peak_in.get(where, 0):
            self.peak_in[where] = self.live
        if self.live > self.peak:
            self.peak = self.live
            self.peak_at = f"{func} ({where})"
        return out


class HostRecords(KeyframeRecords):
    """Offloaded records in a simulation: kept outside the tracked memory, windows copied in (tracked)."""

    def _keep(self, key, t):
        shape = list(t.shape)
        shape[0 if key[1] == "feats" else 1] += self.lead
        with _disable_current_modes():
            return torch.empty(shape, dtype=t.dtype, device=META)

    def take(self, layer, lo, hi, device):
        f, o = super().take(layer, lo, hi, device)
        return f.clone(), o.clone()


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    query.new_empty(query.shape[:-1], dtype=torch.float32)  # the log-sum-exp flash attention keeps per row
    return query.new_empty(*query.shape[:-1], value.shape[-1])


@contextlib.contextmanager
def _flash_attention():
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_like_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@dataclass
class SimulatedMemory:
    peak_bytes: int  # activations, records and inputs alive at once during the simulated work
    weights_bytes: int  # the UNet's (and ControlNets') parameters and buffers (the VAE and text encoders are not counted)
    peak_at: str  # the op and the pass (keyframe / group) where the peak was reached
    rank: int = 0  # the rank simulated (world > 1)
    frames: int = 0  # the frames it edits
    keyframes: int = 0  # its own keyframes
    gathered_bytes_per_step: int = 0  # keys and values it would receive per keyframe pass
    boundary_bytes_per_step: int = 0  # records of the previous rank's last keyframe it would receive
    peak_in: dict = dataclasses.field(default_factory=dict)  # pass kind (keyframe, group) -> its peak bytes

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.weights_bytes


def weights_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of `modules` (what they hold on the device before any call)."""
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def _meta_model(cls, config, dtype: torch.dtype):
    with torch.device(META):
        model = cls.from_config(dict(config))
    # nn.Module.to: diffusers' own warns about keeping fp32 modules, which a from-config model has none of.
    return torch.nn.Module.to(model, dtype).eval().requires_grad_(False)


def meta_unet(config, dtype: torch.dtype = torch.float16):
    """The UNet of `config` (a diffusers UNet2DConditionModel config) on the meta device, in `dtype`."""
    from diffusers import UNet2DConditionModel

    return _meta_model(UNet2DConditionModel, config, dtype)


def meta_controlnet(unet, dtype: torch.dtype = torch.float16):
    """A ControlNet for `unet` (diffusers' ControlNetModel.from_unet, as the released ones are shaped) on meta."""
    from diffusers import ControlNetModel

    with torch.device(META):
        net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return torch.nn.Module.to(net, dtype).eval().requires_grad_(False)


def meta_prompts(unet_config, dtype: torch.dtype, n: int = 3):
    """Text conditioning of n prompts on meta: embeddings, and for SDXL pooled embeddings and size numbers."""
    from tokenflow.prompts import PromptEmbeds
    from tokenflow.sdxl import is_sdxl_unet

    c = dict(unet_config)
    with _disable_current_modes():
        embeds = torch.empty(n, 77, c["cross_attention_dim"], device=META, dtype=dtype)
        if not is_sdxl_unet(c):
            return PromptEmbeds(embeds)
        pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        return PromptEmbeds(embeds, torch.empty(n, pooled, device=META, dtype=dtype),
                            torch.empty(6, device=META, dtype=dtype))


@torch.no_grad()
def simulate_vae(vae_config, *, frames: int, height: int, width: int,
                 dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Peak bytes of encoding `frames` frames of height x width pixels and of decoding their latents, each
    on its own as the pipeline runs them (inputs and weights not counted)."""
    from diffusers import AutoencoderKL

    vae = _meta_model(AutoencoderKL, vae_config, dtype)
    out = {}
    with _disable_current_modes():
        x = torch.empty(frames, 3, height, width, device=META, dtype=dtype)
        z = torch.empty(frames, vae.config.latent_channels, height // 8, width // 8, device=META, dtype=dtype)
    for name, run in (("encode", lambda: vae.encode(x).latent_dist.mean), ("decode", lambda: vae.decode(z).sample)):
        with LiveBytes() as tracker, _flash_attention():
            run()
        out[name] = tracker.peak
    return out


@torch.no_grad()
def simulate_edit(unet_config, *, frames: int, height: int, width: int, chunk_frames: int, batch_size: int = 8,
                  offload_records: bool = False, dtype: torch.dtype = torch.float16,
                  qk_injection: bool = True, steps: int = 1, scheduler_config: dict | None = None,
                  world: int = 1, rank: int | None = None, controlnets: int = 0) -> SimulatedMemory:
    """Peak device memory of `steps` PnP editing steps of a `frames`-frame video at height x width pixels,
    with `chunk_frames` frames per group-pass UNet call and per keyframe chunk (the planner's `chunk`),
    and `controlnets` ControlNets. world > 1: of one rank of a distributed edit (`rank`, default the
    busiest: the most keyframes, counting the one it receives), whose peak is reported."""
    from tokenflow.batches import Batches
    from tokenflow.editing import EditLoop, Part, edit_latents
    from tokenflow.keyframes import make_groups, split_groups
    from tokenflow.models import Models
    from tokenflow.processors import install
    from tokenflow.schedule import Schedule
    from tokenflow.state import RunSettings
    from tokenflow.tiny import sd_scheduler_config

    unet = meta_unet(unet_config, dtype)
    sched = scheduler_config or sd_scheduler_config()
    n = max(steps, 1)
    schedule = Schedule.build(sched, n_inversion_steps=n, n_timesteps=n, pnp_attn_t=1.0 if qk_injection else 0.0,
                              pnp_f_t=1.0)
    groups = make_groups(frames, batch_size, False)
    part, comm = Part.whole(groups), None
    if world > 1:
        from tokenflow.distributed_edit import simulated_part
        parts = split_groups(len(groups), world, batch_size)
        if rank is None:
            rank = max(range(world), key=lambda r: (len(parts[r]) + (r > 0), -r))
        part, comm = simulated_part(groups, parts, rank)
    lead = part.groups.start - part.first_record
    records = HostRecords(offload=True, lead=lead) if offload_records else KeyframeRecords(lead=lead)
    hooks = install(unet, RunSettings(keyframes_per_chunk=chunk_frames, keyframe_attention=part.keyframe_attention),
                    records)
    loop = EditLoop(groups, batch_size, 7.5, schedule, seed=0)
    frames = len(part.frames)
    group_batches = Batches(max(1, chunk_frames // batch_size), "the group passes", unit="groups")
    h, w = height // 8, width // 8
    c_in = unet.config.in_channels
    depth = torch.empty(frames, 1, h, w, device=META) if c_in == 5 else None
    models = Models(None, None, None, unet, sched, "meta")
    embs = meta_prompts(unet.config, dtype)
    control, nets = None, [meta_controlnet(unet, dtype) for _ in range(controlnets)]
    if nets:
        from tokenflow.control import Control, ControlMaps, ControlSpec
        spec = ControlSpec(("meta",) * len(nets), ("canny",) * len(nets), (1.0,) * len(nets), (0.0,) * len(nets),
                           (1.0,) * len(nets), False)
        with _disable_current_modes():  # condition maps stay on the host until a call takes its frames
            maps = [torch.empty(groups[-1].stop, 3, height, width, dtype=torch.uint8, device=META)
                    for _ in nets]  # every frame's: a rank's calls index them by frame
        control = Control(nets, ControlMaps(spec, maps), schedule.steps)
    tracker = LiveBytes()
    tracker.where = lambda: hooks.state.kind
    with tracker, _flash_attention():
        # Inputs of the loop as the GPU sees them: the latents stay on the host, so they start outside.
        with _disable_current_modes():
            x = torch.empty(frames, 4, h, w, device=META)
            src = torch.empty(frames, 4, h, w, device=META)
        edit_latents(models, hooks, loop, x, lambda t: src, embs, depth, group_batches=group_batches, progress=False,
                     part=part, control=control)
    hooks.remove()
    per_step = {} if comm is None else {k: getattr(comm.stats, k) // max(comm.stats.steps, 1)
                                        for k in ("gathered_bytes", "boundary_bytes")}
    return SimulatedMemory(tracker.peak, weights_bytes(unet, *nets), tracker.peak_at, rank or 0, frames,
                           len(part.groups), per_step.get("gathered_bytes", 0), per_step.get("boundary_bytes", 0),
                           {k: v for k, v in tracker.peak_in.items() if k in ("keyframe", "group")})

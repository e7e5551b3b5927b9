"""ControlNet editing (mode `controlnet`): TokenFlow with one or several diffusers ControlNets.

The TokenFlow mechanism is unchanged: a keyframe pass with extended attention, then group passes that
propagate the keyframes' self-attention outputs, in the same UNet calls. A ControlNet runs before each of
those calls on the same rows and its residuals go into the UNet as diffusers adds them
(`down_block_additional_residuals`, `mid_block_additional_residual`). The ControlNet itself is a per-row
module: its own attention sees one frame, and in the keyframe pass it runs in the chunks of keyframes the
other per-row modules run in (tokenflow/chunking.py), so its memory follows the chunk, not K.

Rows. A call holds [source | uncond | cond] rows. The edited rows (uncond, cond) get control, each with
its own text conditioning, as diffusers' pipeline with classifier-free guidance; with `guess_mode` only
the cond rows do and the uncond rows get zeros, as diffusers does. The source rows never get control: the
source branch replays the inversion's trajectory, computed without a ControlNet, and supplies the features
PnP injects; it stays what the plain edit has, and one inversion serves plain and ControlNet edits.

Default combination: ControlNet plus PnP injection (`pnp_attn_t`, `pnp_f_t` as in mode pnp), so mode
controlnet is the PnP edit with the ControlNets added: an all-zero ControlNet gives exactly the plain
edit, and the inversion-based start with injection keeps the source's layout and appearance while the
condition maps pin its edges or depth. For edits that change shapes, turn injection down (`pnp_attn_t 0
pnp_f_t 0`) and let the ControlNets alone carry the structure.

Settings, named as diffusers' ControlNet pipeline names them: `controlnet_conditioning_scale`,
`guess_mode`, `control_guidance_start`, `control_guidance_end` (fractions of the steps the edit runs,
per ControlNet or one for all; a ControlNet outside its window is not run). Several ControlNets add their
residuals, as diffusers' MultiControlNetModel does (here a loop, so a ControlNet outside its window costs
nothing).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenflow import control_maps
from tokenflow.errors import ModelNotFoundError, TokenFlowError

log = logging.getLogger("tokenflow")

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_CANNY = "lllyasviel/control_v11p_sd15_canny"
# The ControlNet mode controlnet uses when none is given, by the model's family (tokenflow.models.family).
DEFAULT_CONTROLNETS = {"SD 1.x": SD15_CANNY, "SDXL": "diffusers/controlnet-canny-sdxl-1.0"}
TINY = "tiny-random"  # a ControlNet made from a tiny model's UNet (tokenflow.tiny.build_tiny_controlnet)
# Condition maps a ControlNet takes, told by its name when `control` is not given.
NAME_HINTS = (("canny", "canny"), ("depth", "depth"), ("softedge", "softedge"), ("hed", "softedge"),
              ("pidi", "softedge"))
# Without accelerate diffusers loads this way anyway, after a warning that says so on every load.
QUIET = {"low_cpu_mem_usage": False}
KEYS = ("controlnet", "control", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")


def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass(frozen=True)
class ControlSpec:
    """The ControlNets of an edit, resolved: one entry per ControlNet in every tuple."""

    names: tuple[str, ...]
    controls: tuple[str, ...]  # canny | depth | softedge | a video or frame folder
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool

    def scales_at(self, i: int, n: int) -> list[float]:
        """Each ControlNet's scale at step i of the n steps an edit runs (diffusers' `controlnet_keep`)."""
        return [s * (0.0 if (i / n < a or (i + 1) / n > b) else 1.0)
                for s, a, b in zip(self.scales, self.starts, self.ends)]


def _per_net(cfg, key: str, n: int, cast) -> list:
    values = as_list(getattr(cfg, key))
    if len(values) not in (1, n):
        raise TokenFlowError(f"{key} has {len(values)} values for {n} ControlNets: give one, or one per ControlNet",
                             key=key)
    try:
        values = [cast(v) for v in values]
    except (TypeError, ValueError):
        raise TokenFlowError(f"{key} {getattr(cfg, key)!r} must be a number or a list of numbers", key=key) from None
    return values * n if len(values) == 1 else values


def check_config(cfg) -> None:
    """What can be checked without the model (EditConfig.validate calls this)."""
    names, controls = as_list(cfg.controlnet), as_list(cfg.control)
    if cfg.mode != "controlnet":
        if names or controls:
            raise TokenFlowError(f"{'controlnet' if names else 'control'} is set but mode is {cfg.mode!r}: "
                                 f"ControlNets run in mode controlnet", key="mode")
        return
    if not all(isinstance(v, str) and v.strip() for v in names + controls):
        raise TokenFlowError("controlnet and control take names (or paths), one per ControlNet", key="controlnet")
    n = max(len(names), 1)
    if controls and len(controls) != n:
        raise TokenFlowError(f"control has {len(controls)} entries for {n} ControlNets: give one per ControlNet "
                             f"(canny, depth, softedge or a video)", key="control")
    if any(s < 0 for s in _per_net(cfg, "controlnet_conditioning_scale", n, float)):
        raise TokenFlowError("controlnet_conditioning_scale must be >= 0", key="controlnet_conditioning_scale")
    for a, b in zip(_per_net(cfg, "control_guidance_start", n, float), _per_net(cfg, "control_guidance_end", n, float)):
        if not 0.0 <= a < b <= 1.0:
            raise TokenFlowError(f"control_guidance_start {a} and control_guidance_end {b} must satisfy 0 <= start < "
                                 f"end <= 1 (fractions of the steps)", key="control_guidance_start")


def default_controlnet(models) -> str:
    from tokenflow.models import TINY_VARIANTS

    if models.name in TINY_VARIANTS:
        return TINY
    if models.family not in DEFAULT_CONTROLNETS:
        raise TokenFlowError(f"there is no default ControlNet for {models.family} ({models.name}): give one trained "
                             f"for it (--controlnet ID_OR_DIR)", key="controlnet")
    return DEFAULT_CONTROLNETS[models.family]


def kind_of(name: str) -> str:
    """The condition maps a ControlNet takes, told by its name (canny, depth, softedge)."""
    if name == TINY:
        return "canny"
    base = Path(name).name.lower()
    for hint, kind in NAME_HINTS:
        if hint in base:
            return kind
    raise TokenFlowError(f"cannot tell from its name which condition maps ControlNet {name} takes: say "
                         f"--control canny|depth|softedge|VIDEO", key="control")


def resolve_spec(cfg, models) -> ControlSpec:
    """The complete settings of the edit's ControlNets on `models` (defaults filled in)."""
    check_config(cfg)
    names = as_list(cfg.controlnet) or [default_controlnet(models)]
    n = len(names)
    controls = as_list(cfg.control) or [kind_of(name) for name in names]
    return ControlSpec(tuple(names), tuple(controls),
                       *(tuple(_per_net(cfg, k, n, float)) for k in KEYS[2:]), bool(cfg.guess_mode))


# -- loading -----------------------------------------------------------------------------------------

def controlnets(models, spec: ControlSpec, config_dir: str | None = None) -> list:
    """The ControlNets of `spec` on the model's device and dtype, loaded once per `models` and checked
    against its UNet."""
    nets = []
    for name in spec.names:
        if name not in models.controlnets:
            net = _load(name, models, config_dir)
            check_compatible(net, name, models)
            if net.dtype != models.dtype:  # nn.Module.to: diffusers' own warns about fp32 modules it has none of
                torch.nn.Module.to(net, models.dtype)
            models.controlnets[name] = net.to(models.device).eval().requires_grad_(False)
        nets.append(models.controlnets[name])
    return nets


def _not_found(name: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"ControlNet {name!r} could not be loaded ({why}). Download it on a connected machine (`hf download {name}`) "
        f"into the Hugging Face cache, pass a local folder (--controlnet /path/to/controlnet), or a single file with "
        f"its config folder (--controlnet model.safetensors --controlnet-config DIR)", key="controlnet")


def _load(name: str, models, config_dir: str | None):
    from diffusers import ControlNetModel

    from tokenflow.models import SINGLE_FILE_SUFFIXES, TINY_VARIANTS, cache_then_hub, offline

    if name == TINY:
        if models.name not in TINY_VARIANTS:
            raise TokenFlowError(f"controlnet {TINY} is a random ControlNet for the tiny test models; model "
                                 f"{models.name} needs a real one", key="controlnet")
        from tokenflow.tiny import build_tiny_controlnet
        return build_tiny_controlnet(models.unet)
    path = Path(name).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise _not_found(name, "no such file")
        if not config_dir and offline():
            raise TokenFlowError(f"single-file ControlNet {path.name} needs controlnet_config offline: a folder with "
                                 f"its config.json (e.g. the diffusers ControlNet it was converted from)",
                                 key="controlnet_config")
        try:
            return ControlNetModel.from_single_file(str(path), local_files_only=bool(config_dir),
                                                    **({"config": config_dir} if config_dir else {}))
        except (OSError, ValueError) as e:
            raise _not_found(name, str(e).splitlines()[0]) from None
    if path.exists() or name.startswith((".", "/", "~")):
        sub = None if (path / "config.json").is_file() else "controlnet" if (path / "controlnet" / "config.json").is_file() \
            else False
        if sub is False:
            raise _not_found(name, "not a diffusers ControlNet folder: it has no config.json")
        return ControlNetModel.from_pretrained(str(path), subfolder=sub, local_files_only=True, **QUIET)
    if name.count("/") != 1:
        raise _not_found(name, "neither a local path nor a hub id of the form owner/name")

    def load(local_only: bool):
        try:
            with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                return ControlNetModel.from_pretrained(name, local_files_only=local_only, **QUIET)
        except (OSError, ValueError) as e:
            raise _not_found(name, "not in the local cache" if local_only else str(e).splitlines()[0]) from None
    return cache_then_hub(name, load)


def _layers(config) -> tuple:
    c = dict(config)
    t = c.get("transformer_layers_per_block", 1)
    n = len(c["down_block_types"])
    return tuple(t) if isinstance(t, (list, tuple)) else (t,) * n


def check_compatible(net, name: str, models) -> None:
    """One line naming the mismatch when the ControlNet cannot drive this model's UNet (base family,
    text width, latent channels, block widths and depths): before any work is done."""
    from tokenflow.models import family

    u, c = dict(models.unet.config), dict(net.config)
    fam_u, fam_c = family(u), family(c)
    if fam_u != fam_c or u.get("cross_attention_dim") != c.get("cross_attention_dim"):
        problem = (f"ControlNet {name} is made for {fam_c} (text width {c.get('cross_attention_dim')}) but model "
                   f"{models.name} is {fam_u} (text width {u.get('cross_attention_dim')})")
    elif u["in_channels"] != c["in_channels"]:
        problem = (f"ControlNet {name} takes {c['in_channels']}-channel latents but model {models.name}'s UNet takes "
                   f"{u['in_channels']} (a depth model cannot take a ControlNet)")
    elif (tuple(u["block_out_channels"]), tuple(u["down_block_types"]), u["layers_per_block"], _layers(u)) != \
            (tuple(c["block_out_channels"]), tuple(c["down_block_types"]), c["layers_per_block"], _layers(c)):
        problem = (f"ControlNet {name}'s residuals do not fit model {models.name}'s UNet (block widths "
                   f"{list(c['block_out_channels'])} vs {list(u['block_out_channels'])}, depths {list(_layers(c))} vs "
                   f"{list(_layers(u))})")
    else:
        return
    fix = DEFAULT_CONTROLNETS.get(fam_u)
    raise TokenFlowError(f"{problem}: use a ControlNet trained on {fam_u}{f' (e.g. {fix})' if fix else ''}"
                         f"{' or the model it was trained on (e.g. ' + SD15 + ')' if fam_c == 'SD 1.x' else ''}",
                         key="controlnet")


# -- the edit ----------------------------------------------------------------------------------------

@dataclass
class ControlMaps:
    """An edit's ControlNet settings and condition maps (uint8 [N, 3, H, W] per ControlNet, host)."""

    spec: ControlSpec
    maps: list[torch.Tensor]

    def digest(self) -> str:
        from tokenflow.latent_store import frames_digest
        return ",".join(frames_digest(m) for m in self.maps)


def prepare(models, cfg, frames: torch.Tensor, given, chunk: int, progress: bool = False) -> ControlMaps:
    """Resolve the settings, load and check the ControlNets, and make or fit their condition maps.
    `given`: None, a tensor (one ControlNet), or a list with a tensor or None per ControlNet (maps read
    from videos by the caller; None: made as `control` says)."""
    spec = resolve_spec(cfg, models)
    controlnets(models, spec, cfg.controlnet_config)
    given = as_list(given) if not isinstance(given, torch.Tensor) else [given]
    if given and len(given) != len(spec.names):
        raise TokenFlowError(f"{len(given)} condition videos for {len(spec.names)} ControlNets: give one (or None) "
                             f"per ControlNet", key="control")
    given = given or [None] * len(spec.names)
    maps = [control_maps.make(kind, models, frames, g, chunk, progress, cfg.resize)
            for kind, g in zip(spec.controls, given)]
    return ControlMaps(spec, maps)


class Control:
    """The ControlNets of one edit at work: the residuals of each UNet call of the editing loop."""

    def __init__(self, nets: list, control: ControlMaps, steps: range):
        self.spec, self.maps, self.nets = control.spec, control.maps, nets
        self.first, self.n = steps.start, len(steps)
        # diffusers: ControlNets trained with global pooling always run in guess mode
        self.guess = self.spec.guess_mode or any(getattr(n.config, "global_pool_conditions", False) for n in self.nets)

    def unet_kwargs(self, x: torch.Tensor, t, unet_kw: dict, frames: torch.Tensor, step: int,
                    chunk: int | None = None) -> dict:
        """The residual arguments of a UNet call on x = [source | uncond | cond] rows of `frames` (n each),
        whose text conditioning is `unet_kw`; `chunk`: frames per ControlNet call (the keyframe pass's
        chunk). Empty when no ControlNet acts at this step."""
        scales = self.spec.scales_at(step - self.first, self.n)
        if not any(scales):
            return {}
        n = len(frames)
        branches = (2,) if self.guess else (1, 2)
        per = min(chunk or n, n)
        down = mid = None
        for a in range(0, n, per):
            b = min(a + per, n)
            rows = torch.cat([torch.arange(r * n + a, r * n + b) for r in branches]).to(x.device)
            d, m = self._run(x, t, unet_kw, frames[a:b], rows, len(branches), scales)
            if down is None:  # rows without control stay zero: the UNet adds nothing there
                down = [r.new_zeros((3 * n, *r.shape[1:])) for r in d]
                mid = m.new_zeros((3 * n, *m.shape[1:]))
            for full, r in zip(down, d):
                full[rows] = r
            mid[rows] = m
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def _run(self, x, t, unet_kw, frames, rows, copies: int, scales):
        kw = {"encoder_hidden_states": unet_kw["encoder_hidden_states"][rows]}
        if "added_cond_kwargs" in unet_kw:
            kw["added_cond_kwargs"] = {k: v[rows] for k, v in unet_kw["added_cond_kwargs"].items()}
        down = mid = None
        for net, maps, scale in zip(self.nets, self.maps, scales):
            if scale == 0:  # outside its guidance window
                continue
            cond = control_maps.as_input(maps[frames.cpu()], x.device, x.dtype).repeat(copies, 1, 1, 1)
            d, m = net(x[rows], t, controlnet_cond=cond, conditioning_scale=scale, guess_mode=self.guess,
                       return_dict=False, **kw)
            down = list(d) if down is None else [p + q for p, q in zip(down, d)]
            mid = m if mid is None else mid + m
        return down, mid


def condition_videos(cfg) -> list[str | None]:
    """Per ControlNet of a controlnet edit, the condition video or frame folder `control` names (None where
    the maps are made from the frames); empty in other modes or when `control` is not given."""
    if cfg.mode != "controlnet":
        return []
    return [None if c in control_maps.KINDS else c for c in as_list(cfg.control)]

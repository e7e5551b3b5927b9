"""Running the VAE without black frames: float32 where float16 overflows, and never silently on NaN.

SDXL's VAE overflows in float16: its activations exceed 65504 and the frames come out NaN (black once
written). Its config says so (`force_upcast: true`), and as diffusers' SDXL pipeline does, a float16 SDXL
model keeps such a VAE in float32 (twice its activation memory; the UNet stays in float16). Only SDXL
models read the flag, as only diffusers' SDXL pipelines do: SD 1.x/2.x VAE configs predate it and get
diffusers' default, True. A VAE that says
nothing but still overflows is caught on its output: a batch with NaN or inf is run again in float32 and
the VAE stays in float32 for the rest of the process, with one warning naming the fp16-safe VAE to use
instead (`--vae madebyollin/sdxl-vae-fp16-fix` for SDXL: the same decoder, fine-tuned to stay in range).
bfloat16 has float32's range and never needs this.
"""
from __future__ import annotations

import logging
import warnings

import torch

from tokenflow.errors import TokenFlowError

log = logging.getLogger("tokenflow")

FP16_SAFE_SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"


def load_vae(name: str, *, local_only: bool):
    """A replacement VAE: a hub id, a local diffusers folder (a `vae/` subfolder or the VAE's own folder),
    or a single .safetensors file."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    path = Path(name).expanduser()
    if path.suffix == ".safetensors":
        return AutoencoderKL.from_single_file(str(path), local_files_only=local_only)
    quiet = {"low_cpu_mem_usage": False}  # what diffusers does without accelerate, minus its warning
    if path.is_dir():
        return AutoencoderKL.from_pretrained(str(path), subfolder="vae" if (path / "vae").is_dir() else None,
                                             local_files_only=True, **quiet)
    with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return AutoencoderKL.from_pretrained(name, local_files_only=local_only, **quiet)


def needs_upcast(vae, dtype: torch.dtype) -> bool:
    """Whether a VAE run in `dtype` must run in float32 instead (its config says it overflows in float16)."""
    return dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def run(models, fn, x: torch.Tensor, what: str) -> torch.Tensor:
    """fn(x in the VAE's dtype) -> output; a non-finite output of a half-precision VAE is computed again
    in float32 (and the VAE kept there); a non-finite output in float32 is an error."""
    vae = models.vae
    out = fn(x.to(vae.dtype))
    if bool(torch.isfinite(out).all()):
        return out
    if vae.dtype != torch.float32:
        log.warning("the VAE overflowed in %s while it ran %s (NaN or inf in its output); running it in float32 "
                    "from now on (twice its activation memory). A VAE made for float16 avoids this: for SDXL, "
                    "--vae %s", str(vae.dtype).removeprefix("torch."), what, FP16_SAFE_SDXL_VAE)
        vae.to(torch.float32)
        out = fn(x.to(torch.float32))
        if bool(torch.isfinite(out).all()):
            return out
    raise TokenFlowError(f"the VAE's output is not finite (NaN) while it ran {what}, even in float32: its input is "
                         f"not finite. Run the model in float32 or bfloat16 (--dtype)", key="dtype")

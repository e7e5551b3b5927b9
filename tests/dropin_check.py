"""The reference-style TokenFlow step on a tiny random diffusers UNet, run twice: with the test's re-statement
of the reference's `tokenflow_utils` (reference_tokenflow_utils.py) as it is, and with the same module
patched by `tokenflow.ops.integrations.patch_reference`. Needs only torch, diffusers and tokenflow.ops, so
it runs both under this project's pins (tests/test_integrations.py) and in a fresh environment with the
reference's old diffusers / transformers (tests/test_dropin_install.py runs it as a script there).

One step: a keyframe pass over one keyframe per group (rows source | uncond | cond, Q/K injected when `t`
is in the schedule), then one pass per group of `batch` frames. Frames are a shared random latent plus
small per-frame noise, as video frames are alike, so every token's nearest keyframe token is unambiguous.

    python tests/dropin_check.py [--dtype float32] [--backend NAME]   (prints the comparison, exit 1 if off)
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
# Float32: the two compute the same sums in other orders (SDPA against per-head bmm; a blocked search):
# measured 7e-7 to 1e-6 of the output scale through the tiny UNet. Half precision: at most twice what the
# dtype alone changes in the reference (its own half-precision run against its float32 run).
FLOAT32_BOUND = 1e-5


def load_reference(name: str):
    """A fresh module object of the re-statement (patching one leaves the other as it was)."""
    spec = importlib.util.spec_from_file_location(name, HERE / "reference_tokenflow_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_unet(seed: int = 0):
    """SD's UNet layout (the reference addresses down 0-2 x 2, mid, up 1-3 x 3 transformer blocks), tiny."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True, norm_num_groups=8)
    return unet.eval().requires_grad_(False)


def inputs(groups: int = 3, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = groups * batch
    base = torch.randn(1, 4, 8, 8, generator=g)
    x = base + 0.05 * torch.randn(n, 4, 8, 8, generator=g)
    source = base + 0.05 * torch.randn(n, 4, 8, 8, generator=g)
    text = torch.randn(3, 5, 32, generator=g)  # inversion prompt, negative, prompt: 5 tokens each
    keyframes = torch.tensor([g_ * batch + (g_ % batch) for g_ in range(groups)])  # one frame per group
    return dict(x=x, source=source, text=text, keyframes=keyframes, batch=batch)


def tokenflow_step(utils, unet, data: dict, t: int, schedule, dtype=torch.float32) -> dict:
    """The reference's denoising step around one UNet (under autocast to `dtype` unless float32):
    {'keyframes': pass output, 'groups': [outputs], 'dtypes': the transformer blocks' output dtypes per pass}."""
    holder = SimpleNamespace(unet=unet)
    utils.register_extended_attention_pnp(holder, schedule)
    utils.set_tokenflow(unet)
    dtypes: list = []
    hooks = [m.register_forward_hook(lambda mod, a, out: dtypes.append(out.dtype))
             for m in unet.modules() if type(m).__name__ == "TokenFlowBlock"]

    def run(rows):
        k = len(rows)
        latent = torch.cat([data["source"][rows], data["x"][rows], data["x"][rows]])
        text = torch.cat([data["text"][i:i + 1].expand(k, -1, -1) for i in range(3)])
        # Half precision is autocast, as the reference's batched_denoise_step runs (fp16 on CUDA). Its weights
        # stay float32 here: on the CPU, LayerNorm does not take a float32 input (the reference's blend
        # returns one) with half-precision weights, and CPU autocast leaves LayerNorm alone.
        with torch.autocast(latent.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return unet(latent, t, encoder_hidden_states=text).sample.float()

    with torch.no_grad():
        utils.register_time(holder, t)
        utils.register_pivotal(unet, True)
        out = {"keyframes": run(data["keyframes"]), "groups": [], "dtypes": []}
        out["dtypes"].append(sorted({str(d) for d in dtypes}))
        utils.register_pivotal(unet, False)
        b = data["batch"]
        for i in range(len(data["x"]) // b):
            dtypes.clear()
            utils.register_batch_idx(unet, i)
            out["groups"].append(run(torch.arange(i * b, (i + 1) * b)))
            out["dtypes"].append(sorted({str(d) for d in dtypes}))
    for h in hooks:
        h.remove()
    return out


def _passes(out: dict) -> list[tuple[str, torch.Tensor]]:
    return [("keyframes", out["keyframes"]), *((f"group {i}", g) for i, g in enumerate(out["groups"]))]


def compare(dtype=torch.float32, backend: str | None = None, t: int = 981, inject: bool = True) -> dict:
    """Reference vs patched on the same UNet weights, per pass: max |difference| over max |reference|
    ('error'), and the same for the reference at `dtype` against itself in float32 ('noise': what the
    dtype alone changes). Plus the transformer blocks' output dtypes per pass of both."""
    from tokenflow.ops.integrations import patch_reference

    schedule = torch.tensor([981, 961, 941]) if inject else torch.tensor([941])
    unet = tiny_unet()
    data = inputs()
    reference = tokenflow_step(load_reference("reference_tokenflow_utils_ref"), copy.deepcopy(unet), data, t, schedule, dtype)
    exact = reference if dtype == torch.float32 else tokenflow_step(
        load_reference("reference_tokenflow_utils_f32"), copy.deepcopy(unet), data, t, schedule)
    patched = load_reference("reference_tokenflow_utils_patched")
    patch_reference(patched, backend=backend)
    ours = tokenflow_step(patched, copy.deepcopy(unet), data, t, schedule, dtype)
    report = {"dtypes_reference": reference["dtypes"], "dtypes_ours": ours["dtypes"], "passes": []}
    for (name, a), (_, b), (_, e) in zip(_passes(reference), _passes(ours), _passes(exact)):
        scale = a.abs().max()
        report["passes"].append({"pass": name, "error": float((a - b).abs().max() / scale),
                                 "noise": float((a - e).abs().max() / scale)})
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--backend", default=None)
    args = ap.parse_args(argv)
    ok = True
    for inject in (True, False):
        report = compare(getattr(torch, args.dtype), args.backend, inject=inject)
        for p in report["passes"]:
            bound = max(2 * p["noise"], FLOAT32_BOUND)
            ok &= p["error"] <= bound
            print(f"inject={inject} {p['pass']}: difference {p['error']:.3g} of the output scale "
                  f"(bound {bound:.3g}; the dtype alone: {p['noise']:.3g})")
        same = report["dtypes_reference"] == report["dtypes_ours"]
        ok &= same
        print(f"inject={inject} block output dtypes per pass: reference {report['dtypes_reference']}, "
              f"ours {report['dtypes_ours']}{'' if same else ' DIFFER'}")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

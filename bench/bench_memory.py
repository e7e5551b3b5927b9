"""Simulated peak GPU memory of the PnP edit at SD 2.1-base 512x512 (or SDXL base at 1024x1024, with or
without ControlNets) against video length, without a GPU.

For each video length and GPU budget, the planner (tokenflow/planner.py) picks the frames per UNet call
and whether the keyframe records go to host memory, exactly as it would on that GPU; then
tokenflow.memsim runs the first editing step on the meta device and reports the peak bytes alive at
once (activations, keyframe records, inputs) plus the weights of the UNet, VAE and text encoder (one step
is enough: every step allocates the same), and the VAE's encode and decode at the planned frames per call.
Simulated, not measured: no allocator fragmentation, no
cuBLAS/cuDNN workspace, no CUDA context (see tokenflow/memsim.py). Budgets: the whole GPU (78 GiB, an
H100 80 GB as the device machine reports it) and --max-gpu-mem 20.

    python bench/bench_memory.py --json bench/results/memory_sim.json --markdown bench/results/memory_sim.md
    python bench/bench_memory.py --model sdxl --frames 40 120 400 --max-gpu-mem 24 \
        --json bench/results/memory_sim_sdxl.json --markdown bench/results/memory_sim_sdxl.md
    python bench/bench_memory.py --model sd15 --controlnets 1 --frames 40 120 400 \
        --json bench/results/memory_sim_sd15_controlnet.json --markdown bench/results/memory_sim_sd15_controlnet.md

SDXL: the UNet, VAE (float32: it overflows in float16, tokenflow/vae.py) and both text encoders from their
published configs; `--controlnets N` adds N ControlNets shaped like diffusers' from_unet (their weights
counted). With --model sdxl the JSON also holds the cost model's TFLOP per stage (tokenflow.costmodel).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness_meta import environment, write_json  # noqa: E402

from tokenflow.config import EditConfig  # noqa: E402
from tokenflow.keyframes import make_groups  # noqa: E402
from tokenflow.memsim import simulate_edit, simulate_vae, weights_bytes  # noqa: E402
from tokenflow.planner import plan_for, records_bytes  # noqa: E402
from tokenflow.tiny import SD21_RANDOM, SDXL_RANDOM, build_tiny_models, build_tiny_second_encoder  # noqa: E402

GiB = 2**30
MODELS = {"sd21": ("SD 2.1-base", SD21_RANDOM, 512), "sd15": ("SD 1.5", SD21_RANDOM, 512),
          "sdxl": ("SDXL base", SDXL_RANDOM, 1024)}


def sd15_on_meta(models):
    """SD 1.5 from SD 2.1-base's random build: its UNet config and CLIP ViT-L/14 text encoder (SDXL's first)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tokenflow.sdxl import SDXL_TEXT_ENCODER_CONFIG
    from tokenflow.tiny import SD15_UNET_CONFIG

    vae, tok, _, _, sched = models
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        te = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG))
    return vae, tok, te, unet, sched


def row(models, frames: int, size: int, gpu_gib: float, max_gpu_mem: float | None, dtype, extra=(),
        controlnets: int = 0) -> dict:
    """`extra`: more modules whose weights sit on the GPU (SDXL's second text encoder, the ControlNets)."""
    vae, _, text_encoder, unet, sched = models
    weights = weights_bytes(vae, text_encoder, unet, *extra)
    cfg = EditConfig(prompt="x", max_gpu_mem=max_gpu_mem)
    h = w = size // 8
    free = int(gpu_gib * GiB) - weights
    K = len(make_groups(frames, cfg.batch_size, False))
    plan = plan_for(unet, dtype, h, w, keyframes=K, batch_size=cfg.batch_size, chunk_frames=None,
                    max_gpu_mem=max_gpu_mem, free=free, allocated=weights, controlnets=controlnets,
                    vae_dtype=vae.dtype)
    chunk, offload = plan.frames_per_call, plan.offload_records
    t0 = time.perf_counter()
    vae_sim = simulate_vae(vae.config, frames=plan.vae_frames_per_call, height=size, width=size, dtype=vae.dtype)
    sim = simulate_edit(unet.config, frames=frames, height=size, width=size, chunk_frames=chunk,
                        batch_size=cfg.batch_size, offload_records=offload, dtype=dtype, scheduler_config=sched,
                        controlnets=controlnets)
    return {"frames": frames, "keyframes": K, "budget": f"--max-gpu-mem {max_gpu_mem:g}" if max_gpu_mem else
            f"whole GPU ({gpu_gib:g} GiB)", "chunk_frames": chunk, "records_offloaded": offload,
            "records_gib": round(records_bytes(unet, K, h, w, dtype) / GiB, 3),
            "planner_estimate_gib": round(plan.estimate / GiB, 3),
            "activations_peak_gib": round(sim.peak_bytes / GiB, 3), "weights_gib": round(weights / GiB, 3),
            "controlnets": controlnets,
            "total_gib": round((sim.peak_bytes + weights) / GiB, 3), "peak_at": sim.peak_at,
            "vae_frames": plan.vae_frames_per_call,
            "vae_peak_gib": {k: round(v / GiB, 3) for k, v in vae_sim.items()},
            "simulation_s": round(time.perf_counter() - t0, 1)}


def cost(frames: list[int], size: int, vae_config) -> dict:
    """The cost model's TFLOP per stage for each length (SDXL): inversion (500 steps), the edit's 50 steps by
    part, the VAE's encode and decode of every frame."""
    from tokenflow import costmodel

    vae = costmodel.vae_flops(vae_config, size, size)
    out = {"unet_tflop_per_frame_and_branch": {"full": costmodel.SDXL.full / 1e12, "group": costmodel.SDXL.group / 1e12},
           "vae_tflop_per_frame": {k: round(v / 1e12, 3) for k, v in vae.items()}, "by_frames": {}}
    for n in frames:
        step = costmodel.edit_step_flops(n, model=costmodel.SDXL)
        out["by_frames"][n] = {
            "inversion_500_steps": round(costmodel.inversion_flops(n, 500, model=costmodel.SDXL) / 1e12, 1),
            "vae_encode": round(n * vae["encode"] / 1e12, 1), "vae_decode": round(n * vae["decode"] / 1e12, 1),
            **{f"edit_50_steps_{k}": round(50 * v / 1e12, 1) for k, v in step.items()}}
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    control = f" with {meta['controlnets']} ControlNet{'s' if meta['controlnets'] > 1 else ''}" if meta["controlnets"] else ""
    lines = [f"Simulated peak GPU memory, PnP edit step, {meta['model_name']} {meta['size']}x{meta['size']}{control}, "
             f"fp16, B = 8 (`tokenflow.memsim`: the meta device, not a GPU measurement). Command: `{meta['command']}`.", "",
             "| frames | keyframes | budget | frames per call | records offloaded | records (GiB) | "
             "activations + records peak (GiB) | with weights (GiB) | peak in | frames per VAE call | "
             "VAE decode peak with weights (GiB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['frames']} | {r['keyframes']} | {r['budget']} | {r['chunk_frames']} | "
                     f"{'yes' if r['records_offloaded'] else 'no'} | {r['records_gib']:.2f} | "
                     f"{r['activations_peak_gib']:.2f} | {r['total_gib']:.2f} | {r['peak_at'].split('(')[-1].rstrip(')')} pass | "
                     f"{r['vae_frames']} | {r['vae_peak_gib']['decode'] + r['weights_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="sd21")
    ap.add_argument("--controlnets", type=int, default=0, help="ControlNets in the edit (weights and activations)")
    ap.add_argument("--frames", type=int, nargs="+", default=[40, 120, 400, 1000])
    ap.add_argument("--size", type=int, help="default: the model's native size (512, SDXL 1024)")
    ap.add_argument("--gpu-gib", type=float, default=78.0, help="the GPU's memory for the whole-GPU budget")
    ap.add_argument("--max-gpu-mem", type=float, nargs="*", default=[20.0], help="budgets to add (GiB)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)

    dtype = torch.float16
    name, variant, native = MODELS[args.model]
    size = args.size or native
    models = build_tiny_models(variant, device="meta")
    if args.model == "sd15":
        models = sd15_on_meta(models)
    extra = []
    if args.model == "sdxl":
        extra.append(build_tiny_second_encoder(variant, device="meta")[1])
    for m in models[0], models[2], models[3], *extra:
        # SDXL's VAE stays in float32 (tokenflow/vae.py); nn.Module.to: diffusers' own warns needlessly
        torch.nn.Module.to(m, torch.float32 if m is models[0] and args.model == "sdxl" else dtype)
    if args.controlnets:
        from tokenflow.memsim import meta_controlnet
        extra += [meta_controlnet(models[3], dtype) for _ in range(args.controlnets)]
    rows = []
    for limit in [None, *args.max_gpu_mem]:
        for n in args.frames:
            rows.append(row(models, n, size, args.gpu_gib, limit, dtype, extra, args.controlnets))
            r = rows[-1]
            print(f"{n:5d} frames, {r['budget']}: chunk {r['chunk_frames']}, offload {r['records_offloaded']}, "
                  f"peak {r['activations_peak_gib']:.2f} + weights {r['weights_gib']:.2f} GiB ({r['peak_at']})", flush=True)
    meta = {**environment("python bench/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])),
            "size": size, "simulated": True, "model_name": name, "controlnets": args.controlnets,
            "model": f"{name} UNet/VAE/text encoder{'s' if args.model == 'sdxl' else ''} from configs (meta device)"
                     + (f", {args.controlnets} ControlNet(s) from the UNet's config" if args.controlnets else "")}
    out = {"meta": meta, "rows": rows}
    if args.model == "sdxl":
        out["cost_model"] = cost(args.frames, size, models[0].config)
    if args.json:
        write_json(args.json, out)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

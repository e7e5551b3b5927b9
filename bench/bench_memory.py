"""Simulated peak GPU memory of the PnP edit at SD 2.1-base 512x512 against video length, without a GPU.

For each video length and GPU budget, the planner (tokenflow/planner.py) picks the frames per UNet call
and whether the keyframe records go to host memory, exactly as it would on that GPU; then
tokenflow.memsim runs the first editing step on the meta device and reports the peak bytes alive at
once (activations, keyframe records, inputs) plus the weights of the UNet, VAE and text encoder (one step
is enough: every step allocates the same), and the VAE's encode and decode at the planned frames per call.
Simulated, not measured: no allocator fragmentation, no
cuBLAS/cuDNN workspace, no CUDA context (see tokenflow/memsim.py). Budgets: the whole GPU (78 GiB, an
H100 80 GB as the device machine reports it) and --max-gpu-mem 20.

    python bench/bench_memory.py --json bench/results/memory_sim.json --markdown bench/results/memory_sim.md
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
from tokenflow.tiny import SD21_RANDOM, build_tiny_models  # noqa: E402

GiB = 2**30


def row(models, frames: int, size: int, gpu_gib: float, max_gpu_mem: float | None, dtype) -> dict:
    vae, _, text_encoder, unet, sched = models
    weights = weights_bytes(vae, text_encoder, unet)
    cfg = EditConfig(prompt="x", max_gpu_mem=max_gpu_mem)
    h = w = size // 8
    free = int(gpu_gib * GiB) - weights
    K = len(make_groups(frames, cfg.batch_size, False))
    plan = plan_for(unet, dtype, h, w, keyframes=K, batch_size=cfg.batch_size, chunk_frames=None,
                    max_gpu_mem=max_gpu_mem, free=free, allocated=weights)
    chunk, offload = plan.frames_per_call, plan.offload_records
    t0 = time.perf_counter()
    vae_sim = simulate_vae(vae.config, frames=plan.vae_frames_per_call, height=size, width=size, dtype=dtype)
    sim = simulate_edit(unet.config, frames=frames, height=size, width=size, chunk_frames=chunk,
                        batch_size=cfg.batch_size, offload_records=offload, dtype=dtype, scheduler_config=sched)
    return {"frames": frames, "keyframes": K, "budget": f"--max-gpu-mem {max_gpu_mem:g}" if max_gpu_mem else
            f"whole GPU ({gpu_gib:g} GiB)", "chunk_frames": chunk, "records_offloaded": offload,
            "records_gib": round(records_bytes(unet, K, h, w, dtype) / GiB, 3),
            "planner_estimate_gib": round(plan.estimate / GiB, 3),
            "activations_peak_gib": round(sim.peak_bytes / GiB, 3), "weights_gib": round(weights / GiB, 3),
            "total_gib": round((sim.peak_bytes + weights) / GiB, 3), "peak_at": sim.peak_at,
            "vae_frames": plan.vae_frames_per_call,
            "vae_peak_gib": {k: round(v / GiB, 3) for k, v in vae_sim.items()},
            "simulation_s": round(time.perf_counter() - t0, 1)}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Simulated peak GPU memory, PnP edit step, SD 2.1-base {meta['size']}x{meta['size']}, fp16, B = 8 "
             f"(`tokenflow.memsim`: the meta device, not a GPU measurement). Command: `{meta['command']}`.", "",
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
    ap.add_argument("--frames", type=int, nargs="+", default=[40, 120, 400, 1000])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--gpu-gib", type=float, default=78.0, help="the GPU's memory for the whole-GPU budget")
    ap.add_argument("--max-gpu-mem", type=float, nargs="*", default=[20.0], help="budgets to add (GiB)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)

    dtype = torch.float16
    models = build_tiny_models(SD21_RANDOM, device="meta")
    for m in models[0], models[2], models[3]:
        torch.nn.Module.to(m, dtype)
    rows = []
    for limit in [None, *args.max_gpu_mem]:
        for n in args.frames:
            rows.append(row(models, n, args.size, args.gpu_gib, limit, dtype))
            r = rows[-1]
            print(f"{n:5d} frames, {r['budget']}: chunk {r['chunk_frames']}, offload {r['records_offloaded']}, "
                  f"peak {r['activations_peak_gib']:.2f} + weights {r['weights_gib']:.2f} GiB ({r['peak_at']})", flush=True)
    meta = {**environment("python bench/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])),
            "size": args.size, "simulated": True, "model": "SD 2.1-base UNet/VAE/text encoder from configs (meta device)"}
    if args.json:
        write_json(args.json, {"meta": meta, "rows": rows})
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end benchmark: inversion and PnP edit at several video lengths, ours vs the reference's pattern.

Builds SD 2.1-base's UNet, VAE and text encoder from their configs with random weights (speed does not
depend on the weights), inverts a procedurally textured video (never zeros), then edits it, and reports
per stage: seconds, peak GPU memory, analytic TFLOP (tokenflow.costmodel) and model FLOP utilisation
against the measured bf16 matmul peak. The edit stage also gets tokenflow.memsim's simulated peak for the
same plan (the larger of an editing step and a VAE decode, weights included), to check the simulation
against the allocator's figure. `--baseline` adds the reference's compute pattern (bench/baseline.py:
per-head loops, repeated K/V, materialised similarities; one group per UNet call; kept latents reloaded from disk
before every UNet call) at the same settings and dtype.

    python bench/bench_pipeline.py --frames 40 120 --inversion-steps 50 --baseline \
        --json bench/results/pipeline_h100.json --markdown bench/results/pipeline_h100.md
    python bench/bench_pipeline.py --smoke      # tiny model on the CPU: checks the script, measures nothing

`--nproc N [N ...]`: one video on N ranks (tokenflow.distributed; README "Several GPUs"). Per rank count and video
length: each rank's seconds per stage, peak GPU memory and bytes received per keyframe pass, and the scaling
efficiency T(1 rank) / (N x T(N ranks)) of the edit and the inversion, measured with torchrun where the machine
has N GPUs ("not measured" elsewhere); always the simulated per-rank peak (tokenflow.memsim, the busiest rank,
under the planner's per-rank plan for --gpu-gib), the simulated bytes gathered per step, and a FLOP-balance
efficiency from tokenflow.costmodel (modelled: compute only, communication not included).

    python bench/bench_pipeline.py --nproc 1 2 4 8 --frames 1000 4000 --json bench/results/ranks_sim.json \
        --markdown bench/results/ranks_sim.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline  # noqa: E402,F401  (registers the "baseline" backend)
from harness import matmul_peak_tflops  # noqa: E402
from harness_meta import environment, write_json  # noqa: E402

from tokenflow import costmodel  # noqa: E402
from tokenflow.config import EditConfig  # noqa: E402
from tokenflow.editor import TokenFlowEditor  # noqa: E402
from tokenflow.memsim import simulate_edit, simulate_vae, weights_bytes  # noqa: E402
from tokenflow.models import load_models, resolve_dtype  # noqa: E402


def textured_video(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, size, size]: a random texture panning and a square moving over it."""
    g = torch.Generator().manual_seed(seed)
    tex = torch.randint(0, 256, (3, size, 2 * size), generator=g, dtype=torch.uint8)
    obj = torch.randint(0, 256, (3, size // 4, size // 4), generator=g, dtype=torch.uint8)
    frames = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        x = (i * 3) % size
        frames[i] = tex[:, :, x:x + size]
        p = (i * 5) % (size - size // 4)
        frames[i, :, p:p + size // 4, p:p + size // 4] = obj
    return frames


def reload_latents_per_call(editor, inv):
    """The reference reloads the kept latents of the whole clip from disk before every UNet call."""
    from safetensors.torch import load_file

    def hook(module, args):
        if editor.hooks is not None and editor.hooks.state.kind != "off":
            for a, b in inv.store.chunks(len(inv.x0)):
                load_file(str(inv.store.chunk_path(a, b)))[f"t{editor.hooks.state.t}"].to(editor.models.device)
    return editor.models.unet.register_forward_pre_hook(hook)


def run(editor, frames, cfg, peak_tflops, scale) -> list[dict]:
    dev = editor.models.device
    rows = []
    baseline_pattern = cfg.backend == "baseline"

    def stage(name, fn, flops):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        tflop = flops / 1e12
        rows.append({"stage": name, "seconds": s, "peak_gpu_mem_gib": None if peak is None else peak / 2**30,
                     "tflop": tflop, "mfu": None if not peak_tflops else tflop / s / peak_tflops})
        return out

    N = len(frames)
    inv = stage(f"invert_{cfg.n_inversion_steps}", lambda: editor.invert(frames, cfg, progress=False),
                costmodel.inversion_flops(N, cfg.n_inversion_steps, scale))
    hook = reload_latents_per_call(editor, inv) if baseline_pattern else None
    try:
        result = stage(f"edit_{cfg.n_timesteps}", lambda: editor.edit(frames, cfg, progress=False, inversion=inv),
                       costmodel.edit_flops(N, cfg.n_timesteps, cfg.batch_size, scale))
    finally:
        if hook is not None:
            hook.remove()
    if not baseline_pattern:
        rows[-1]["simulated_peak_gib"] = simulated_peak(editor.models, frames, cfg, result.memory_plan) / 2**30
    return rows


def simulated_peak(models, frames, cfg, plan) -> int:
    """tokenflow.memsim's peak for this edit's plan: the larger of a step and a VAE decode, plus the weights."""
    H, W = frames.shape[2:]
    step = simulate_edit(models.unet.config, frames=len(frames), height=H, width=W, chunk_frames=plan.frames_per_call,
                         batch_size=cfg.batch_size, offload_records=plan.offload_records, dtype=models.dtype,
                         scheduler_config=models.scheduler_config).peak_bytes
    vae = simulate_vae(models.vae.config, frames=min(plan.vae_frames_per_call, len(frames)), height=H, width=W,
                       dtype=models.dtype)["decode"]
    weights = weights_bytes(models.unet, models.vae, models.text_encoder)
    return max(step, vae) + weights


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, nargs="+", default=[40, 120, 400, 1000])
    p.add_argument("--inversion-steps", type=int, nargs="+", default=[50, 500])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--model", default="sd21-random")
    p.add_argument("--baseline", action="store_true", help="also run the reference's compute pattern")
    p.add_argument("--baseline-max-frames", type=int, default=120, help="the baseline runs out of memory beyond")
    p.add_argument("--smoke", action="store_true", help="tiny model, tiny sizes, CPU: checks the script only")
    p.add_argument("--nproc", type=int, nargs="+", help="ranks per run (see the module docstring)")
    p.add_argument("--gpu-gib", type=float, default=78.0, help="--nproc: the GPU memory the simulated plans assume")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one rank of a --nproc measurement
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.frames, args.inversion_steps, args.steps = "tiny-random", [10], [2], 2
        args.batch_size, args.size, args.dtype = 4, 64, "float32"
        if args.nproc:
            args.frames = [19]
    if args.worker:
        return rank_worker(args)
    if args.nproc:
        return ranks_main(args, argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = load_models(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    editor = TokenFlowEditor(models)
    cache = Path(tempfile.mkdtemp(prefix="tokenflow-bench-"))
    peak = matmul_peak_tflops(torch.bfloat16, str(device))
    scale = (args.size / 512) ** 2
    results = []
    for n in args.frames:
        frames = textured_video(n, args.size)
        for inv_steps in args.inversion_steps:
            modes = [("tokenflow", "auto", None)]
            if args.baseline and n <= args.baseline_max_frames:
                modes.append(("reference_pattern", "baseline", args.batch_size))
            for mode, backend, chunk in modes:
                cfg = EditConfig(prompt="a watercolor painting", model=args.model, batch_size=args.batch_size,
                                 n_timesteps=args.steps, n_inversion_steps=inv_steps, backend=backend,
                                 chunk_frames=chunk, cache_dir=str(cache / mode))  # each mode inverts
                try:
                    rows = run(editor, frames, cfg, peak, scale)
                except torch.cuda.OutOfMemoryError as e:
                    rows = [{"stage": "error", "error": f"CUDA out of memory: {str(e).splitlines()[0]}"}]
                    torch.cuda.empty_cache()
                for r in rows:
                    r.update(frames=n, inversion_steps=inv_steps, mode=mode)
                    results.append(r)
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    meta = environment(command=" ".join(["python", "bench/bench_pipeline.py", *(argv or sys.argv[1:])]))
    meta.update(model=args.model, dtype=args.dtype, size=args.size, batch_size=args.batch_size, steps=args.steps,
                bf16_peak_tflops=peak, smoke=args.smoke)
    if args.json:
        write_json(args.json, {"meta": meta, "rows": results})
    if args.markdown:
        args.markdown.write_text(markdown(meta, results))
    return results


def markdown(meta: dict, rows: list[dict]) -> str:
    out = [f"# End-to-end pipeline, {meta['device']} ({meta['date']})", "",
           f"Command: `{meta['command']}`; model {meta['model']} ({meta['dtype']}), {meta['size']}x{meta['size']}, "
           f"B = {meta['batch_size']}, {meta['steps']} edit steps; bf16 matmul peak "
           f"{meta['bf16_peak_tflops'] and round(meta['bf16_peak_tflops'])} TFLOP/s.", "",
           "| frames | inversion steps | mode | stage | seconds | peak GPU GiB | simulated peak GiB | TFLOP | MFU |",
           "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in rows:
        if r["stage"] == "error":
            out.append(f"| {r['frames']} | {r['inversion_steps']} | {r['mode']} | {r['error']} | | | | | |")
            continue
        out.append(f"| {r['frames']} | {r['inversion_steps']} | {r['mode']} | {r['stage']} | {fmt(r['seconds'])} | "
                   f"{fmt(r['peak_gpu_mem_gib'])} | {fmt(r.get('simulated_peak_gib'))} | {fmt(r['tflop'], 1)} | "
                   f"{fmt(r['mfu'])} |")
    return "\n".join(out) + "\n"



# -- several ranks (--nproc) -------------------------------------------------------------------------

def rank_worker(args) -> None:
    """One rank under torchrun: invert and edit the textured video, write this rank's figures to args.worker."""
    from tokenflow.distributed import join
    from tokenflow.distributed_edit import editor_for

    cuda = torch.cuda.is_available()
    ranks = join(None if cuda else "cpu")
    cfg = EditConfig(prompt="a watercolor painting", model=args.model, batch_size=args.batch_size, n_timesteps=args.steps,
                     n_inversion_steps=args.inversion_steps[0], dtype=args.dtype, resume=False,
                     cache_dir=str(args.worker / "cache"))
    try:
        editor = editor_for(cfg, ranks)
        job = editor.prepare(textured_video(args.frames[0], args.size), cfg)
        ranks.agree()
        dev = editor.models.device
        seconds, peaks = {}, {}

        def timed(stage, fn):
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            out = fn()
            if cuda:
                torch.cuda.synchronize(dev)
            seconds[stage] = time.perf_counter() - t0
            peaks[stage] = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
            return out
        inv = timed("invert", lambda: editor.invert(job, progress=False))
        res = timed("edit", lambda: editor.edit(job, progress=False, inversion=inv))
        record = {"rank": ranks.rank, "world": ranks.world, "frames": len(getattr(res, "part", job.frames)),
                  "seconds": seconds, "stages": res.timings, "peak_gpu_mem_gib": peaks,
                  "received_bytes_per_step": getattr(res, "comm", {}), "memory_plan": job.memory.describe()}
        (args.worker / f"rank{ranks.rank}.json").write_text(json.dumps(record))
        if ranks.leader:
            ranks.finish()
        else:
            ranks.serve_frames(res.frames)
    finally:
        ranks.close()


def measure_ranks(n: int, frames: int, args) -> list[dict]:
    """Run n ranks with torchrun on this machine; every rank's record."""
    out = Path(tempfile.mkdtemp(prefix="tokenflow-ranks-"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
           "--worker", str(out), "--model", args.model, "--frames", str(frames), "--inversion-steps",
           str(args.inversion_steps[0]), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--size", str(args.size), "--dtype", args.dtype]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise SystemExit(f"{n} ranks failed:\n{r.stderr[-3000:]}")
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(n)]


def simulate_ranks(meta_models, frames: int, n: int, args, dtype) -> dict:
    """The busiest rank under the planner's per-rank plan, on the meta device (tokenflow.memsim)."""
    from tokenflow.keyframes import make_groups, split_groups
    from tokenflow.planner import plan_for

    vae, _, te, unet, sched = meta_models
    weights = weights_bytes(vae, te, unet)
    h = w = args.size // 8
    groups = make_groups(frames, args.batch_size, False)
    parts = split_groups(len(groups), n, args.batch_size)
    most = max(len(p) for p in parts)
    plan = plan_for(unet, dtype, h, w, keyframes=most + (n > 1), gathered_keyframes=n * most if n > 1 else 0,
                    batch_size=args.batch_size, chunk_frames=None, max_gpu_mem=None,
                    free=int(args.gpu_gib * 2**30) - weights, allocated=weights)
    t0 = time.perf_counter()
    sim = simulate_edit(unet.config, frames=frames, height=args.size, width=args.size, chunk_frames=plan.frames_per_call,
                        batch_size=args.batch_size, offload_records=plan.offload_records, dtype=dtype,
                        scheduler_config=sched, world=n, qk_injection=False)  # the later steps: more keys gathered
    vae_peak = simulate_vae(vae.config, frames=plan.vae_frames_per_call, height=args.size, width=args.size,
                            dtype=dtype)["decode"]
    G = 2**30
    return {"rank": sim.rank, "rank_frames": sim.frames, "rank_keyframes": sim.keyframes, "keyframes": len(groups),
            "frames_per_call": plan.frames_per_call, "records_offloaded": plan.offload_records,
            "planner_estimate_gib": round(plan.estimate / G, 3),
            "keyframe_pass_peak_gib": round(sim.peak_in.get("keyframe", 0) / G, 3),
            "group_pass_peak_gib": round(sim.peak_in.get("group", 0) / G, 3),
            "edit_step_peak_with_weights_gib": round((sim.peak_bytes + weights) / G, 3),
            "vae_decode_peak_with_weights_gib": round((vae_peak + weights) / G, 3),
            "gathered_bytes_per_step": sim.gathered_bytes_per_step, "boundary_bytes_per_step": sim.boundary_bytes_per_step,
            "simulation_s": round(time.perf_counter() - t0, 1)}


def modelled_efficiency(frames: int, n: int, args) -> dict:
    """T(1) / (n x T(busiest rank)) from the cost model's FLOP per rank (compute only)."""
    from tokenflow.keyframes import make_groups, split_groups

    scale = (args.size / 512) ** 2
    groups = make_groups(frames, args.batch_size, False)
    K = len(groups)
    per_rank = [costmodel.rank_step_flops(groups[p.stop - 1].stop - groups[p.start].start, len(p), K, first=p.start == 0,
                                          B=args.batch_size, scale=scale)
                for p in split_groups(K, n, args.batch_size)]
    one = costmodel.rank_step_flops(frames, K, K, B=args.batch_size, scale=scale)
    return {"edit_step_tflop_busiest_rank": round(max(per_rank) / 1e12, 1),
            "edit_flop_efficiency": round(one / (n * max(per_rank)), 3)}


def ranks_main(args, argv) -> list[dict]:
    from tokenflow.tiny import SD21_RANDOM, build_tiny_models

    dtype = resolve_dtype(args.dtype, torch.device("cuda"))
    meta = build_tiny_models(args.model if args.model != "sd21-random" else SD21_RANDOM, device="meta")
    for m in meta[0], meta[2], meta[3]:
        torch.nn.Module.to(m, dtype)
    gpus = torch.cuda.device_count()
    rows, measured_one = [], {}
    for frames in args.frames:
        for n in args.nproc:
            row = {"frames": frames, "ranks": n, "simulated": simulate_ranks(meta, frames, n, args, dtype),
                   "modelled": modelled_efficiency(frames, n, args)}
            if n <= gpus or (args.smoke and not gpus):
                recs = measure_ranks(n, frames, args)
                slowest = {st: max(r["seconds"][st] for r in recs) for st in ("invert", "edit")}
                if n == 1:
                    measured_one[frames] = slowest
                base = measured_one.get(frames)
                row["measured"] = {
                    "device": "CPU (gloo)" if not gpus else torch.cuda.get_device_name(), "per_rank": recs,
                    "seconds_slowest_rank": slowest,
                    "peak_gpu_mem_gib_max": max((r["peak_gpu_mem_gib"]["edit"] or 0) for r in recs) if gpus else None,
                    "received_bytes_per_step_max": max((r["received_bytes_per_step"].get("gathered_bytes", 0) for r in recs)),
                    "scaling_efficiency": None if base is None else
                    {st: round(base[st] / (n * slowest[st]), 3) for st in ("invert", "edit")}}
            else:
                row["measured"] = "not measured"
            rows.append(row)
            sim = row["simulated"]
            print(f"{frames} frames, {n} rank(s): simulated peak {sim['edit_step_peak_with_weights_gib']:.2f} GiB "
                  f"(keyframe pass {sim['keyframe_pass_peak_gib']:.2f}), gathered {sim['gathered_bytes_per_step'] / 2**20:.0f} "
                  f"MiB/step; measured: {'yes' if isinstance(row['measured'], dict) else 'not measured'}", flush=True)
    meta_info = environment(command=" ".join(["python", "bench/bench_pipeline.py", *(argv or sys.argv[1:])]))
    meta_info.update(model=args.model, dtype=args.dtype, size=args.size, batch_size=args.batch_size, steps=args.steps,
                     inversion_steps=args.inversion_steps[0], smoke=args.smoke, simulated_budget_gib=args.gpu_gib,
                     simulated="the 'simulated' fields: tokenflow.memsim on the meta device, not a GPU measurement",
                     modelled="the 'modelled' fields: FLOP counts of tokenflow.costmodel, communication not included")
    if args.json:
        write_json(args.json, {"meta": meta_info, "rows": rows})
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(ranks_markdown(meta_info, rows))
    return rows


def ranks_markdown(meta: dict, rows: list[dict]) -> str:
    out = [f"# One video on several ranks, {meta['device']} ({meta['date']})", "",
           f"Command: `{meta['command']}`; model {meta['model']} ({meta['dtype']}), {meta['size']}x{meta['size']}, "
           f"B = {meta['batch_size']}. Simulated columns: `tokenflow.memsim` (meta device, the busiest rank, the "
           f"planner's per-rank plan for a {meta['simulated_budget_gib']:g} GiB GPU, a step without Q/K injection: "
           f"four gathered rows per layer), not measured on a GPU. Modelled: "
           f"FLOP balance from `tokenflow.costmodel`, communication not included.", "",
           "| frames | ranks | keyframes per rank | frames per call | records offloaded | keyframe pass peak (sim., GiB) | "
           "group pass peak (sim., GiB) | edit step peak with weights (sim., GiB) | gathered per step (sim., MiB) | "
           "edit FLOP efficiency (modelled) | edit s, slowest rank (measured) | peak GPU GiB (measured) | "
           "scaling efficiency edit / invert (measured) |", "|" + "---|" * 13]
    for r in rows:
        s, m = r["simulated"], r["measured"]
        if isinstance(m, dict):
            eff = m["scaling_efficiency"]
            meas = [f"{m['seconds_slowest_rank']['edit']:.1f}",
                    "n/a (CPU)" if m["peak_gpu_mem_gib_max"] is None else f"{m['peak_gpu_mem_gib_max']:.2f}",
                    "n/a (no 1-rank run)" if eff is None else f"{eff['edit']:.2f} / {eff['invert']:.2f}"]
        else:
            meas = ["not measured"] * 3
        out.append(f"| {r['frames']} | {r['ranks']} | {s['rank_keyframes']} of {s['keyframes']} | {s['frames_per_call']} | "
                   f"{'yes' if s['records_offloaded'] else 'no'} | {s['keyframe_pass_peak_gib']:.2f} | "
                   f"{s['group_pass_peak_gib']:.2f} | {s['edit_step_peak_with_weights_gib']:.2f} | "
                   f"{s['gathered_bytes_per_step'] / 2**20:.0f} | {r['modelled']['edit_flop_efficiency']:.2f} | "
                   + " | ".join(meas) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()

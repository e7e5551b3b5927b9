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
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.frames, args.inversion_steps, args.steps = "tiny-random", [10], [2], 2
        args.batch_size, args.size, args.dtype = 4, 64, "float32"

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


if __name__ == "__main__":
    main()

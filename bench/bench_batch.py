"""A suite of V videos x P prompts: one `tokenflow-edit batch` run against the suites' harness pattern.

(a) batch: one process (`python -m tokenflow.batch`), the model loaded once, each video inverted once.
(b) per item, as the suites' harnesses drive the reference: a fresh process that inverts (`tokenflow-edit invert`)
    then a fresh process that edits (`tokenflow-edit edit`), each item with its own empty latent store, as the
    reference re-runs its preprocessing for every prompt.

Both on the tiny random model at a small size on the CPU, one thread per process, with the reference's step
counts scaled down in proportion (500:50 -> 50 inversion and 5 sampling steps by default). Model loads are
counted from what the processes say ("loading model" per process in (b); the batch's summary.json), inversions
from the inversions actually computed (not served by the store).

    python bench/bench_batch.py --out bench/results/batch_cpu.json
    python bench/bench_batch.py --smoke --out /tmp/batch.json     # 1 x 2, few steps: checks the script
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
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness_meta import environment, write_json  # noqa: E402

from tokenflow.video import write_video  # noqa: E402

PROMPTS = ["a red car", "a car in the snow", "a watercolor painting of a car", "a car at night", "a toy car"]


def clip(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 [n, 3, size, size]: a random texture panning, so frames differ."""
    g = torch.Generator().manual_seed(seed)
    tex = torch.randint(0, 256, (3, size, 2 * size), generator=g, dtype=torch.uint8)
    return torch.stack([tex[:, :, 2 * i:2 * i + size] for i in range(n)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=3)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--inversion-steps", type=int, default=50)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="1 video x 2 prompts, 4 frames, 2/1 steps")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.smoke:
        args.videos, args.prompts, args.frames, args.inversion_steps, args.steps = 1, 2, 4, 2, 1
    V, P = args.videos, args.prompts
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    settings = ["--model", "tiny-random", "--batch-size", "4", "--width", str(args.size), "--height", str(args.size),
                "--n-inversion-steps", str(args.inversion_steps), "--n-timesteps", str(args.steps)]
    cli = str(Path(sys.executable).with_name("tokenflow-edit"))
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        tmp = Path(tmp)
        videos = [write_video(tmp / f"video{v}.mp4", clip(args.frames, args.size, v), 24) for v in range(V)]
        items = [{"video": v.name, "prompt": PROMPTS[j % len(PROMPTS)], "name": f"{v.stem}_{j}"}
                 for v in videos for j in range(P)]
        (tmp / "suite.yaml").write_text(yaml.safe_dump({"items": items}))

        # (a) one batch process
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "tokenflow.batch", str(tmp / "suite.yaml"), "-o", str(tmp / "batch"),
                            *settings, "--cache-dir", str(tmp / "batch_cache"), "-q"], env=env, capture_output=True, text=True)
        batch_s = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f"batch run failed:\n{r.stderr[-3000:]}")
        s = json.loads((tmp / "batch" / "summary.json").read_text())
        batch = {"seconds": round(batch_s, 2), "processes": 1, "model_loads": s["model_loads"],
                 "inversions": s["inversions"], "items_done": s["done"]}

        # (b) per item: invert in a fresh process, then edit in another, each item with an empty store
        loads = inversions = 0
        t = time.perf_counter()
        for i, it in enumerate(items):
            cache = tmp / f"item_cache{i}"
            inv = subprocess.run([cli, "invert", str(tmp / it["video"]), *settings, "--cache-dir", str(cache)],
                                 env=env, capture_output=True, text=True)
            ed = subprocess.run([cli, "edit", str(tmp / it["video"]), "--prompt", it["prompt"], *settings,
                                 "--cache-dir", str(cache), "-o", str(tmp / f"item{i}.mp4")],
                                env=env, capture_output=True, text=True)
            for x in (inv, ed):
                if x.returncode != 0:
                    sys.exit(f"per-item run failed:\n{x.stderr[-3000:]}")
                loads += x.stderr.count("loading model")
            inversions += ("inverted " in inv.stdout and "(reused" not in inv.stdout) + ("inversion computed" in ed.stdout)
        per_item_s = time.perf_counter() - t
        per_item = {"seconds": round(per_item_s, 2), "processes": 2 * len(items), "model_loads": loads,
                    "inversions": inversions, "items_done": len(items)}

    speedup = per_item_s / batch_s
    command = "python bench/bench_batch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"meta": {**environment(command), "smoke": args.smoke},
              "params": {"videos": V, "prompts": P, "frames": args.frames, "size": args.size,
                         "inversion_steps": args.inversion_steps, "sampling_steps": args.steps, "model": "tiny-random",
                         "threads_per_process": 1},
              "batch": batch, "per_item": per_item, "speedup": round(speedup, 2),
              "checks": {"one_load_per_rank": batch["model_loads"] == 1, "inversions_equal_videos": batch["inversions"] == V,
                         "per_item_inversions_equal_items": per_item["inversions"] == V * P,
                         "speedup_at_least_2_5": speedup >= 2.5}}
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("batch", "per_item", "speedup", "checks")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

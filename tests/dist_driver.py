"""One rank of a distributed edit through the Python API, for tests/test_distributed.py (run by torchrun).

    torchrun --nproc-per-node N tests/dist_driver.py OUT CACHE FRAMES [key=value ...]

Edits FRAMES frames of the test clip (tiny model, 64x64) with the EditConfig keys given, and writes
OUT/rank<r>.pt: this rank's latents and frame range, and on rank 0 every rank's frames (received as the
writer would receive them). TOKENFLOW_TEST_FAULT="<rank>:<step>:<raise|exit|hang>" makes that rank fail at
the start of that step's keyframe pass.
"""
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def clip(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (3, 64, 96), generator=g, dtype=torch.uint8)
    return torch.stack([torch.roll(base, shifts=(i, 3 * i), dims=(1, 2))[:, :, :64] for i in range(n)])


def config(cache: str, pairs: list[str]):
    """The tests' tiny edit, with `key=value` pairs (YAML values) on top."""
    import yaml

    from tokenflow.config import EditConfig
    kw = dict(prompt="a red car", model="tiny-random", batch_size=4, n_inversion_steps=2, n_timesteps=2,
              cache_dir=cache, resume=False)
    kw.update((k, yaml.safe_load(v)) for k, v in (p.split("=", 1) for p in pairs))
    return EditConfig(**kw)


def inject(editor, rank: int) -> None:
    spec = os.environ.get("TOKENFLOW_TEST_FAULT")
    if not spec:
        return
    who, step, how = spec.split(":")
    if int(who) != rank:
        return

    def fault(module, args):
        st = editor.hooks.state if editor.hooks is not None else None
        if st is not None and st.kind == "keyframe" and st.step == int(step):
            Path(os.environ["TOKENFLOW_TEST_FAULT_FILE"]).write_text(how)
            if how == "raise":
                from tokenflow.errors import TokenFlowError
                raise TokenFlowError("injected failure")
            if how == "exit":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "hang":
                signal.pause()
    editor.models.unet.register_forward_pre_hook(fault)


def main() -> int:
    out, cache, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    from tokenflow.cli import _fail
    from tokenflow.distributed import in_memory, join
    from tokenflow.distributed_edit import DistributedEditor
    from tokenflow.errors import TokenFlowError

    cfg = config(cache, sys.argv[4:])
    ranks = join("cpu")
    try:
        editor = DistributedEditor.from_config(cfg, ranks)
        job = editor.prepare(clip(n), cfg)
        ranks.agree()
        inject(editor, ranks.rank)
        res = editor.edit(job, progress=False)
        mine = {"latents": res.latents, "frames": [res.part.start, res.part.stop], "comm": res.comm,
                "resumed": res.resumed_steps, "reused": res.inversion_reused}
        if ranks.leader:
            mine["all_frames"] = in_memory(res.frames)
            ranks.finish()
        else:
            ranks.serve_frames(res.frames)
        torch.save(mine, out / f"rank{ranks.rank}.pt")
    except TokenFlowError as e:
        _fail(str(e), getattr(e, "exit_code", 2), e)
    finally:
        ranks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

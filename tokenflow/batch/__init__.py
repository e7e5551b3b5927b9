"""Batches: one command edits a whole manifest of videos x prompts, or a benchmark suite in its own layout.

    tokenflow-edit batch MANIFEST... -o ROOT [--layout plain|fivebench|v2vbench|loveu]
    python -m tokenflow.batch ...                       the same
    torchrun --nproc-per-node N -m tokenflow.batch ...  N processes (or --nproc N)

Modules: `manifest` (our manifest), `suites` (FiVE-Bench, V2VBench, LOVEU-TGVE 2023 files as they are), `plan`
(settings, probing, problems before any work), `layouts` (where each suite's evaluation reads outputs),
`runner` (the loop: model loaded once, video read and inverted once, prompts edited in turn), `records`
(results.jsonl, resume, summary), `ranks` (torch.distributed), `command` (the command line).
"""


def main(argv=None, **kw) -> int:
    from tokenflow.batch.command import main as _main
    return _main(argv, **kw)


__all__ = ["main"]

"""The metric models (CLIP, PickScore), read from the Hugging Face cache or a local folder, never downloaded.

A model that is not here is a `MetricModelMissing` naming the `hf download` command that fetches it;
`evaluate` then skips the metrics that need it and runs the others. `tiny-random` is a tiny CLIP with
random weights (built offline, like `--model tiny-random`): its numbers are meaningless, it exists for
tests and smoke runs. Loaded models are kept per process, so a batch loads each one once.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from tokenflow.errors import TokenFlowError
from tokenflow.metrics.names import TINY_CLIP



class MetricModelMissing(TokenFlowError):
    """A metric's model is neither a local folder nor in the Hugging Face cache."""


def _missing(name: str, what: str, processor_only: bool = False) -> MetricModelMissing:
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        return MetricModelMissing(f"{what}: {name} is neither a model folder nor a hub id (owner/name)")
    # a processor needs only the small config and tokenizer files, not the weights
    files = ' --include "*.json" --include "*.txt"' if processor_only else ""
    return MetricModelMissing(f"{what}: {name} is not in the Hugging Face cache; download it with "
                              f"`hf download {name}{files}` (metric models are never downloaded on their own)")


def _processor(where: str):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPProcessor

    # The PIL backend on every machine: the torchvision one (chosen when torchvision imports) resizes a
    # little differently, and the numbers would depend on what is installed.
    image = AutoImageProcessor.from_pretrained(where, backend="pil", local_files_only=True)
    return CLIPProcessor(image_processor=image, tokenizer=AutoTokenizer.from_pretrained(where, local_files_only=True))


@contextmanager
def _no_transformers_bars():
    """Without transformers' bar per weight file, which would crowd the metrics' own bar."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@lru_cache(maxsize=4)
def load_clip(name: str, device: str = "cpu", processor: str | None = None, what: str = "CLIP"):
    """(CLIPModel in eval mode on `device`, CLIPProcessor) for a hub id in the cache, a local folder, or
    `tiny-random`. `processor`: where the processor comes from when not from the model (PickScore)."""
    from transformers import CLIPModel

    where = tiny_clip_dir() if name == TINY_CLIP else name
    try:
        with _no_transformers_bars():
            model = CLIPModel.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError):
        raise _missing(name, what) from None
    proc_where = where if processor is None else processor
    try:
        proc = _processor(proc_where)
    except (OSError, ValueError):
        raise _missing(proc_where, f"{what} processor", processor_only=True) from None
    return model.eval().requires_grad_(False).to(device), proc


@lru_cache(maxsize=1)
def tiny_clip_dir() -> str:
    """A tiny CLIP with seeded random weights and the byte-level tokenizer of `tokenflow.tiny`, saved to
    a temporary folder once per process."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    from tokenflow.tiny import tokenizer_dir

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir(), model_max_length=77)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    image = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    d = tempfile.mkdtemp(prefix="tokenflow-tiny-clip-")
    with _no_transformers_bars():
        model.save_pretrained(d)
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(d)
    return d


def resolve_device(name: str | None) -> str:
    """The metrics' device: "auto" (or None) takes a GPU where there is one (tokenflow.models.resolve_device)."""
    from tokenflow.models import resolve_device as engine_device
    return str(engine_device(None if name == "auto" else name))

"""The text conditioning of UNet calls: a few prompts' embeddings, repeated for the rows of a call.

SD 1.x/2.x take token embeddings only; SDXL also a pooled embedding and its size numbers per row
(tokenflow/sdxl.py). `unet_kwargs(n, ...)` gives the keyword arguments of a call whose rows are
[prompt 0 x n | prompt 1 x n | ...], the layout of the editing loop's [source | uncond | cond] rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptEmbeds:
    embeds: torch.Tensor  # [P, 77, D]
    pooled: torch.Tensor | None = None  # [P, D'] SDXL's pooled text embeddings
    time_ids: torch.Tensor | None = None  # [6] SDXL's size numbers, the same for every row

    def __len__(self) -> int:
        return len(self.embeds)

    def select(self, which) -> "PromptEmbeds":
        """The prompts `which` (an index, slice or list), in that order."""
        which = [which] if isinstance(which, int) else which
        return PromptEmbeds(self.embeds[which], None if self.pooled is None else self.pooled[which], self.time_ids)

    def unet_kwargs(self, n: int, device: torch.device, dtype: torch.dtype) -> dict:
        """encoder_hidden_states (and SDXL's added_cond_kwargs) for rows [prompt 0 x n | prompt 1 x n | ...]."""
        def rows(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device, dtype)
            # one prompt: a broadcast view, as the engine has always passed it (the UNet's rounding can depend on
            # the layout, and stored inversions were computed this way)
            return t.expand(n, *t.shape[1:]) if len(t) == 1 else t.repeat_interleave(n, dim=0)

        kw = {"encoder_hidden_states": rows(self.embeds)}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": rows(self.pooled),
                                       "time_ids": self.time_ids.to(device, dtype).expand(n * len(self), -1)}
        return kw


def as_prompt_embeds(embs) -> PromptEmbeds:
    """A PromptEmbeds as it is, or plain [P, 77, D] embeddings (SD 1.x/2.x) wrapped."""
    return embs if isinstance(embs, PromptEmbeds) else PromptEmbeds(embs)

"""CLIP text alignment and CLIP frame consistency, as the LOVEU-TGVE 2023 evaluation computes them.

- `clip_text`: mean over frames of 100 cos(E_frame, E_prompt), the CLIP score of torchmetrics'
  `CLIPScore` (which also clamps the mean at 0; CLIP ViT-L/14's logit scale is exactly 100, so this is
  the LOVEU script's mean `logits_per_image`).
- `clip_frame`: mean cosine similarity of the image embeddings over all ordered pairs of distinct
  frames (the LOVEU script's `clip_score_frame`). It does not depend on the frames' order.
- `clip_frame_consecutive`: mean cosine of consecutive frames' embeddings (the frame consistency of
  Tune-A-Video and most editing papers), which does see the order: shuffled frames score lower.

As in the LOVEU script, each frame is first resized (bicubic) to 480x480, then goes through the model's
processor (224x224 for ViT-L/14). Embeddings are computed in chunks of frames; the pair sums are kept
as running sums, so a chunked computation equals a whole one.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

LOVEU_SIZE = (480, 480)  # the LOVEU-TGVE 2023 script resizes every frame to this before its processor


def loveu_frames(frames: torch.Tensor) -> list[torch.Tensor]:
    """uint8 [n, 3, H, W] -> list of uint8 [3, 480, 480], resized with PIL's bicubic as the LOVEU script does."""
    out = []
    for f in frames:
        im = Image.fromarray(f.permute(1, 2, 0).cpu().numpy()).resize(LOVEU_SIZE, Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return out


def _embedding(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class Embeddings(torch.nn.Module):
    """A CLIPModel as torchmetrics' CLIPScore calls it, returning embedding tensors (torchmetrics 1.9
    cannot read transformers 5's ModelOutput: Lightning-AI/torchmetrics#3407), and keeping the image
    embeddings of its last call, so one pass over the frames serves both CLIP metrics."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.last_images: torch.Tensor | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def logit_scale(self):
        return self.model.logit_scale

    def get_image_features(self, pixel_values, **kw) -> torch.Tensor:
        self.last_images = _embedding(self.model.get_image_features(pixel_values=pixel_values, **kw))
        return self.last_images

    def get_text_features(self, input_ids, attention_mask=None, **kw) -> torch.Tensor:
        return _embedding(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kw))


def image_embeddings(model: Embeddings, processor, images: list[torch.Tensor], device) -> torch.Tensor:
    pixels = processor(images=[i.cpu() for i in images], return_tensors="pt")["pixel_values"]
    return model.get_image_features(pixels.to(device))


class ClipScores:
    """Accumulates `clip_text` (when a prompt is given) and the two frame consistencies over chunks of
    uint8 [n, 3, H, W] frames: `update(chunk)` in order, then `compute()`."""

    def __init__(self, model, processor, prompt: str | None, device: str):
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.embed = Embeddings(model)
        self.processor = processor
        self.prompt = prompt
        self.device = device
        self.text = CLIPScore(model_name_or_path=lambda: (self.embed, processor)).to(device) if prompt else None
        self.sum = None  # running sum of the unit image embeddings (float64)
        self.sq = 0.0  # running sum of their squared norms (1 up to rounding)
        self.consecutive = 0.0
        self.n = 0
        self.last = None

    @torch.no_grad()
    def update(self, frames: torch.Tensor) -> None:
        images = [i.to(self.device) for i in loveu_frames(frames)]
        if self.text is not None:
            self.text.update(images, [self.prompt] * len(images))
            e = self.embed.last_images
        else:
            e = image_embeddings(self.embed, self.processor, images, self.device)
        e = torch.nn.functional.normalize(e.double(), dim=-1).cpu()
        self.sum = e.sum(0) if self.sum is None else self.sum + e.sum(0)
        self.sq += float((e * e).sum())
        chain = e if self.last is None else torch.cat([self.last, e])
        self.consecutive += float((chain[1:] * chain[:-1]).sum())
        self.last = e[-1:]
        self.n += len(e)

    def compute(self) -> dict[str, float | None]:
        n = self.n
        out = {}
        if self.text is not None:
            out["clip_text"] = float(self.text.compute())
        # sum over ordered pairs i != j of e_i . e_j = |sum e|^2 - sum |e_i|^2
        out["clip_frame"] = float((self.sum @ self.sum - self.sq) / (n * (n - 1))) if n > 1 else None
        out["clip_frame_consecutive"] = self.consecutive / (n - 1) if n > 1 else None
        return out


class PickScore:
    """PickScore (Kirstain et al., NeurIPS 2023) of each frame with the prompt, averaged over frames, as
    the LOVEU-TGVE 2023 script computes it: logit_scale.exp() * cos(E_prompt, E_frame), with PickScore's
    own model and the CLIP-ViT-H-14 processor."""

    def __init__(self, model, processor, prompt: str, device: str):
        self.embed = Embeddings(model)
        self.processor = processor
        self.device = device
        with torch.no_grad():
            t = processor(text=[prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
            text = self.embed.get_text_features(t["input_ids"].to(device), t["attention_mask"].to(device))
            self.text = torch.nn.functional.normalize(text.double(), dim=-1)[0]
            self.scale = float(model.logit_scale.exp())
        self.total = 0.0
        self.n = 0

    @torch.no_grad()
    def update(self, frames: torch.Tensor) -> None:
        e = image_embeddings(self.embed, self.processor, loveu_frames(frames), self.device)
        e = torch.nn.functional.normalize(e.double(), dim=-1)
        self.total += float((self.scale * (e @ self.text)).sum())
        self.n += len(e)

    def compute(self) -> dict[str, float | None]:
        return {"pick_score": self.total / self.n if self.n else None}

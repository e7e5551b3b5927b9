"""The metrics' names, definitions and default models (no heavy imports: the CLI's --help reads them)."""
from __future__ import annotations

# What can be asked for; each also reports the companions listed in NUMBERS.
METRICS = ("clip_text", "clip_frame", "pick_score", "warp_error")
# Every number `evaluate` can return: key -> (name, definition and the suite or paper it matches).
NUMBERS = {
    "clip_text": ("CLIP text alignment", "mean over frames of 100 cos(frame, prompt) CLIP embeddings (LOVEU-TGVE 2023)"),
    "clip_frame": ("CLIP frame consistency", "mean cos of CLIP image embeddings over all pairs of frames (LOVEU-TGVE 2023)"),
    "clip_frame_consecutive": ("CLIP consecutive-frame consistency",
                               "mean cos of consecutive frames' CLIP embeddings (Tune-A-Video and most editing papers)"),
    "pick_score": ("PickScore", "mean over frames of PickScore_v1's logit_scale * cos(frame, prompt) (LOVEU-TGVE 2023)"),
    "warp_error": ("warp error", "mean |edit_t - edit_t+1 warped to t by the source's flow| over consistent pixels, in "
                                 "[0, 1] (TokenFlow's warp-err; Lai et al. 2018)"),
    "warp_error_source": ("warp error of the source", "the same measure on the source itself: the floor an edit can reach"),
    "warp_trusted_fraction": ("warp: pixels used", "fraction of pixels that pass the forward-backward flow check"),
}
FLOWS = ("dis", "raft")
DEFAULT_CHUNK = 16  # frames per metric step

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # the LOVEU-TGVE 2023 evaluation's CLIP
DEFAULT_PICK_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICK_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's own processor (tokenizer + image transform)
TINY_CLIP = "tiny-random"


def metric_values(result: dict) -> dict[str, float]:
    """The numbers of an `evaluate` result, in NUMBERS order (the rest of the result describes them)."""
    return {k: result[k] for k in NUMBERS if isinstance(result.get(k), (int, float)) and not isinstance(result[k], bool)}

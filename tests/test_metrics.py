"""The evaluation metrics, validated on the bundled sample (whose true motion is known) and against plain
reference computations of their definitions, with a tiny random CLIP saved to a folder (nothing downloaded)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("cv2")
pytest.importorskip("torchmetrics")

from tokenflow.metrics import evaluate  # noqa: E402
from tokenflow.metrics.clip import Embeddings, image_embeddings, loveu_frames  # noqa: E402
from tokenflow.metrics.flow import DISFlow  # noqa: E402
from tokenflow.metrics.models import load_clip, tiny_clip_dir  # noqa: E402
from tokenflow.metrics.warp import FB_ALPHA, FB_BETA, WarpError  # noqa: E402
from tokenflow.sample import SAMPLE_PATH, flow as true_flow  # noqa: E402
from tokenflow.video import read_frames  # noqa: E402

PROMPT = "a marble sculpture"  # its tiny-CLIP text alignment is positive, so torchmetrics' clamp at 0 hides nothing


@pytest.fixture(scope="module")
def sample():
    return read_frames(SAMPLE_PATH)  # the encoded clip, as a user's video would be read


@pytest.fixture(scope="module")
def clip_dir():
    return tiny_clip_dir()  # CLIPModel(CLIPConfig(...)) with small dims and seeded weights, saved to a folder


def shuffled(frames: torch.Tensor) -> torch.Tensor:
    perm = torch.randperm(len(frames), generator=torch.Generator().manual_seed(0))
    return frames[perm]


# -- flow and warp error -----------------------------------------------------------------------------

def test_dis_flow_end_point_error_on_the_sample(sample):
    dis = DISFlow()
    epe, motion = [], []
    for i in range(len(sample) - 1):
        gt = true_flow(i).transpose(1, 2, 0)
        epe.append(np.linalg.norm(dis(sample[i], sample[i + 1]) - gt, axis=-1).mean())
        motion.append(np.linalg.norm(gt, axis=-1).mean())
    # every pixel, occlusion boundaries included; the true motion is 3 to 8 px per frame
    print(f"DIS end-point error on the sample: mean {np.mean(epe):.3f} px, worst pair {np.max(epe):.3f} px "
          f"(mean true motion {np.mean(motion):.2f} px)")
    assert np.mean(epe) < 0.4 and np.max(epe) < 0.6
    assert np.mean(epe) < 0.15 * np.mean(motion)


def test_warp_error_is_near_zero_on_the_sample_and_10x_larger_shuffled(sample):
    clip = sample[:24]
    own = evaluate(clip, clip, metrics=["warp_error"])
    mixed = evaluate(shuffled(clip), clip, metrics=["warp_error"])
    print(f"warp error: sample {own['warp_error']:.4f}, shuffled {mixed['warp_error']:.4f}")
    assert own["warp_error"] == own["warp_error_source"] < 0.015
    assert mixed["warp_error"] >= 10 * own["warp_error"]
    assert mixed["warp_error_source"] == own["warp_error_source"]  # the flow comes from the source alone
    assert 0.9 < own["warp_trusted_fraction"] <= 1.0


def reference_warp_error(source: torch.Tensor, edited: torch.Tensor, flow) -> float:
    """The definition in plain PyTorch: grid_sample warping, the forward-backward check, masked mean |diff|."""
    errs = []
    for t in range(len(source) - 1):
        fwd = torch.from_numpy(flow(source[t], source[t + 1]))
        bwd = torch.from_numpy(flow(source[t + 1], source[t]))
        H, W = fwd.shape[:2]
        yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
        tx, ty = xx + fwd[..., 0], yy + fwd[..., 1]
        grid = torch.stack([2 * tx / (W - 1) - 1, 2 * ty / (H - 1) - 1], -1)[None]

        def sample_at(img):  # [C, H, W] at (tx, ty), bilinear
            return torch.nn.functional.grid_sample(img[None].float(), grid, mode="bilinear", padding_mode="border",
                                                   align_corners=True)[0]

        back = sample_at(bwd.permute(2, 0, 1)).permute(1, 2, 0)
        ok = ((fwd + back) ** 2).sum(-1) <= FB_ALPHA * ((fwd ** 2).sum(-1) + (back ** 2).sum(-1)) + FB_BETA
        ok &= (tx >= 0) & (tx <= W - 1) & (ty >= 0) & (ty <= H - 1)
        diff = (edited[t].float() / 255 - sample_at(edited[t + 1].float() / 255)).abs().mean(0)
        errs.append(float(diff[ok].mean()))
    return float(np.mean(errs))


@pytest.mark.parametrize("size", [(37, 23), (64, 48)])  # odd sizes too
def test_warp_error_matches_the_plain_reference(sample, size):
    from tokenflow.video import resize_frames

    src = resize_frames(sample[:6], *size, "stretch")
    edit = torch.flip(src, dims=[1])  # an "edit" with different colours but the same motion
    w = WarpError(DISFlow())
    w.update(src, edit)
    assert w.compute()["warp_error"] == pytest.approx(reference_warp_error(src, edit, DISFlow()), abs=2e-4)


def test_warp_error_of_a_known_translation():
    # The frames move 2 px right per frame; an edit that moves with them has (almost) no warp error,
    # one that stands still has a large one.
    g = torch.Generator().manual_seed(1)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=g), size=(48, 64), mode="bicubic",
                                           align_corners=False)[0].clamp(0, 1).mul(255).to(torch.uint8)
    src = torch.stack([torch.roll(base, 2 * i, dims=2) for i in range(5)])
    still = base[None].repeat(5, 1, 1, 1)
    moving = evaluate(255 - src, src, metrics=["warp_error"])["warp_error"]
    static = evaluate(255 - still, src, metrics=["warp_error"])["warp_error"]
    assert moving < 0.02 and static > 5 * moving


# -- CLIP ----------------------------------------------------------------------------------------------

def clip_metrics(frames, clip_dir, **kw):
    kw.setdefault("metrics", ["clip_text", "clip_frame"])
    return evaluate(frames, None, PROMPT, clip_model=clip_dir, **kw)


def test_clip_frame_consistency_is_one_for_a_still_video(sample, clip_dir):
    still = sample[:1].repeat(12, 1, 1, 1)
    r = clip_metrics(still, clip_dir)
    assert r["clip_frame"] == pytest.approx(1.0, abs=1e-9)
    assert r["clip_frame_consecutive"] == pytest.approx(1.0, abs=1e-9)


def test_clip_frame_consistency_of_moving_and_shuffled_frames(sample, clip_dir):
    ordered = clip_metrics(sample, clip_dir)
    mixed = clip_metrics(shuffled(sample), clip_dir)
    # all pairs (LOVEU-TGVE's definition) cannot see the order; consecutive frames can
    assert mixed["clip_frame"] == pytest.approx(ordered["clip_frame"], abs=1e-9)
    assert mixed["clip_frame"] < 1.0 - 1e-3
    assert mixed["clip_frame_consecutive"] < ordered["clip_frame_consecutive"] - 1e-3
    assert mixed["clip_text"] == pytest.approx(ordered["clip_text"], rel=1e-6)


def test_clip_metrics_match_the_loveu_definitions(sample, clip_dir):
    frames = sample[::4]
    r = clip_metrics(frames, clip_dir, metrics=["clip_text", "clip_frame", "pick_score"], pick_model=clip_dir,
                     pick_processor=clip_dir)
    model, proc = load_clip(clip_dir)
    emb = Embeddings(model)
    with torch.no_grad():
        img = image_embeddings(emb, proc, loveu_frames(frames), "cpu").double()
        t = proc(text=[PROMPT], return_tensors="pt", padding=True)
        txt = emb.get_text_features(t["input_ids"], t["attention_mask"]).double()
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    cos = img @ img.T
    n = len(frames)
    text_cos = (img @ txt.T)[:, 0]
    assert r["clip_text"] > 0 and r["clip_text"] == pytest.approx(float(100 * text_cos.mean()), rel=1e-5)
    assert r["clip_frame"] == pytest.approx(float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))), rel=1e-6)
    assert r["clip_frame_consecutive"] == pytest.approx(float(cos.diagonal(1).mean()), rel=1e-6)
    scale = float(model.logit_scale.exp())
    assert r["pick_score"] == pytest.approx(float(scale * text_cos.mean()), rel=1e-5)


def test_chunked_equals_whole(sample, clip_dir):
    clip = sample[:20]
    kw = dict(clip_model=clip_dir, pick_model=clip_dir, pick_processor=clip_dir)
    whole = evaluate(clip, clip.flip(1), PROMPT, chunk_frames=len(clip), **kw)
    chunked = evaluate(clip, clip.flip(1), PROMPT, chunk_frames=3, **kw)  # 20 = 6 x 3 + 2
    for k in ("clip_text", "clip_frame", "clip_frame_consecutive", "pick_score", "warp_error", "warp_error_source"):
        assert chunked[k] == pytest.approx(whole[k], rel=1e-6, abs=1e-9), k
    assert not whole["skipped"]


def test_a_missing_model_skips_its_metrics_with_the_download_command(sample):
    r = evaluate(sample[:4], sample[:4], PROMPT, clip_model="tokenflow-tests/no-such-clip",
                 pick_model="tokenflow-tests/no-such-pickscore")
    assert "hf download tokenflow-tests/no-such-clip" in r["skipped"]["clip_text"]
    assert "hf download tokenflow-tests/no-such-pickscore" in r["skipped"]["pick_score"]
    assert all("\n" not in why for why in r["skipped"].values())
    assert r["warp_error"] is not None  # the other metrics still ran


def test_raft_runs_only_with_torchvision_and_cached_weights(sample):
    r = evaluate(sample[:3], sample[:3], metrics=["warp_error"], flow="raft")
    if "warp_error" in r["skipped"]:
        why = r["skipped"]["warp_error"]
        assert why.startswith("RAFT flow:") and "\n" not in why and ("torchvision" in why or "torch hub cache" in why)
    else:
        assert r["warp_error"] < 0.015 and r["models"]["flow"] == "raft"


def test_bad_requests_are_one_line_errors(sample):
    from tokenflow.errors import TokenFlowError

    with pytest.raises(TokenFlowError, match="needs a prompt"):
        evaluate(sample[:2], sample[:2], None, metrics=["clip_text"])
    with pytest.raises(TokenFlowError, match="needs the source video"):
        evaluate(sample[:2], None, PROMPT, metrics=["warp_error"])
    with pytest.raises(TokenFlowError, match="unknown metric"):
        evaluate(sample[:2], sample[:2], PROMPT, metrics=["fvd"])
    with pytest.raises(TokenFlowError, match="frames of"):
        evaluate(sample[:4], sample[:2], PROMPT, metrics=["warp_error"])

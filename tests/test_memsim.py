"""tokenflow.memsim (the editing loop on the meta device, live bytes counted) and the planner checked
against it at SD 2.1-base 512x512, the shapes the planner's constants were fitted to."""
import pytest
import torch

from tokenflow.memsim import LiveBytes, simulate_edit
from tokenflow.planner import BYTES_PER_TOKEN_CHANNEL, plan_for, records_bytes

from tokenflow.tiny import SD21_UNET_CONFIG

GiB = 2**30


def planned(unet, *, keyframes, allocated, max_gpu_mem=None, chunk_frames=None):
    """The planner at SD 2.1-base 512x512 (latents 64x64), fp16, B = 8, on a GPU with 70 GiB free."""
    return plan_for(unet, torch.float16, 64, 64, keyframes=keyframes, batch_size=8, chunk_frames=chunk_frames,
                    max_gpu_mem=max_gpu_mem, free=70 * GiB, allocated=allocated)


def test_live_bytes_counts_what_is_alive_at_once():
    with torch.device("meta"):
        mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).half()
        x = torch.empty(32, 64, dtype=torch.half)
    with LiveBytes() as lb, torch.no_grad():
        y = mlp(x)
        peak_one = lb.peak
        y.t()  # a view: no new storage
        assert lb.live == y.numel() * 2
        y = mlp(x)  # the previous y is alive while the new one is computed
    # Linear's output and GELU's output coexist (32 x 256 halves each); the weights were made outside.
    assert peak_one == 2 * 32 * 256 * 2
    assert lb.peak == peak_one + 32 * 64 * 2
    del y
    assert lb.live == 0


def test_tiny_edit_simulation_grows_with_the_chunk_and_offloading_frees_the_records():
    from tokenflow.tiny import TINY_MODEL, build_tiny_models

    unet = build_tiny_models(TINY_MODEL, device="meta")[3]
    sim = lambda chunk, off: simulate_edit(unet.config, frames=48, height=64, width=64, chunk_frames=chunk,  # noqa: E731
                                           offload_records=off, dtype=torch.float32).peak_bytes
    assert sim(8, False) < sim(16, False) < sim(32, False)  # 1, 2, 4 groups of 8 frames per call
    records = records_bytes(unet, 6, 8, 8, torch.float32)
    assert sim(8, False) - sim(8, True) >= 0.9 * records


def test_group_pass_activations_match_the_planner_constant():
    # 16 frames, 2 keyframes, 8 or 16 frames per call: the group pass peaks. What one more frame costs,
    # per row (frame x branch) per latent token per first-level channel: the planner's constant within 10%.
    sims = [simulate_edit(SD21_UNET_CONFIG, frames=16, height=512, width=512, chunk_frames=c, offload_records=True)
            for c in (8, 16)]
    assert all("group" in s.peak_at for s in sims)
    per = (sims[1].peak_bytes - sims[0].peak_bytes) / (8 * 3 * 64 * 64 * 320)
    assert abs(per - BYTES_PER_TOKEN_CHANNEL) / BYTES_PER_TOKEN_CHANNEL < 0.1, per


def test_keyframe_pass_activations_match_the_planner_constant():
    # 200 and 296 frames (25 and 37 keyframes), 8 frames per call, records offloaded: the keyframe pass
    # peaks, and what one more keyframe costs per row per latent token per first-level channel is the
    # planner's constant within 10% (it rounds the simulated 22.2 up).
    from tokenflow.planner import KEYFRAME_BYTES_PER_TOKEN_CHANNEL

    sims = [simulate_edit(SD21_UNET_CONFIG, frames=n, height=512, width=512, chunk_frames=8, offload_records=True)
            for n in (200, 296)]
    assert all("keyframe" in s.peak_at for s in sims)
    per = (sims[1].peak_bytes - sims[0].peak_bytes) / (12 * 3 * 64 * 64 * 320)
    assert 0.9 * KEYFRAME_BYTES_PER_TOKEN_CHANNEL <= per <= KEYFRAME_BYTES_PER_TOKEN_CHANNEL, per


@pytest.mark.parametrize("frames,max_gpu_mem", [(400, 20), (600, 20)])  # records on the GPU; offloaded
def test_plans_stay_within_the_budget_in_simulation(frames, max_gpu_mem):
    from tokenflow.memsim import meta_unet

    unet = meta_unet(SD21_UNET_CONFIG)
    weights = 2.4 * GiB  # SD 2.1 UNet + VAE + text encoder in fp16
    K = frames // 8
    plan = planned(unet, keyframes=K, max_gpu_mem=max_gpu_mem, allocated=int(weights))
    sim = simulate_edit(SD21_UNET_CONFIG, frames=frames, height=512, width=512, chunk_frames=plan.frames_per_call,
                        offload_records=plan.offload_records)
    assert sim.peak_bytes <= plan.estimate <= 1.4 * sim.peak_bytes  # the estimate is safe and not wasteful
    assert sim.peak_bytes + weights <= 0.75 * max_gpu_mem * GiB  # room left for fragmentation and workspaces


def test_vae_per_pixel_constant_matches_the_simulation():
    from tokenflow.planner import VAE_BYTES_PER_PIXEL
    from tokenflow.memsim import simulate_vae
    from tokenflow.tiny import SD21_RANDOM, build_tiny_models

    vae = build_tiny_models(SD21_RANDOM, device="meta")[0]
    sim = simulate_vae(vae.config, frames=2, height=512, width=384)
    per_pixel = {k: v / (2 * 512 * 384) for k, v in sim.items()}
    assert per_pixel["encode"] <= per_pixel["decode"] <= VAE_BYTES_PER_PIXEL * 1.02, per_pixel
    assert per_pixel["decode"] >= 0.9 * VAE_BYTES_PER_PIXEL, per_pixel


def test_planner_flags_and_an_impossible_budget(caplog):
    import logging

    from tokenflow.memsim import meta_unet

    unet = meta_unet(SD21_UNET_CONFIG)
    w = int(2.4 * GiB)
    fixed = planned(unet, keyframes=50, chunk_frames=12, allocated=w)
    # --chunk-frames wins for the UNet and the VAE
    assert (fixed.frames_per_call, fixed.vae_frames_per_call) == (12, 12)
    roomy = planned(unet, keyframes=5, allocated=w)
    assert not roomy.offload_records and roomy.frames_per_call == 64 and roomy.vae_frames_per_call >= 32
    with caplog.at_level(logging.WARNING, logger="tokenflow"):
        tight = planned(unet, keyframes=125, max_gpu_mem=6, allocated=w)
    assert tight.offload_records and tight.frames_per_call == 1
    assert "keyframe pass of 125 keyframes needs about" in caplog.text
    # Inversion runs one row per frame: three times the frames of an edit call in the same budget.
    edit, invert = (planned(unet, keyframes=k, max_gpu_mem=6, allocated=w) for k in (1, 0))
    assert invert.frames_per_call >= 2 * edit.frames_per_call > 0


@pytest.mark.slow  # two simulations of 512 and 768 frames on the meta device
def test_a_ranks_gathered_keys_match_the_planner_constant():
    # One rank of 32 or of 48 with the same 8 keyframes of its own (groups of 2: 16 frames each): once the keys and
    # values gathered from every rank dominate its keyframe pass, each more keyframe in the video costs the planner's
    # constant (two fp16 rows at the first level) per latent token per first-level channel.
    from tokenflow.planner import GATHERED_BYTES_PER_TOKEN_CHANNEL

    sims = [simulate_edit(SD21_UNET_CONFIG, frames=16 * w, batch_size=2, height=512, width=512, chunk_frames=8,
                          offload_records=True, world=w, qk_injection=False) for w in (32, 48)]
    assert [s.keyframes for s in sims] == [8, 8] and all("keyframe" in s.peak_at for s in sims)
    per = (sims[1].peak_in["keyframe"] - sims[0].peak_in["keyframe"]) / (16 * 8 * 64 * 64 * 320)
    assert abs(per - GATHERED_BYTES_PER_TOKEN_CHANNEL) / GATHERED_BYTES_PER_TOKEN_CHANNEL < 0.05, per


@pytest.mark.parametrize("ranks", [4])
def test_per_rank_plans_stay_within_the_budget_in_simulation(ranks):
    # 1000 frames (125 keyframes) under --max-gpu-mem 20: the busiest rank's simulated step fits the planner's
    # per-rank estimate (its keyframes, the one it receives, the gathered keys), which is not wasteful either.
    from tokenflow.keyframes import split_groups
    from tokenflow.memsim import meta_unet
    from tokenflow.planner import GATHERED_BYTES_PER_TOKEN_CHANNEL

    unet = meta_unet(SD21_UNET_CONFIG)
    weights = 2.4 * GiB
    most = max(len(p) for p in split_groups(125, ranks, 8))
    plan = plan_for(unet, torch.float16, 64, 64, keyframes=most + 1, gathered_keyframes=ranks * most, batch_size=8,
                    chunk_frames=None, max_gpu_mem=20, free=70 * GiB, allocated=int(weights))
    sim = simulate_edit(SD21_UNET_CONFIG, frames=1000, height=512, width=512, chunk_frames=plan.frames_per_call,
                        offload_records=plan.offload_records, world=ranks, qk_injection=False)
    assert sim.keyframes == most  # the busiest rank: the most keyframes (counting the one it receives)
    assert sim.peak_bytes <= plan.estimate <= 1.4 * sim.peak_bytes
    # Its keyframe pass: between one process's over its own keyframes and one process's over those and the one it
    # receives plus the two gathered rows of every rank's keyframes.
    own, with_received = (simulate_edit(SD21_UNET_CONFIG, frames=8 * k, height=512, width=512,
                                        chunk_frames=plan.frames_per_call, offload_records=plan.offload_records,
                                        qk_injection=False).peak_in["keyframe"] for k in (most, most + 1))
    gathered = GATHERED_BYTES_PER_TOKEN_CHANNEL * ranks * most * 64 * 64 * 320
    assert own <= sim.peak_in["keyframe"] <= with_received + gathered

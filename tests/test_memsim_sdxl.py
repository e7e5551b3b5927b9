"""The planner's SDXL and ControlNet constants against tokenflow.memsim (SDXL base's UNet at 1024x1024 on the
meta device; ControlNets made from the UNet's config). Few frames keep the simulations short: the constants
are per row, per keyframe and per latent token, so they do not depend on the video's length."""
import pytest
import torch

from tokenflow.memsim import meta_controlnet, meta_unet, simulate_edit
from tokenflow.planner import SD_PROFILE, SDXL_PROFILE, plan_for
from tokenflow.sdxl import SDXL_UNET_CONFIG
from tokenflow.tiny import SD21_UNET_CONFIG

GiB = 2**30
UNIT = 128 * 128 * 320  # SDXL at 1024: latent tokens x first-level channels


def per_unit(a, b, rows):
    return (b.peak_bytes - a.peak_bytes) / (rows * UNIT)


def test_sdxl_group_pass_constants():
    """16 frames, 2 keyframes, 8 or 16 frames per call (the group pass peaks): what 8 more frames cost per row,
    without and with a ControlNet, within 10% of the planner's SDXL constants."""
    for control, want in ((0, SDXL_PROFILE.row), (1, SDXL_PROFILE.row + SDXL_PROFILE.control_row)):
        sims = [simulate_edit(SDXL_UNET_CONFIG, frames=16, height=1024, width=1024, chunk_frames=c,
                              offload_records=True, controlnets=control) for c in (8, 16)]
        assert all("group" in s.peak_at for s in sims)
        got = per_unit(*sims, rows=8 * 3)
        assert abs(got - want) / want < 0.1, (control, got)


def test_sdxl_keyframe_pass_constants():
    """One frame per group (every frame a keyframe), 2 or 3 keyframes, records offloaded: the keyframe pass
    peaks, and what a keyframe costs per row is within the planner's constant and 90% of it."""
    for control, want in ((0, SDXL_PROFILE.keyframe), (1, SDXL_PROFILE.keyframe + SDXL_PROFILE.control_keyframe)):
        sims = [simulate_edit(SDXL_UNET_CONFIG, frames=n, height=1024, width=1024, chunk_frames=1, batch_size=1,
                              offload_records=True, controlnets=control) for n in (2, 3)]
        assert all("keyframe" in s.peak_at for s in sims)
        got = per_unit(*sims, rows=3)
        assert 0.9 * want <= got <= want, (control, got)


def test_sd_controlnet_constants():
    """SD 2.1 at 512 with a ControlNet: the added bytes per row of a group call and per keyframe row."""
    unit = 64 * 64 * 320
    group = [simulate_edit(SD21_UNET_CONFIG, frames=16, height=512, width=512, chunk_frames=c, offload_records=True,
                           controlnets=1) for c in (8, 16)]
    assert abs((group[1].peak_bytes - group[0].peak_bytes) / (24 * unit)
               - (SD_PROFILE.row + SD_PROFILE.control_row)) / (SD_PROFILE.row + SD_PROFILE.control_row) < 0.1
    key = [simulate_edit(SD21_UNET_CONFIG, frames=n, height=512, width=512, chunk_frames=1, batch_size=1,
                         offload_records=True, controlnets=1) for n in (3, 5)]
    got = (key[1].peak_bytes - key[0].peak_bytes) / (6 * unit)
    want = SD_PROFILE.keyframe + SD_PROFILE.control_keyframe
    assert 0.9 * want <= got <= want, got


@pytest.mark.parametrize("control", [0, 1])
def test_sdxl_plan_stays_within_its_budget_in_simulation(control):
    """40 frames at 1024x1024 in groups of 4 under --max-gpu-mem 24 (weights: UNet, ControlNet, VAE in float32,
    both text encoders in float16): the plan's estimate covers the simulated peak and stays within the budget.
    It over-counts about 2x here: SDXL's records are large (60 layers at 32x32, 0.84 GB per keyframe), and
    with them offloaded the planner counts a group call's window of every layer's records as resident at
    once, on top of the keyframe pass, where the group pass copies one layer's window at a time."""
    unet = meta_unet(SDXL_UNET_CONFIG)
    weights = 6.6 * GiB + control * 2.3 * GiB
    plan = plan_for(unet, torch.float16, 128, 128, keyframes=10, batch_size=4, chunk_frames=None, max_gpu_mem=24,
                    free=70 * GiB, allocated=int(weights), controlnets=control, vae_dtype=torch.float32)
    sim = simulate_edit(SDXL_UNET_CONFIG, frames=40, height=1024, width=1024, chunk_frames=plan.frames_per_call,
                        batch_size=4, offload_records=plan.offload_records, controlnets=control)
    assert plan.offload_records
    assert sim.peak_bytes <= plan.estimate <= 2.2 * sim.peak_bytes, (sim.peak_bytes / GiB, plan.estimate / GiB)
    assert sim.peak_bytes + weights <= 0.75 * 24 * GiB


def test_meta_controlnet_is_shaped_like_the_released_ones():
    """diffusers' from_unet on SDXL's config: 1.25 billion parameters, as diffusers/controlnet-canny-sdxl-1.0."""
    net = meta_controlnet(meta_unet(SDXL_UNET_CONFIG))
    assert 1.2e9 < sum(p.numel() for p in net.parameters()) < 1.3e9

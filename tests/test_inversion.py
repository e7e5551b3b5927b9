"""DDIM inversion and the latent store."""
import pytest
import torch
from diffusers import DDIMScheduler

from tokenflow.inversion import ddim_invert, psnr
from tokenflow.models import load_models
from tokenflow.schedule import Schedule, inverter
from tokenflow.tiny import build_tiny_models


def test_inverse_scheduler_follows_the_spec_formula():
    sched_cfg = build_tiny_models()[4]
    abar = DDIMScheduler.from_config(sched_cfg).alphas_cumprod
    final_alpha = abar[0]  # set_alpha_to_one = False, as SD 1.x/2.x
    inv = inverter(sched_cfg, 500)
    ts = [int(t) for t in inv.timesteps]
    assert ts[:3] == [1, 3, 5] and ts[-1] == 999
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(ts[:5]):
        eps = torch.randn(2, 4, 8, 8, generator=g)
        a_prev = abar[ts[i - 1]] if i > 0 else final_alpha
        x0 = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        expected = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
        x = inv.step(eps, t, x).prev_sample
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_kept_timesteps_are_the_sampling_ones_plus_the_last():
    sched_cfg = build_tiny_models()[4]
    keep = Schedule.build(sched_cfg, n_inversion_steps=500, n_timesteps=50).kept
    assert keep[0] == 1 and keep[-2] == 981 and keep[-1] == 999 and len(keep) == 51
    assert Schedule.build(sched_cfg, n_inversion_steps=50, n_timesteps=50).kept[-1] == 981


@pytest.mark.parametrize("variant,damp,bound", [("tiny-random", 0.1, 0.03), ("tiny-random-v", 1.0, 0.1)])
def test_inversion_then_sampling_reconstructs_the_latents(variant, damp, bound):
    """DDIM is (nearly) invertible: sampling the inverted latent back returns the start (v-prediction too).
    The inversion's error grows with how fast the model's output changes with x; a random epsilon UNet
    is much rougher than a trained one, so its output layer is damped (a v-model is smooth in eps)."""
    m = load_models(variant, device=torch.device("cpu"), dtype=torch.float32)
    m.unet.conv_out.weight.data *= damp
    m.unet.conv_out.bias.data *= damp
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    emb = m.encode_prompt([""])
    n = 50
    kept = ddim_invert(m, x0, emb, Schedule.build(m.scheduler_config, n_inversion_steps=n, n_timesteps=n))
    x = kept[981]
    assert (x - x0).abs().mean() > 0.3  # inversion actually moved it
    sched = DDIMScheduler.from_config(m.scheduler_config)
    sched.set_timesteps(n)
    with torch.no_grad():
        for t in sched.timesteps:
            out = m.unet(x, t, encoder_hidden_states=emb.expand(2, -1, -1)).sample
            x = sched.step(out, t, x).prev_sample
    err = (x - x0).abs().mean() / x0.abs().mean()
    assert err < bound, err


def test_store_is_reused_and_resumes_after_an_interruption(tiny_editor, clip, tiny_cfg, unet_calls):
    cfg = tiny_cfg.replace(chunk_frames=4)  # 10 frames: chunks of 4, 4, 2 frames
    steps = cfg.n_inversion_steps

    class Interrupt(Exception):
        pass

    def boom(*_):
        if unet_calls.n == steps + 3:  # in the middle of the second chunk
            raise Interrupt
    h = tiny_editor.models.unet.register_forward_pre_hook(boom)
    try:
        with pytest.raises(Interrupt):
            tiny_editor.invert(clip, cfg, progress=False)
    finally:
        h.remove()
    unet_calls.n = 0
    inv = tiny_editor.invert(clip, cfg, progress=False)
    assert unet_calls.n == 2 * steps and inv.chunks_inverted == 2 and not inv.reused  # chunk 1 kept
    assert not list(inv.path.glob("*.tmp")) and not list(inv.path.glob(".*"))  # no partial files
    unet_calls.n = 0
    again = tiny_editor.invert(clip, cfg, progress=False)
    assert unet_calls.n == 0 and again.reused and again.path == inv.path
    # A different inversion prompt is a different entry.
    other = tiny_editor.invert(clip, cfg.replace(inversion_prompt="a car"), progress=False)
    assert other.path != inv.path and not other.reused


def test_resumed_inversion_equals_an_uninterrupted_one(tiny_editor, clip, tiny_cfg, tmp_path):
    a = tiny_editor.invert(clip, tiny_cfg.replace(chunk_frames=4), progress=False)
    b = tiny_editor.invert(clip, tiny_cfg.replace(chunk_frames=10, cache_dir=str(tmp_path / "other")), progress=False)
    for t in a.timesteps:
        torch.testing.assert_close(a.latents_at(t), b.latents_at(t), rtol=1e-4, atol=1e-4)


def test_reconstruction_check_reports_psnr(tiny_editor, clip, tiny_cfg):
    """The reported PSNR is that of the inversion sampled back with the sampling schedule (guidance 1, no
    edit), decoded, against the input: recomputed here step by step with diffusers' DDIM sampler."""
    from diffusers import DDIMScheduler

    from tokenflow.inversion import decode_latents

    inv = tiny_editor.invert(clip, tiny_cfg.replace(reconstruct=True), progress=False)
    m = tiny_editor.models
    sched = DDIMScheduler.from_config(m.scheduler_config)
    sched.set_timesteps(tiny_cfg.n_timesteps)
    x = inv.latents_at(inv.timesteps[-1])
    emb = m.encode_prompt([""]).expand(len(x), -1, -1)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(m.unet(x, t, encoder_hidden_states=emb).sample, t, x).prev_sample
    want = psnr(torch.cat(list(decode_latents(m, x, len(x)))), clip)
    assert inv.reconstruction_psnr == pytest.approx(want, abs=0.05)

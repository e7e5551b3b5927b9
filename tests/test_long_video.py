"""Long-video machinery on the CPU: chunking is exact, an OOM halves the chunk and retries."""
import contextlib
import logging

import pytest
import torch

from conftest import assert_latents_match, pass_kind

from tokenflow.state import KeyframeRecords


@pytest.fixture(scope="module")
def long_clip():
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 256, (3, 64, 96), generator=g, dtype=torch.uint8)
    return torch.stack([torch.roll(base, shifts=i % 17, dims=2)[:, :, :64] for i in range(200)])


def test_200_frames_chunked_equal_one_unchunked_run(tiny_editor, long_clip, tiny_cfg):
    cfg = tiny_cfg.replace(batch_size=8, n_timesteps=2, n_inversion_steps=2)
    inv = tiny_editor.invert(long_clip, cfg.replace(chunk_frames=200), progress=False)
    whole = tiny_editor.edit(long_clip, cfg.replace(chunk_frames=200), progress=False, inversion=inv)
    small = tiny_editor.edit(long_clip, cfg.replace(chunk_frames=8), progress=False, inversion=inv)
    assert whole.frames.shape == (200, 3, 64, 64)
    assert_latents_match(whole.latents, small.latents)


@contextlib.contextmanager
def fake_oom(module, when):
    """A fake allocator limit: calls of `module` whose first argument has `rows` rows raise CUDA's OOM error
    where when(rows) holds."""
    def limit(_, args):
        if when(args[0].shape[0]):
            raise torch.cuda.OutOfMemoryError("fake: out of memory")
    h = module.register_forward_pre_hook(limit)
    try:
        yield
    finally:
        h.remove()


def test_oom_halves_the_groups_per_call_and_retries(tiny_editor, clip, tiny_cfg, monkeypatch, caplog):
    """A fake allocator limit: any UNet call with more than 3 * 4 rows raises CUDA's OOM error."""
    inv = tiny_editor.invert(clip, tiny_cfg, progress=False)
    expected = tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=4), progress=False, inversion=inv)
    sizes = []

    def group_call_over_12_rows(rows):
        sizes.append(rows)
        return pass_kind(tiny_editor) == "group" and rows > 12
    with fake_oom(tiny_editor.models.unet, group_call_over_12_rows), caplog.at_level(logging.WARNING, logger="tokenflow"):
        got = tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=12), progress=False, inversion=inv)
    assert "out of memory" in caplog.text and "retrying with 1" in caplog.text
    assert 30 in sizes  # it did try all 3 groups (4 + 4 + 2 frames) in one call first
    assert_latents_match(got.latents, expected.latents)
    assert got.memory_plan.frames_per_call == 4  # the plan that ran: one group (4 frames) per call


def test_offloaded_records_give_the_same_window():
    rec, off = KeyframeRecords(), KeyframeRecords(offload=True)
    f, o = torch.randn(5, 7, 8), torch.randn(3, 5, 7, 8)
    for r in (rec, off):
        r.put_feats("l", f)
        r.put_out("l", o)
    a, b = rec.take("l", 1, 3, torch.device("cpu")), off.take("l", 1, 3, torch.device("cpu"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], f[1:3])
    assert rec.nbytes() == (f.numel() + o.numel()) * 4


def test_windowed_attention_equals_exact_when_the_window_covers_all_keyframes():
    from tokenflow import ops
    from tokenflow.windowed import window_of, windowed_extended_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 5, 6, 16, generator=g) for _ in range(3))
    exact = ops.extended_attention(q, k, v, 2, backend="torch")
    got = windowed_extended_attention(q, k, v, 2, shared_qk=False, scale=8 ** -0.5, window=5, backend="torch")
    torch.testing.assert_close(got, exact)
    # Forced down the windowed code path with a window that still covers everything: same result.
    import tokenflow.windowed as w
    narrow = w.windowed_extended_attention
    orig_window = w.window_of
    w.window_of = lambda i, K, W: list(range(K))
    try:
        got = narrow(q, k, v, 2, shared_qk=True, scale=8 ** -0.5, window=2, backend="torch")
    finally:
        w.window_of = orig_window
    torch.testing.assert_close(got, ops.extended_attention(q[:1], k[:1], v, 2, shared_qk=True, backend="torch"))
    assert window_of(0, 20, 4) == [0, 1, 2, 3, 10, 19] and window_of(19, 20, 4) == [0, 10, 16, 17, 18, 19]


def masked_extended_attention(q, k, v, heads, shared_qk, scale, window):
    """Independent float64 statement of windowed extended attention: explicit softmax over the keys of the
    keyframes in each keyframe's window (tokenflow.windowed.window_of), the source branch per frame."""
    from tokenflow.windowed import window_of

    R, K, S, C = v.shape
    d = C // heads
    out = torch.empty(R, K, S, C, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for r in range(R):
        qr, kr = (q[0], k[0]) if shared_qk else (q[r], k[r])
        for i in range(K):
            sel = [i] if r == 0 else window_of(i, K, window)
            for h in range(heads):
                c = slice(h * d, (h + 1) * d)
                keys = kr[sel][:, :, c].reshape(-1, d)
                p = torch.softmax(qr[i][:, c] @ keys.T * scale, dim=-1)
                out[r, i, :, c] = p @ v[r][sel][:, :, c].reshape(-1, d)
    return out


def test_windowed_edit_attends_within_each_window(tiny_editor, clip, tiny_cfg, monkeypatch):
    """With a window of 1 every keyframe pass attends within the windows (plus anchors): each call inside the
    edit equals the masked float64 statement; with a window covering all 5 keyframes the edit is exact."""
    import tokenflow.processors as processors

    cfg = tiny_cfg.replace(batch_size=2)  # 5 keyframes
    inv = tiny_editor.invert(clip, cfg, progress=False)
    exact = tiny_editor.edit(clip, cfg, progress=False, inversion=inv)
    covering = tiny_editor.edit(clip, cfg.replace(keyframe_window=5), progress=False, inversion=inv)
    assert_latents_match(exact.latents, covering.latents)
    calls = []
    real = processors.windowed_extended_attention

    def checked(q, k, v, heads, *, shared_qk, scale, window, backend=None):
        out = real(q, k, v, heads, shared_qk=shared_qk, scale=scale, window=window, backend=backend)
        want = masked_extended_attention(q, k, v, heads, shared_qk, scale, window)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
        calls.append(window)
        return out
    monkeypatch.setattr(processors, "windowed_extended_attention", checked)
    tiny_editor.edit(clip, cfg.replace(keyframe_window=1), progress=False, inversion=inv)
    assert calls == [1] * 16 * cfg.n_timesteps  # every self-attention layer of every step's keyframe pass


def test_keyframe_pass_in_chunks_is_exact(tiny_editor, clip, tiny_cfg):
    """Per-row modules run one keyframe at a time (self-attention still sees all three keyframes)."""
    inv = tiny_editor.invert(clip, tiny_cfg, progress=False)
    conv = tiny_editor.models.unet.up_blocks[1].resnets[1].conv2
    rows = []
    h = conv.register_forward_hook(lambda m, a, o: rows.append((pass_kind(tiny_editor), o.shape[0])))
    try:
        whole = tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=12), progress=False, inversion=inv)
        n_whole = len(rows)
        chunked = tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=1), progress=False, inversion=inv)
    finally:
        h.remove()
    assert ("keyframe", 9) in rows[:n_whole] and ("keyframe", 3) in rows[n_whole:]  # 3 keyframes x 3 branches
    assert ("keyframe", 9) not in rows[n_whole:]
    assert_latents_match(whole.latents, chunked.latents)


def test_offloaded_records_edit_identically(tiny_editor, clip, tiny_cfg, monkeypatch):
    """With offloaded records each group call copies back only its keyframes' window: same frames."""
    import tokenflow.job as job_module

    inv = tiny_editor.invert(clip, tiny_cfg, progress=False)
    cfg = tiny_cfg.replace(chunk_frames=4)
    kept = tiny_editor.edit(clip, cfg, progress=False, inversion=inv)
    from tokenflow.planner import MemoryPlan

    monkeypatch.setattr(job_module, "plan_memory", lambda *a, **k: MemoryPlan(4, 4, 4, 4, True))
    off = tiny_editor.edit(clip, cfg, progress=False, inversion=inv)
    assert off.memory_plan.offload_records and not kept.memory_plan.offload_records
    assert torch.equal(kept.frames, off.frames)


def oom_in_keyframe_pass(editor, when):
    """fake_oom on a resnet's conv1, which runs inside the keyframe chunks, in keyframe passes only."""
    from diffusers.models.resnet import ResnetBlock2D

    conv = next(m for m in editor.models.unet.modules() if isinstance(m, ResnetBlock2D)).conv1
    return fake_oom(conv, lambda rows: pass_kind(editor) == "keyframe" and when(rows))


def test_oom_in_the_keyframe_pass_halves_the_keyframe_chunk(tiny_editor, clip, tiny_cfg, caplog):
    inv = tiny_editor.invert(clip, tiny_cfg, progress=False)
    expected = tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=4), progress=False, inversion=inv)
    K = len(range(0, len(clip), tiny_cfg.batch_size))
    # more than one keyframe's three rows
    with oom_in_keyframe_pass(tiny_editor, lambda rows: rows > 3), caplog.at_level(logging.WARNING, logger="tokenflow"):
        got = tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=4), progress=False, inversion=inv)
    assert f"keyframe pass ({K} keyframes, {K} per chunk); retrying with {K // 2}" in caplog.text
    assert got.memory_plan.keyframes_per_chunk == 1  # the plan that ran
    assert_latents_match(got.latents, expected.latents)


def test_oom_in_every_keyframe_pass_offloads_then_says_what_to_change(tiny_editor, clip, tiny_cfg, caplog):
    from tokenflow.errors import TokenFlowError

    inv = tiny_editor.invert(clip, tiny_cfg, progress=False)
    with oom_in_keyframe_pass(tiny_editor, lambda rows: True), caplog.at_level(logging.WARNING, logger="tokenflow"), \
            pytest.raises(TokenFlowError, match="Lower the resolution"):
        tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=4), progress=False, inversion=inv)
    assert "keyframe records in host memory" in caplog.text


def test_oom_in_the_vae_halves_its_frames_per_call(tiny_editor, clip, tiny_cfg, caplog):
    inv = tiny_editor.invert(clip, tiny_cfg, progress=False)
    expected = tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=4), progress=False, inversion=inv)
    with fake_oom(tiny_editor.models.vae.decoder, lambda rows: rows > 1), caplog.at_level(logging.WARNING, logger="tokenflow"):
        got = tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=4), progress=False, inversion=inv)
    assert "out of memory in decode with 4 frames at a time; retrying with 2" in caplog.text
    assert "with 2 frames at a time; retrying with 1" in caplog.text
    assert got.memory_plan.vae_frames_per_call == 1
    assert torch.equal(got.latents, expected.latents)  # the edit itself is untouched
    # Decoding one frame at a time instead of four regroups the VAE's sums: frames within one level.
    assert (got.frames.int() - expected.frames.int()).abs().max() <= 1


def test_a_failed_edit_leaves_the_unet_plain(tiny_editor, clip, tiny_cfg):
    # An error mid-step (here an OOM that cannot be helped) must not leave the TokenFlow processors in the
    # UNet: they are removed, and the next inversion runs the plain UNet.
    from tokenflow.errors import TokenFlowError

    cfg = tiny_cfg.replace(n_inversion_steps=4, n_timesteps=2)
    inv = tiny_editor.invert(clip, cfg, progress=False)
    with oom_in_keyframe_pass(tiny_editor, lambda rows: True), pytest.raises(TokenFlowError):
        tiny_editor.edit(clip, cfg, progress=False, inversion=inv)
    assert tiny_editor.hooks is None  # removed: the UNet has its own processors and forwards again
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in tiny_editor.models.unet.attn_processors.values())
    tiny_editor.invert(clip, cfg.replace(n_inversion_steps=8, n_timesteps=2), progress=False)  # a fresh inversion


def test_an_interrupted_edit_resumes_at_the_next_step(tiny_editor, clip, tiny_cfg):
    """Interrupt after 3 of the steps; the rerun does only the rest and gives the same frames as one
    uninterrupted run; a third run re-edits nothing. Other settings do not pick the checkpoint up."""
    cfg = tiny_cfg.replace(n_timesteps=5, n_inversion_steps=10, seed=3, resume=True)
    inv = tiny_editor.invert(clip, cfg, progress=False)
    whole = tiny_editor.edit(clip, cfg.replace(cache_dir=str(inv.path.parent.parent / "other")), progress=False)
    assert whole.resumed_steps == 0

    calls, armed = [], [True]
    unet = tiny_editor.models.unet

    def interrupt(module, args):  # Ctrl-C once, at the start of step 3
        if pass_kind(tiny_editor) == "keyframe":
            calls.append(tiny_editor.hooks.state.step)
            if tiny_editor.hooks.state.step == 3 and armed:
                armed.clear()
                raise KeyboardInterrupt
    h = unet.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            tiny_editor.edit(clip, cfg, progress=False, inversion=inv)
        calls.clear()
        resumed = tiny_editor.edit(clip, cfg, progress=False, inversion=inv)
    finally:
        h.remove()
    assert resumed.resumed_steps == 3 and calls == [3, 4]  # steps 0-2 were saved; only 3 and 4 ran
    assert torch.equal(resumed.frames, whole.frames)
    again = tiny_editor.edit(clip, cfg, progress=False, inversion=inv)
    assert again.resumed_steps == 5 and torch.equal(again.frames, whole.frames)
    assert tiny_editor.edit(clip, cfg.replace(guidance_scale=5.0), progress=False, inversion=inv).resumed_steps == 0
    assert tiny_editor.edit(clip, cfg.replace(resume=False), progress=False, inversion=inv).resumed_steps == 0


# A cosine gap (best minus runner-up candidate) this small is a tie up to float32 rounding: regrouped sums
# may pick either token. Measured on the case below: gaps down to 6e-8 occur (ties up to rounding), yet no
# argmax flipped on a 2-core x86 CPU.
NEAR_TIE = 1e-4


def test_one_frame_chunks_against_two(tiny_editor, clip, tiny_cfg, monkeypatch):
    """--chunk-frames 1 against 2 on one stored inversion (8 frames, 64x64, 4 steps, B 4). A chunk smaller
    than a group does not split it (every group pass still holds its 4 frames); what changes is the
    keyframe pass (one keyframe per chunk instead of both) and the VAE's frames per call, i.e. how sums are
    grouped. So the two agree up to regrouping, step by step, as long as every nearest-neighbour argmax
    agrees; an argmax may only flip at a near-tie (a different, equally near token), and the steps after
    one are then free to differ."""
    from tokenflow import ops
    from tokenflow.latent_store import EditCheckpoint
    from tokenflow.ops import reference

    frames, cfg = clip[:8], tiny_cfg.replace(n_inversion_steps=4, n_timesteps=4)
    inv = tiny_editor.invert(frames, cfg.replace(chunk_frames=2), progress=False)
    propagate, save = ops.propagate, EditCheckpoint.save

    def run(chunk):
        calls, steps = [], {}

        def spy(x, key_feats, key_out, which, weights, residual=None, *, backend=None):
            idx = reference.cosine_argmax(x, key_feats, which)
            cand = torch.nn.functional.normalize(key_feats.float(), dim=-1)[which.clamp(min=0)]  # [F, J, S, C]
            sim = torch.einsum("fsc,fjtc->fjst", torch.nn.functional.normalize(x.float(), dim=-1), cand)
            top = sim.topk(min(2, sim.shape[-1]), dim=-1).values
            gap = top[..., 0] - top[..., 1] if top.shape[-1] == 2 else torch.ones_like(top[..., 0])
            calls.append((x.shape[0], idx, gap))
            return propagate(x, key_feats, key_out, which, weights, residual, backend=backend)

        def checkpoint(self, step, x):
            steps[step] = x.clone()
            return save(self, step, x)
        monkeypatch.setattr(ops, "propagate", spy)
        monkeypatch.setattr(EditCheckpoint, "save", checkpoint)
        res = tiny_editor.edit(frames, cfg.replace(chunk_frames=chunk), progress=False, inversion=inv)
        monkeypatch.undo()
        return res, calls, steps

    one, calls_1, steps_1 = run(1)
    two, calls_2, steps_2 = run(2)
    assert len(calls_1) == len(calls_2) and {f for f, _, _ in calls_1 + calls_2} == {4}  # whole groups per call
    per_step = len(calls_1) // cfg.n_timesteps
    flips = [int((a[1] != b[1]).sum()) for a, b in zip(calls_1, calls_2)]
    for (_, idx_1, gap), (_, idx_2, _) in zip(calls_1, calls_2):
        assert (gap[idx_1 != idx_2] < NEAR_TIE).all()  # an argmax flips only at a near-tie
    for step in range(cfg.n_timesteps):
        if sum(flips[:(step + 1) * per_step]) == 0:
            assert_latents_match(steps_1[step], steps_2[step])
    if sum(flips) == 0:
        assert_latents_match(one.latents, two.latents)
        assert (one.frames.int() - two.frames.int()).abs().max() <= 1  # VAE regrouping: one level at most

"""End-to-end and structural checks of the editing engine on tiny random SD-shaped models (CPU)."""
import pytest
import torch
from conftest import assert_latents_match, pass_kind

from tokenflow.editor import TokenFlowEditor
from tokenflow.errors import TokenFlowError
from tokenflow.layers import self_attention_layers
from tokenflow.models import load_models
from tokenflow.processors import TokenFlowSelfAttention

SPEC_QK_LAYERS = {f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1"
                  for b, a in [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]}


@pytest.mark.parametrize("model,mode", [("tiny-random", "pnp"), ("tiny-random", "sdedit"),
                                        ("tiny-random-depth", "depth"), ("tiny-random-v", "pnp")])
def test_invert_then_edit_end_to_end(model, mode, clip, tiny_cfg, monkeypatch):
    import tokenflow.editing as editing
    from tokenflow.inversion import decode_latents

    cfg = tiny_cfg.replace(model=model, mode=mode)
    editor = TokenFlowEditor.from_config(cfg)
    depth = clip[:, :1] if mode == "depth" else None
    drawn = []
    draw = editing.draw_keyframes
    monkeypatch.setattr(editing, "draw_keyframes", lambda *a: drawn.append(draw(*a)) or drawn[-1])
    a = editor.edit(clip, cfg, progress=False, depth=depth)
    assert a.frames.shape == clip.shape and a.frames.dtype == torch.uint8 and a.latents.isfinite().all()
    assert torch.equal(a.frames, torch.cat(list(decode_latents(editor.models, a.latents, a.memory_plan.vae_frames_per_call))))
    b = editor.edit(clip, cfg, progress=False, depth=depth)  # same seed, inversion reused
    assert b.inversion_reused and not a.inversion_reused
    c = editor.edit(clip, cfg, progress=False, depth=depth)
    assert torch.equal(b.frames, c.frames)  # deterministic
    assert torch.equal(a.frames, b.frames)  # a fresh and a reused inversion edit identically
    steps = len(drawn) // 3
    d = editor.edit(clip, cfg.replace(seed=2), progress=False, depth=depth)
    # The seed reaches the keyframe draws (one per step) and nothing else differs between the two edits.
    assert all(torch.equal(x, y) for x, y in zip(drawn[:steps], drawn[steps:2 * steps]))
    assert not all(torch.equal(x, y) for x, y in zip(drawn[:steps], drawn[3 * steps:]))
    assert not torch.equal(d.frames, c.frames)


def test_injection_hits_exactly_the_spec_layers_and_schedules(tiny_editor, clip, tiny_cfg, monkeypatch):
    cfg = tiny_cfg.replace(n_timesteps=10, n_inversion_steps=10)  # Q/K in steps 0-4, conv in steps 0-7
    inv = tiny_editor.invert(clip, cfg, progress=False)
    qk_seen = {}
    orig = TokenFlowSelfAttention._keyframe

    def spy(self, attn, h):
        shared = self.qk_injection and self.hooks.state.qk_inject
        qk_seen.setdefault(self.layer, []).append((self.hooks.state.step, shared))
        return orig(self, attn, h)

    monkeypatch.setattr(TokenFlowSelfAttention, "_keyframe", spy)
    unet = tiny_editor.models.unet
    injected = {}  # conv2 module name -> steps where uncond/cond rows equal the source rows
    handles = []
    for name, mod in unet.named_modules():
        if name.endswith("conv2") and "resnets" in name:
            def hook(m, args, out, name=name):
                F = out.shape[0] // 3
                if pass_kind(tiny_editor) != "off" and torch.equal(out[F:2 * F], out[:F]) and torch.equal(out[2 * F:], out[:F]):
                    injected.setdefault(name, set()).add(tiny_editor.hooks.state.step)
            handles.append(mod.register_forward_hook(hook))
    try:
        tiny_editor.edit(clip, cfg, progress=False, inversion=inv)
    finally:
        for h in handles:
            h.remove()
    assert set(injected) == {"up_blocks.1.resnets.1.conv2"}
    assert injected["up_blocks.1.resnets.1.conv2"] == set(range(8))  # int(0.8 * 10) steps
    shared_layers = {layer for layer, seen in qk_seen.items() if any(s for _, s in seen)}
    assert shared_layers == SPEC_QK_LAYERS
    for layer in SPEC_QK_LAYERS:
        assert [step for step, s in qk_seen[layer] if s] == list(range(5))  # int(0.5 * 10) steps
    assert len(qk_seen) == 16  # every self-attention layer ran extended attention once per step


def test_install_then_remove_leaves_the_unet_as_it_was():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from tokenflow.processors import install

    unet = load_models("tiny-random", device=torch.device("cpu"), dtype=torch.float32).unet
    procs = dict(unet.attn_processors)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        before = unet(x, 500, encoder_hidden_states=emb).sample
        with install(unet) as hooks:
            installed = unet.attn_processors
            assert sum(isinstance(p, TokenFlowSelfAttention) for p in installed.values()) == 16
            hooks.state.kind = "keyframe"  # left in a TokenFlow mode: remove() must not care
        after = unet(x, 500, encoder_hidden_states=emb).sample
    assert torch.equal(before, after)
    assert all(unet.attn_processors[k] is p for k, p in procs.items())
    assert all(isinstance(p, AttnProcessor2_0) for p in procs.values())
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in unet.modules())


def test_layers_found_by_structure_in_sd1_and_sd2_shapes():
    for variant in ("tiny-random", "tiny-random-sd1"):
        unet = load_models(variant, device=torch.device("cpu"), dtype=torch.float32).unet
        layers = self_attention_layers(unet)
        assert len(layers) == 16
        assert {layer.name for layer in layers if layer.qk_injection} == SPEC_QK_LAYERS


def test_group_pass_replaces_self_attention_with_propagation(tiny_editor, clip, tiny_cfg, monkeypatch):
    """attn1 is never computed in a group pass: no q/k/v projection runs there."""
    inv = tiny_editor.invert(clip, tiny_cfg, progress=False)
    calls = {"keyframe": 0, "group": 0}
    attn = tiny_editor.models.unet.up_blocks[1].attentions[1].transformer_blocks[0].attn1
    h = attn.to_q.register_forward_hook(lambda *a: calls.__setitem__(pass_kind(tiny_editor), calls[pass_kind(tiny_editor)] + 1))
    try:
        tiny_editor.edit(clip, tiny_cfg, progress=False, inversion=inv)
    finally:
        h.remove()
    assert calls == {"keyframe": tiny_cfg.n_timesteps, "group": 0}


def test_unet_calls_per_step(tiny_editor, clip, tiny_cfg, unet_calls):
    inv = tiny_editor.invert(clip, tiny_cfg, progress=False)
    unet_calls.n = 0
    tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=4), progress=False, inversion=inv)
    assert unet_calls.n == tiny_cfg.n_timesteps * (1 + 3)  # keyframe pass + 3 groups (4 + 4 + 2 frames)
    unet_calls.n = 0
    tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=12), progress=False, inversion=inv)
    assert unet_calls.n == tiny_cfg.n_timesteps * (1 + 1)  # all groups share one call


def test_chunking_is_exact(tiny_editor, clip, tiny_cfg):
    inv = tiny_editor.invert(clip, tiny_cfg, progress=False)
    a = tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=4), progress=False, inversion=inv)
    b = tiny_editor.edit(clip, tiny_cfg.replace(chunk_frames=12), progress=False, inversion=inv)
    assert_latents_match(a.latents, b.latents)


def test_reference_mode_rounds_frames_down(tiny_editor, clip, tiny_cfg):
    r = tiny_editor.edit(clip, tiny_cfg.replace(match_reference=True), progress=False)
    assert len(r.frames) == 8  # 10 frames, B = 4: the reference drops the last 2
    r = tiny_editor.edit(clip, tiny_cfg, progress=False)
    assert len(r.frames) == 10


@pytest.mark.parametrize("frames,cfg_change,match", [
    (torch.zeros(0, 3, 64, 64, dtype=torch.uint8), {}, "no frames"),
    (torch.zeros(3, 3, 64, 64, dtype=torch.uint8), {"match_reference": True}, "fewer than one group"),
    (torch.zeros(4, 3, 60, 64, dtype=torch.uint8), {}, "multiple of 8"),
    (torch.zeros(4, 3, 64, 64), {}, "uint8"),
    (torch.zeros(4, 3, 64, 64, dtype=torch.uint8), {"prompt": "  "}, "prompt is empty"),
    (torch.zeros(4, 3, 64, 64, dtype=torch.uint8), {"mode": "depth"}, "depth model"),
    (torch.zeros(4, 3, 64, 64, dtype=torch.uint8), {"n_inversion_steps": 7},
     "inversion grid.*nearest valid: n_inversion_steps 5"),
])
def test_bad_input_is_a_clear_error(tiny_editor, tiny_cfg, frames, cfg_change, match):
    with pytest.raises(TokenFlowError, match=match):
        tiny_editor.edit(frames, tiny_cfg.replace(**cfg_change), progress=False)


def test_sdedit_starts_at_the_intended_timestep():
    from tokenflow.schedule import sampler, start_index
    from tokenflow.tiny import build_tiny_models

    ts = [int(t) for t in sampler(build_tiny_models()[4], 50).timesteps]
    assert ts[0] == 981 and ts[-1] == 1
    i = start_index("sdedit", 0.9, ts, 1000)
    assert ts[i] == 881 and len(ts) - i == 45
    assert start_index("pnp", 0.9, ts, 1000) == 0


def test_forced_backend_applies_to_the_ops_it_implements(tiny_editor, clip, tiny_cfg):
    from tokenflow.ops.backends import resolve_forced

    cpu = torch.device("cpu")
    flag = lambda name: dict(source=f"--backend {name}")  # noqa: E731  (as the editor names it)
    assert resolve_forced("auto", cpu, torch.float32) == dict.fromkeys(["extended_attention", "propagate", "cosine_argmax"])
    assert resolve_forced("torch", cpu, torch.float32) == {
        "extended_attention": "torch", "propagate": "torch", "cosine_argmax": "torch"}
    with pytest.raises(TokenFlowError, match="--backend nope"):
        resolve_forced("nope", cpu, torch.float32, **flag("nope"))
    from tokenflow import ops
    if "cpu" in ops.available():  # the C++ backend propagates only: attention stays on auto
        assert resolve_forced("cpu", cpu, torch.float32) == {
            "extended_attention": None, "propagate": "cpu", "cosine_argmax": "cpu"}
        # from the declared devices alone: no tensor is made on (and no driver asked about) the GPU
        with pytest.raises(TokenFlowError, match="--backend cpu cannot run propagate here: the model is on cuda"):
            resolve_forced("cpu", torch.device("cuda"), torch.float16, **flag("cpu"))
    if not torch.cuda.is_available():  # unavailable without a GPU, whether or not the kernels were built
        with pytest.raises(TokenFlowError, match=r"--backend cuda: .*(PyTorch sees no CUDA device|tokenflow._C)"):
            resolve_forced("cuda", cpu, torch.float32, **flag("cuda"))
    ran = []
    for name in ops.available():
        b = ops.backends.get(name)
        for op in ("extended_attention", "propagate"):
            if hasattr(b, op):
                real = getattr(b, op)
                setattr(b, op, lambda *a, _real=real, _n=name, _op=op, **k: ran.append((_op, _n)) or _real(*a, **k))
    try:
        r = tiny_editor.edit(clip, tiny_cfg.replace(backend="torch"), progress=False)
    finally:
        for name in ops.available():
            for op in ("extended_attention", "propagate"):
                ops.backends.get(name).__dict__.pop(op, None)
    assert r.latents.isfinite().all()
    assert {n for _, n in ran} == {"torch"} and {op for op, _ in ran} == {"extended_attention", "propagate"}

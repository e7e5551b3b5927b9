"""`tokenflow.ops.integrations.patch_reference` against a re-statement of the reference's `tokenflow_utils`
(tests/reference_tokenflow_utils.py) on a tiny random UNet (tests/dropin_check.py): the same outputs, pass
by pass, within float32's noise and, under autocast, within twice what the dtype alone changes, with the
reference's dtypes; the patched layers really call tokenflow.ops; wrong blend weights are caught."""
from __future__ import annotations

import pytest
import torch

import dropin_check
from tokenflow.ops import backends, integrations, reference
from tokenflow.ops.backends import Backend
from tokenflow.ops.capabilities import OPS, Capabilities

SEARCH_BACKENDS = [b for b in ("torch", "cpu", "faiss", "triton") if b in backends.available()]


def within_bounds(report) -> list[str]:
    bad = []
    for p in report["passes"]:
        bound = max(2 * p["noise"], dropin_check.FLOAT32_BOUND)
        if not p["error"] <= bound:
            bad.append(f"{p['pass']}: {p['error']:.3g} > {bound:.3g}")
    return bad


# The Triton interpreter takes 40 s per case: once, with injection.
@pytest.mark.parametrize("backend,inject", [(b, i) for b in SEARCH_BACKENDS for i in (True, False)
                                            if b != "triton" or i])
def test_patched_reference_matches_the_reference_in_float32(backend, inject):
    report = dropin_check.compare(torch.float32, backend, inject=inject)
    assert within_bounds(report) == []
    assert report["dtypes_ours"] == report["dtypes_reference"] == [["torch.float32"]] * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_within_the_dtypes_noise_and_with_the_reference_dtypes(dtype):
    report = dropin_check.compare(dtype, "torch")
    assert within_bounds(report) == []
    half = str(dtype)
    # Keyframe pass and group 0 stay in the autocast dtype; the blend of two keyframes returns float32.
    assert report["dtypes_reference"] == [[half], [half], ["torch.float32"], ["torch.float32"]]
    assert report["dtypes_ours"] == report["dtypes_reference"]


class Counting(Backend):
    """The torch reference under another name, counting calls per operation."""

    name = "counting"
    caps = Capabilities(ops=OPS, auto=False)

    def __init__(self):
        self.calls = dict.fromkeys(OPS, 0)

    def extended_attention(self, *a, **kw):
        self.calls["extended_attention"] += 1
        return reference.extended_attention(*a, **kw)

    def propagate(self, *a):
        self.calls["propagate"] += 1
        return reference.propagate(*a)

    def cosine_argmax(self, *a):
        self.calls["cosine_argmax"] += 1
        return reference.cosine_argmax(*a)


def test_the_patched_layers_call_tokenflow_ops(monkeypatch):
    spy = Counting()
    monkeypatch.setitem(backends._registry, "counting", spy)
    report = dropin_check.compare(torch.float32, "counting")
    assert within_bounds(report) == []
    # 16 transformer blocks: each attn1 once in the keyframe pass, each block propagates in 3 group passes.
    assert spy.calls == {"extended_attention": 16, "propagate": 16 * 3, "cosine_argmax": 0}


def test_wrong_blend_weights_are_caught(monkeypatch):
    def swapped(batch_idx, n, device):
        which, w = integrations.reference_weights(batch_idx, n, device)
        return which, w.flip(1) if batch_idx else w
    original = integrations.patch_reference
    monkeypatch.setattr(integrations, "patch_reference", lambda m, **kw: original(m, weights=swapped, **kw))
    bad = within_bounds(dropin_check.compare(torch.float32, "torch"))
    assert [b.split(":")[0] for b in bad] == ["group 1", "group 2"]  # group 0 has one keyframe: weight 1


def test_reference_weights_are_the_reference_formula():
    which, w = integrations.reference_weights(2, 4, "cpu")
    assert which.tolist() == [[2, 1]] * 4
    frame = torch.arange(8, 12)
    d1, d2 = (frame - 10).abs(), (frame - 6).abs()
    torch.testing.assert_close(w[:, 0], torch.sigmoid(d2 / (d1 + d2)))
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    which, w = integrations.reference_weights(0, 3, "cpu")
    assert which.tolist() == [[0, -1]] * 3 and w.tolist() == [[1.0, 0.0]] * 3


def test_model_dtype_throughout_when_asked(monkeypatch):
    original = integrations.patch_reference
    monkeypatch.setattr(integrations, "patch_reference",
                        lambda m, **kw: original(m, reference_dtypes=False, **kw))
    report = dropin_check.compare(torch.bfloat16, "torch")
    assert report["dtypes_ours"] == [["torch.bfloat16"]] * 4
    assert within_bounds(report) == []


def test_patch_restores_and_rebinds_namespaces_and_refuses_other_modules():
    mod = dropin_check.load_reference("reference_tokenflow_utils_ns")
    originals = {n: getattr(mod, n) for n in integrations.HOOKED}
    script = {"register_extended_attention_pnp": mod.register_extended_attention_pnp, "other": 1}  # a star import
    patch = integrations.patch_reference(mod, script)
    assert all(getattr(mod, n) is not originals[n] for n in integrations.HOOKED)
    assert script["register_extended_attention_pnp"] is mod.register_extended_attention_pnp
    assert integrations.patch_reference(mod)._undo == []  # patching twice changes nothing
    patch.restore()
    assert all(getattr(mod, n) is originals[n] for n in integrations.HOOKED)
    assert script["register_extended_attention_pnp"] is originals["register_extended_attention_pnp"]
    with pytest.raises(ValueError, match="defines none of register_extended_attention_pnp, .*pass the reference's "
                                         "tokenflow_utils module"):
        integrations.patch_reference(torch)


def test_sdedit_attention_is_patched_too():
    """register_extended_attention (no injection) gets the same forward: outputs of the keyframe pass."""
    unet = dropin_check.tiny_unet()
    data = dropin_check.inputs()
    outs = []
    for name, patch in (("reference_tokenflow_utils_sd_ref", False), ("reference_tokenflow_utils_sd", True)):
        mod = dropin_check.load_reference(name)
        if patch:
            integrations.patch_reference(mod)
        u = __import__("copy").deepcopy(unet)
        mod.register_extended_attention(type("M", (), {"unet": u})())
        rows = data["keyframes"]
        latent = torch.cat([data["source"][rows], data["x"][rows], data["x"][rows]])
        text = torch.cat([data["text"][i:i + 1].expand(len(rows), -1, -1) for i in range(3)])
        with torch.no_grad():
            outs.append(u(latent, 981, encoder_hidden_states=text).sample)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5 * float(outs[0].abs().max()))


def test_an_ada_layer_norm_zero_gate_multiplies_the_propagated_output():
    """diffusers' own block code gates attn1's output (gate_msa) before the residual; the patched group pass
    puts the propagated output where attn1's went, so it is gated the same way."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(16, 2, 8, norm_type="ada_norm_zero", num_embeds_ada_norm=10).eval()
    Patched = integrations.tokenflow_block(type("TokenFlowBlock", (BasicTransformerBlock,), {}), BasicTransformerBlock)
    block.__class__ = Patched
    n, S, C = 2, 6, 16
    keys = torch.randn(3 * n, S, C)
    t, labels = torch.tensor([3] * (3 * n)), torch.tensor([1] * (3 * n))
    with torch.no_grad():
        block.pivotal_pass, block.batch_idx = True, 0
        block(keys, timestep=t, class_labels=labels)
        block.pivotal_pass = False
        frames = keys + 0.01 * torch.randn(3 * n, S, C)
        got = block(frames, timestep=t, class_labels=labels)
        # The same block with attn1 answering the propagation computed here, through diffusers' own forward.
        norm, gate, *_ = block.norm1(frames, t, labels, hidden_dtype=frames.dtype)
        which, w = integrations.reference_weights(0, n, "cpu")
        prop = reference.propagate(norm[:n], block.pivot_hidden_states[0], block.kf_attn_output.view(3, n, S, C),
                                   which, w).view(3 * n, S, C)
        block.__dict__["attn1"] = lambda *a, **kw: prop
        try:
            want = BasicTransformerBlock.forward(block, frames, timestep=t, class_labels=labels)
        finally:
            del block.__dict__["attn1"]
    assert gate.abs().min() > 0  # a gate that is not the identity
    torch.testing.assert_close(got, want)

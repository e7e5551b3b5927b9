"""A re-statement, written for the tests, of the published TokenFlow implementation's `tokenflow_utils`:
the same function names, module attributes and computation, so that `tokenflow.ops.integrations` can be
checked against it. What it computes, as the reference does:

- `register_extended_attention_pnp(model, schedule)`: every `BasicTransformerBlock`'s attn1 gets a forward
  that, for rows [source | uncond | cond] of n frames, copies the source's q and k into the other branches
  while injecting (`t` in the module's schedule, or t == 1000), repeats each branch's keys and values n
  times (every frame attends to all n frames of its branch; the source only to its own frame), and loops
  over heads with explicit softmax(q k^T * scale) v; output projection only. The decoder's attention
  layers 4-11 get `schedule`, the others an empty one.
- `make_tokenflow_attention_block(cls)`: a block whose keyframe pass (`pivotal_pass`) stores norm1's output
  and attn1's output, and whose group pass (`batch_idx`) takes both branches' cosine similarities to the
  stored keyframes densely, gathers the argmax tokens of the keyframes' attention outputs and blends
  them with w = sigmoid(d2 / (d1 + d2)) (float32 weights), then cross-attention and feed-forward.

Loaded twice by the tests (two independent module objects): one as the reference, one patched.
"""
from __future__ import annotations

import torch


def _is(module, name: str) -> bool:
    return any(c.__name__ == name for c in type(module).__mro__)


def register_pivotal(model, is_pivotal):
    for m in model.modules():
        if _is(m, "BasicTransformerBlock"):
            m.pivotal_pass = is_pivotal


def register_batch_idx(model, batch_idx):
    for m in model.modules():
        if _is(m, "BasicTransformerBlock"):
            m.batch_idx = batch_idx


def _transformer_blocks(unet):
    """(level name, attention modules) as the reference addresses them: down 0-2 x 2, mid, up 1-3 x 3."""
    for res in (0, 1, 2):
        for block in (0, 1):
            yield unet.down_blocks[res].attentions[block].transformer_blocks[0]
    yield unet.mid_block.attentions[0].transformer_blocks[0]
    for res in (1, 2, 3):
        for block in (0, 1, 2):
            yield unet.up_blocks[res].attentions[block].transformer_blocks[0]


def register_time(model, t):
    for tb in _transformer_blocks(model.unet):
        tb.attn1.t = t
        tb.attn2.t = t


def _heads_split(attn, x):  # [b, L, C] -> [b, heads, L, d]
    b, L, C = x.shape
    return x.view(b, L, attn.heads, C // attn.heads).transpose(1, 2)


def _sa_forward(attn):
    to_out = attn.to_out[0] if isinstance(attn.to_out, torch.nn.ModuleList) else attn.to_out

    def forward(x, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rows, S, C = x.shape
        n = rows // 3
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
        schedule = getattr(attn, "injection_schedule", None)
        if schedule is not None and (attn.t in schedule or attn.t == 1000):
            q[n:2 * n] = q[:n]
            k[n:2 * n] = k[:n]
            q[2 * n:] = q[:n]
            k[2 * n:] = k[:n]
        outs = []
        for r in range(3):
            qr, kr, vr = q[r * n:(r + 1) * n], k[r * n:(r + 1) * n], v[r * n:(r + 1) * n]
            if r > 0:  # every frame sees all n frames of the branch: n copies of the branch's keys and values
                kr = kr.reshape(1, n * S, C).repeat(n, 1, 1)
                vr = vr.reshape(1, n * S, C).repeat(n, 1, 1)
            qh, kh, vh = _heads_split(attn, qr), _heads_split(attn, kr), _heads_split(attn, vr)
            per_head = []
            for h in range(attn.heads):
                sim = torch.bmm(qh[:, h], kh[:, h].transpose(-1, -2)) * attn.scale
                per_head.append(torch.bmm(sim.softmax(dim=-1), vh[:, h]))
            outs.append(torch.stack(per_head, 1).transpose(1, 2).reshape(n, S, C))
        return to_out(torch.cat(outs))

    return forward


def register_extended_attention_pnp(model, injection_schedule):
    for m in model.unet.modules():
        if _is(m, "BasicTransformerBlock"):
            m.attn1.forward = _sa_forward(m.attn1)
            m.attn1.injection_schedule = []
    for res, blocks in ((1, (1, 2)), (2, (0, 1, 2)), (3, (0, 1, 2))):  # decoder layers 4-11
        for block in blocks:
            attn = model.unet.up_blocks[res].attentions[block].transformer_blocks[0].attn1
            attn.forward = _sa_forward(attn)
            attn.injection_schedule = injection_schedule


def register_extended_attention(model):
    for m in model.unet.modules():
        if _is(m, "BasicTransformerBlock"):
            m.attn1.forward = _sa_forward(m.attn1)


def _cosine(x, y):
    x = x / x.norm(dim=-1, keepdim=True)
    y = y / y.norm(dim=-1, keepdim=True)
    return x @ y.T


def make_tokenflow_attention_block(block_class):
    class TokenFlowBlock(block_class):
        def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                    class_labels=None, **unused):
            rows, S, C = hidden_states.shape
            n = rows // 3
            gate_msa = None
            if self.use_ada_layer_norm:
                norm = self.norm1(hidden_states, timestep)
            elif self.use_ada_layer_norm_zero:
                norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
                    hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
            else:
                norm = self.norm1(hidden_states)
            norm = norm.view(3, n, S, C)
            kwargs = cross_attention_kwargs or {}
            if self.pivotal_pass:
                self.pivot_hidden_states = norm
                attn_output = self.attn1(norm.view(rows, S, C),
                                         encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                                         **kwargs)
                self.kf_attn_output = attn_output
                if gate_msa is not None:
                    attn_output = gate_msa.unsqueeze(1) * attn_output
            else:
                groups = [self.batch_idx] + ([self.batch_idx - 1] if self.batch_idx > 0 else [])
                sim = _cosine(norm[0].reshape(-1, C), self.pivot_hidden_states[0][groups].reshape(-1, C))
                kf = self.kf_attn_output.view(3, -1, S, C)[:, groups]  # [3, len(groups), S, C]
                if gate_msa is not None:  # the reference multiplies [3, 2, S, C] by [3n, 1, C] here, which fails
                    raise NotImplementedError("the reference's group pass does not support ada-LN-zero blocks")
                picked = []
                for j, part in enumerate(sim.chunk(len(groups), dim=1)):
                    idx = part.argmax(dim=-1)  # [n*S]
                    index = idx.view(1, -1, 1).repeat(3, 1, C)
                    picked.append(kf[:, j].gather(1, index).view(3, n, S, C))
                if len(groups) == 2:
                    frame = torch.arange(n, device=hidden_states.device) + groups[0] * n
                    d1 = (frame - (groups[0] * n + n // 2)).abs()
                    d2 = (frame - (groups[1] * n + n // 2)).abs()
                    w = torch.sigmoid(d2 / (d1 + d2)).view(1, n, 1, 1)  # float32
                    attn_output = w * picked[0] + (1 - w) * picked[1]
                else:
                    attn_output = picked[0]
                attn_output = attn_output.reshape(rows, S, C)
            hidden_states = attn_output + hidden_states

            if self.attn2 is not None:
                norm = self.norm2(hidden_states, timestep) if self.use_ada_layer_norm else self.norm2(hidden_states)
                hidden_states = self.attn2(norm, encoder_hidden_states=encoder_hidden_states,
                                           attention_mask=encoder_attention_mask, **kwargs) + hidden_states
            norm = self.norm3(hidden_states)
            if self.use_ada_layer_norm_zero:
                norm = norm * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            ff = self.ff(norm)
            if self.use_ada_layer_norm_zero:
                ff = gate_mlp.unsqueeze(1) * ff
            return ff + hidden_states

    return TokenFlowBlock


def set_tokenflow(model):
    for m in model.modules():
        if _is(m, "BasicTransformerBlock"):
            m.__class__ = make_tokenflow_attention_block(m.__class__)
            if not hasattr(m, "use_ada_layer_norm_zero"):  # diffusers releases after the reference's
                m.use_ada_layer_norm = False
                m.use_ada_layer_norm_zero = False
    return model

import pytest
import torch

from tokenflow.errors import TokenFlowError
from tokenflow.keyframes import blend_weights, draw_keyframes, make_groups

SPEC_WEIGHTS_B8 = [0.622, 0.651, 0.679, 0.706, 0.731, 0.711, 0.697, 0.687]


def test_blend_weights_match_the_spec_for_b8():
    groups = make_groups(24, 8, match_reference=True)
    which, w = blend_weights(groups, 8)
    for g in (1, 2):
        assert w[g * 8:(g + 1) * 8, 0].tolist() == pytest.approx(SPEC_WEIGHTS_B8, abs=5e-4)
        assert torch.allclose(w[g * 8:(g + 1) * 8].sum(1), torch.ones(8))
        assert (which[g * 8:(g + 1) * 8] == torch.tensor([g, g - 1])).all()
    assert (w[:8, 0] == 1).all() and (which[:8, 1] == -1).all()  # group 0: own keyframe alone


def test_keyframe_draws_are_the_references():
    groups = make_groups(40, 8, match_reference=True)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # the reference: seed_everything(1), then randint on the default generator, per step
    for _ in range(3):
        expected = torch.randint(8, (5,)) + torch.arange(0, 40, 8)
        assert torch.equal(draw_keyframes(groups, 8, gen), expected)


def test_reference_mode_drops_trailing_frames_default_mode_keeps_them():
    assert make_groups(42, 8, match_reference=True)[-1] == range(32, 40)
    groups = make_groups(42, 8, match_reference=False)
    assert groups[-1] == range(40, 42)
    keys = draw_keyframes(groups, 8, torch.Generator().manual_seed(3))
    assert all(g.start <= k < g.stop for g, k in zip(groups, keys.tolist()))


def test_fewer_frames_than_a_group_in_reference_mode_is_a_clear_error():
    with pytest.raises(TokenFlowError, match="fewer than one group"):
        make_groups(5, 8, match_reference=True)
    assert make_groups(5, 8, match_reference=False) == [range(0, 5)]

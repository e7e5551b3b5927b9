import pytest

from tokenflow import costmodel


def test_cost_model_reproduces_the_spec_figures():
    assert costmodel.attention_sum() == pytest.approx(3.06e10, rel=0.01)
    assert costmodel.edit_step_flops(40)["total"] == pytest.approx(97e12, rel=0.02)
    assert costmodel.edit_step_flops(120)["total"] == pytest.approx(329e12, rel=0.02)
    assert costmodel.edit_flops(40) == pytest.approx(4.9e15, rel=0.02)
    assert costmodel.inversion_flops(40, 500) == pytest.approx(40 * 500 * 804e9)


def test_per_layer_counts_sum_to_the_step_totals():
    K, N, B = 5, 40, 8
    ext = sum(n * costmodel.extended_attention_flops(S, C, K) for S, C, n in costmodel.SD21_LEVELS)
    assert ext == pytest.approx(costmodel.edit_step_flops(N, B)["extended_attention"])
    nn = sum(n * costmodel.propagate_flops(S, C, N) for S, C, n in costmodel.SD21_LEVELS)
    # every frame searches two keyframes except group 0's, which searches one: 2N - B frame searches
    assert nn - sum(n * costmodel.propagate_flops(S, C, B, 1) for S, C, n in costmodel.SD21_LEVELS) == \
        pytest.approx(costmodel.edit_step_flops(N, B)["nn_search"])

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


def test_unet_counts_are_the_flop_counters():
    """The UNet constants are torch's FlopCounterMode over one call on meta; the SDXL levels are its UNet's."""
    from tokenflow.memsim import meta_unet
    from tokenflow.sdxl import SDXL_UNET_CONFIG
    from tokenflow.tiny import SD21_UNET_CONFIG

    for config, h, model in ((SD21_UNET_CONFIG, 64, costmodel.SD21), (SDXL_UNET_CONFIG, 128, costmodel.SDXL)):
        full, group = costmodel.unet_flops(config, h, h)
        assert full == pytest.approx(model.full, rel=1e-3) and group == pytest.approx(model.group, rel=1e-3)
        assert costmodel.levels_of(meta_unet(config), h, h) == model.levels


def test_sdxl_step_at_1024_is_sdxl_unet_work_on_sd21_tokens_times_four():
    """SDXL at 1024 has 4x SD 2.1's tokens at 512 but attends only at its two lower levels."""
    sdxl = costmodel.edit_step_flops(40, model=costmodel.SDXL)
    assert sdxl["unet_group_passes"] == pytest.approx(3 * 40 * 5070e9)
    assert costmodel.attention_sum(costmodel.SDXL_LEVELS) == pytest.approx(10 * 4096 ** 2 * 640 + 60 * 1024 ** 2 * 1280)
    assert costmodel.inversion_flops(40, 500, model=costmodel.SDXL) == pytest.approx(40 * 500 * 6761e9)
    assert costmodel.edit_step_flops(40) == costmodel.edit_step_flops(40, model=costmodel.SD21)

import pytest

from tokenflow.config import DEFAULT_MODEL, SD_VERSIONS, EditConfig
from tokenflow.errors import TokenFlowError


def test_defaults_are_the_reference_configuration():
    c = EditConfig()
    assert (c.model, c.n_timesteps, c.n_inversion_steps, c.batch_size) == (DEFAULT_MODEL, 50, 500, 8)
    assert (c.guidance_scale, c.pnp_attn_t, c.pnp_f_t, c.seed) == (7.5, 0.5, 0.8, 1)


def test_reference_yaml_keys_are_accepted():
    c = EditConfig.from_mapping({"sd_version": "1.5", "n_frames": 16, "data_path": "x.mp4", "prompt": "a",
                                 "use_ddim_noise": False, "start": 0.8})
    assert c.model == SD_VERSIONS["1.5"] and c.n_frames == 16 and c.start == 0.8 and not c.use_ddim_noise
    assert EditConfig.from_mapping({"sd_version": "depth"}).mode == "depth"


@pytest.mark.parametrize("bad", [{"pnp_attn_t": 2}, {"height": 500}, {"mode": "x"}, {"bogus": 1},
                                 {"batch_size": 0}, {"sd_version": "3"}])
def test_bad_values_name_the_problem(bad):
    with pytest.raises(TokenFlowError) as e:
        EditConfig.from_mapping(bad)
    assert next(iter(bad)) in str(e.value) or "sd_version" in str(e.value)

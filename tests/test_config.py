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


@pytest.mark.parametrize("bad,key,words", [
    ({"pnp_attn_t": 2}, "pnp_attn_t", "between 0 and 1"),
    ({"height": 500}, "height", "multiple of 8 (the VAE downsamples by 8); try 496"),
    ({"mode": "x"}, "mode", "not one of pnp, sdedit, depth"),
    ({"batch_size": 0}, "batch_size", "at least 1"),
    ({"bogus": 1}, None, "unknown config key(s): bogus"),
    ({"sd_version": "3"}, None, "sd_version '3' is not one of"),
])
def test_bad_values_name_the_problem(bad, key, words):
    with pytest.raises(TokenFlowError) as e:
        EditConfig.from_mapping(bad)
    assert words in str(e.value) and e.value.key == key

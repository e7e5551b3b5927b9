from pathlib import Path

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


def test_sdedit_keys_without_mode_mean_sdedit(caplog):
    """The reference's config_sdedit.yaml has SDEdit's keys and no mode (its script chose SDEdit)."""
    with caplog.at_level("WARNING", logger="tokenflow"):
        c = EditConfig.from_mapping({"sd_version": "2.1", "start": 0.9, "use_ddim_noise": True, "prompt": "a wolf"})
    assert c.mode == "sdedit" and "running SDEdit (mode: sdedit)" in caplog.text
    assert EditConfig.from_mapping({"start": 0.9, "mode": "pnp"}).mode == "pnp"  # a mode given is kept
    assert EditConfig.from_mapping({"prompt": "a wolf", "pnp_attn_t": 0.5}).mode == "pnp"


@pytest.mark.parametrize("given, want", [
    ({"n_frames": "10"}, ("n_frames", 10)),
    ({"n_frames": 10.0}, ("n_frames", 10)),
    ({"n_frames": "none"}, ("n_frames", None)),
    ({"guidance_scale": "1e-3"}, ("guidance_scale", 0.001)),  # YAML 1.1 reads 1e-3 as text
    ({"guidance_scale": 7}, ("guidance_scale", 7.0)),
    ({"use_ddim_noise": "no"}, ("use_ddim_noise", False)),
    ({"prompt": 1984}, ("prompt", "1984")),
])
def test_config_values_are_converted_per_key(given, want):
    assert getattr(EditConfig.from_mapping(given), want[0]) == want[1]


@pytest.mark.parametrize("bad, words", [
    ({"n_frames": "ten"}, "n_frames is 'ten', which is not a whole number (or none); e.g. n_frames: 40"),
    ({"n_frames": 2.5}, "n_frames is 2.5, which is not a whole number"),
    ({"seed": True}, "seed is True, which is not a whole number; e.g. seed: 1"),
    ({"guidance_scale": "high"}, "guidance_scale is 'high', which is not a number; e.g. guidance_scale: 7.5"),
    ({"use_ddim_noise": "maybe"}, "use_ddim_noise is 'maybe', which is not true or false"),
    ({"prompt": ["a", "b"]}, "prompt is ['a', 'b'], which is not text"),
    ({"max_gpu_mem": -1}, "max_gpu_mem = -1.0 must be a positive number of GiB"),
    ({"max_gpu_mem": 0}, "max_gpu_mem = 0.0 must be a positive number of GiB"),
])
def test_wrong_types_name_the_key(bad, words):
    with pytest.raises(TokenFlowError) as e:
        EditConfig.from_mapping(bad)
    assert words in str(e.value) and e.value.key == next(iter(bad))


def test_validate_checks_types_of_a_config_built_directly():
    with pytest.raises(TokenFlowError, match="n_frames is 'ten'") as e:
        EditConfig(n_frames="ten").validate()
    assert e.value.key == "n_frames"
    EditConfig(guidance_scale=7, max_gpu_mem=20, cache_dir=Path("cache")).validate()  # an int for a float, a Path

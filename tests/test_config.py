import pytest

from forgetlab.config import PROFILE_DIR, ParameterError, load_params, validate_params


def test_every_profile_is_valid():
    for path in sorted(PROFILE_DIR.glob("*.yaml")):
        p = load_params(path)
        assert p["run_name"] == path.stem


def test_profiles_share_one_schema():
    keys = {name: set(load_params(name)) for name in ("smoke", "default", "full")}
    assert keys["smoke"] == keys["default"] == keys["full"]


def test_same_insertions_for_id_and_ood():
    # one parameter drives every kind, so the comparison is fair by construction
    assert "insertions" in load_params("default")


@pytest.mark.parametrize("override, words", [
    ({"forget_kinds": ["id", "poetry"]}, ["forget_kinds", "poetry", "one of"]),
    ({"insertions": -3}, ["insertions = -3", ">= 1"]),
    ({"unlearn_steps": 0}, ["unlearn_steps", ">= 1"]),
    ({"epochs": "two"}, ["epochs", "number"]),
    ({"insertions": 2.5}, ["insertions", "integer"]),
    ({"insertions": True}, ["insertions"]),
    ({"target_bits": -1.0}, ["target_bits", ">= 0"]),
    ({"d_model": 100, "n_head": 3}, ["divisible"]),
    ({"block_size": 16, "example_tokens": 24}, ["block_size", "example_tokens"]),
    ({"original_seeds": [0], "reference_seeds": [0, 1]}, ["overlap"]),
    ({"reference_seeds": []}, ["reference_seeds", "non-empty"]),
    ({"record_every": 2, "utility_every": 5}, ["utility_every = 5", "multiple of record_every = 2", "e.g. 4"]),
    ({"llm_record_every": 3, "llm_utility_every": 4}, ["llm_utility_every = 4", "multiple of llm_record_every"]),
])
def test_bad_values_are_named(override, words):
    with pytest.raises(ParameterError) as err:
        load_params("smoke", override)
    for w in words:
        assert w in str(err.value)


def test_unknown_and_missing_keys_are_reported_together():
    p = dict(load_params("smoke"))
    del p["seed"]
    p["insertion"] = 3
    with pytest.raises(ParameterError) as err:
        validate_params(p)
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert "missing parameter 'seed'" in msg
    assert "unknown parameter 'insertion'" in msg and "insertions" in msg


def test_missing_profile_names_the_choices(tmp_path):
    with pytest.raises(ParameterError, match="smoke"):
        load_params("nonexistent")
    bad = tmp_path / "bad.yaml"
    bad.write_text("insertions: [unclosed")
    with pytest.raises(ParameterError, match="not valid YAML"):
        load_params(bad)


def test_numbers_are_normalised():
    p = load_params("smoke", {"epochs": 1})
    assert isinstance(p["epochs"], float) and p["epochs"] == 1.0

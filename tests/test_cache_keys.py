"""Cache keys are derived from parameter sections: every parameter that can change a result reaches a key."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from dataclasses import asdict

import pandas as pd

from forgetlab import backend_smollm, backend_tiny, dose_response, engine, experiment, llm_finetune, mem_pool
from forgetlab.cache import code_version
from forgetlab.config import NOT_IN_KEYS, SCHEMA, load_params


def perturbed(value):
    """Another value of the same type (keys never validate, so any different value will do)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else value + value
    raise TypeError(value)


def all_keys(p: dict) -> dict[str, str]:
    """Every cache key the suite builds from parameters, with the data fingerprints held fixed."""
    tiny = object.__new__(backend_tiny.TinyGPT2)
    tiny.p, tiny.data = p, "data-fingerprint"
    llm = object.__new__(backend_smollm.SmolLM2)
    llm.p = p
    llm.data = SimpleNamespace(fingerprint=lambda: "llm-data")
    llm.models = SimpleNamespace(meta={"original (seed 0)": {"key": llm_finetune.finetune_key(p, "llm-data", "base",
                                                                                            "original", 0)}})
    data = SimpleNamespace(fingerprint=lambda: "data-fingerprint")
    dose_examples = pd.DataFrame({"role": ["forget", "twin"], "ids": [[0, 5, 6], [0, 7, 8]], "uid": ["f", "t"]})
    dose = object.__new__(dose_response.DoseBackend)
    dose.p = p
    return {"data": experiment.data_key(p),
            "dose model": dose_response.dose_model_key(p, data, "base", dose_examples, "original", 4),
            "dose unlearning": engine.cache_key(asdict(dose.settings("ga"))),
            "tiny unlearning": engine.cache_key(asdict(backend_tiny.TinyGPT2.settings(tiny, "ga"))),
            "model": experiment.model_key(p, "data-fingerprint", "original", 0),
            "tiny trajectory": tiny.key(0),
            "llm fine-tuning": llm_finetune.finetune_key(p, "llm-data", "base", "original", 0),
            "llm trajectory": llm.key(0),
            "memorization pool": mem_pool.pool_key(p, SimpleNamespace(fingerprint=lambda: "data-fingerprint"))}


@pytest.fixture(scope="module")
def params():
    return load_params("smoke")


@pytest.mark.parametrize("name", sorted(SCHEMA))
def test_every_result_parameter_reaches_a_cache_key(params, name, tmp_path):
    before = all_keys(params)
    options = [o for o in SCHEMA[name].options if o != params[name]]
    value = options[0] if options and isinstance(params[name], str) else perturbed(params[name])
    if name == "custom_source":                  # a path must exist: the key holds the file's content digest
        value = tmp_path / "mine.txt"
        value.write_text("my own sentence\n")
    after = all_keys(dict(params, **{name: str(value)} if name == "custom_source" else {name: value}))
    changed = [k for k in before if before[k] != after[k]]
    if SCHEMA[name].section in NOT_IN_KEYS:
        assert not changed, f"{name} is declared as not affecting cached results but changes {changed}"
    else:
        assert changed, f"{name} (section {SCHEMA[name].section}) reaches no cache key"


def test_sections_reach_only_the_keys_that_read_them(params):
    """A parameter of one step does not invalidate the entries of steps that do not read it."""
    before = all_keys(params)
    after = all_keys(dict(params, unlearn_lr=params["unlearn_lr"] * 2))
    assert [k for k in before if before[k] != after[k]] == ["dose unlearning", "tiny unlearning", "tiny trajectory",
                                                            "llm trajectory"]
    after = all_keys(dict(params, llm_unlearn_lr=params["llm_unlearn_lr"] * 2))
    assert [k for k in before if before[k] != after[k]] == ["llm trajectory"]


def test_code_version_follows_the_source():
    assert code_version("training") == code_version("training")
    assert code_version("training", "models") == code_version("models", "training")
    assert code_version("training") != code_version("models")

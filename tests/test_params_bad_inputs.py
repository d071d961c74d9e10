"""A sweep of bad values over EVERY parameter of the schema: wrong type, out of range, NaN, infinities, huge.

Each case must be rejected by `validate_params` with a ParameterError (never a deeper exception) whose message
names the parameter. The cases are generated from each parameter's kind and bounds, so a new parameter is swept
too; the values the hardening issue found accepted are checked by hand below.
"""
from __future__ import annotations

import math

import pytest

from forgetlab.config import (MAX_SEED, MAX_SEEDS, SCHEMA, SECTIONS, ParameterError, load_params, params_in,
                              validate_params)

NAN, INF = float("nan"), float("inf")
HUGE = 10**12


def _bad_values(name: str) -> list:
    """Values that must be rejected for parameter `name`, from its kind and bounds."""
    spec = SCHEMA[name]
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    common = [None, {"value": 1}, True]
    if float in kinds:                                           # a finite number within [lo, hi]
        below = spec.lo if spec.strict_lo else spec.lo - 1e-9
        return common + ["0.5", [1.0], NAN, INF, -INF, HUGE, float(HUGE), spec.hi * 1.5 + 1, below]
    if kinds == (int,):                                          # an integer within [lo, hi]
        out = common + ["3", [3], 2.5, 3.0, NAN, INF, -INF, HUGE, -HUGE, spec.hi + 1]
        return out + ([spec.lo - 1] if spec.lo is not None else [])
    if kinds == (list,) and spec.hi is not None:                 # a list of seeds
        return common + [[], "0", 3, [-1], [MAX_SEED + 1], [HUGE], [1.5], [NAN], [INF], [True], ["0"], [0, 0],
                         list(range(MAX_SEEDS + 1))]
    if kinds == (list,):                                         # a subset of named options
        return common + [[], "x", 3, ["no-such-option"], [3], [NAN], [None]] + _duplicate(name)
    if kinds == (str,):                                          # a choice, a name or a free text
        out = common + [3, NAN, INF, HUGE, ["x"], "x" * 5000]
        return out + (["", "no such value!"] if spec.options else []) + BAD_TEXT.get(name, [])
    raise AssertionError(f"no bad values known for {name} of kind {kinds}: extend this sweep")


# Free-text parameters: values their own rules reject (a choice's are generated from its options).
BAD_TEXT = {
    "run_name": ["", "two words", "a/b", "é"],
    "llm_english_source": ["", "wikipedia", "pydoc+pydoc", "pydoc+"],
    "language": ["", "klingon"],
    "llm_language": ["", "klingon"],
    "canary_template": ["", "no placeholder", "{secret} and {secret}"],
}


def _duplicate(name: str) -> list:
    good = load_params("smoke")[name]
    return [[good[0], good[0]]]


CASES = [(name, value) for name in SCHEMA for value in _bad_values(name)]


def _case_id(case):
    name, value = case
    return f"{name}={value!r}"[:60]


@pytest.fixture(scope="module")
def good() -> dict:
    return load_params("smoke")


@pytest.mark.parametrize("name, value", CASES, ids=[_case_id(c) for c in CASES])
def test_every_bad_value_is_rejected_naming_the_parameter(good, name, value):
    raw = dict(good, **{name: value})
    with pytest.raises(ParameterError) as err:
        validate_params(raw, "sweep")
    message = str(err.value)
    assert name in message
    assert "1 problem(s)" in message                             # only this parameter is blamed


def test_the_sweep_is_large_and_covers_every_parameter():
    print(f"bad-input sweep: {len(CASES)} cases over {len(SCHEMA)} parameters")
    assert {name for name, _ in CASES} == set(SCHEMA)
    assert len(CASES) >= 10 * len(SCHEMA)


@pytest.mark.parametrize("name, value, words", [
    # the four values the hardening issue found accepted
    ("npo_beta", INF, ["npo_beta = Infinity", "finite number", "<= 100"]),
    ("bootstrap", 10**12, ["bootstrap = 1000000000000", "<= 100000"]),
    ("unlearn_steps", 10**9, ["unlearn_steps = 1000000000", "<= 100000", "shorten the run"]),
    ("llm_train_layers", 99, ["llm_train_layers = 99", "<= 30", "SmolLM2-135M has 30 blocks"]),
    ("learning_rate", NAN, ["learning_rate = NaN", "finite number > 0 and <= 1"]),
    ("epochs", -INF, ["epochs = -Infinity", "finite number > 0"]),
    ("original_seeds", [0, 2**40], ["original_seeds", f"<= {MAX_SEED}"]),
])
def test_messages_name_the_fix(good, name, value, words):
    with pytest.raises(ParameterError) as err:
        validate_params(dict(good, **{name: value}))
    for w in words:
        assert w in str(err.value)


def test_every_number_has_an_upper_bound_and_every_parameter_a_section():
    for name, spec in SCHEMA.items():
        kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
        if int in kinds or float in kinds:
            assert spec.hi is not None and math.isfinite(spec.hi), name
        assert spec.section in SECTIONS, name


def test_the_largest_allowed_values_are_accepted_together(good):
    # the bounds are inclusive and consistent with the cross-parameter rules: every number at its maximum validates
    largest = {name: spec.hi for name, spec in SCHEMA.items()
               if spec.hi is not None and not isinstance(good[name], list)}
    clean = validate_params(dict(good, **largest))
    assert all(clean[name] == hi for name, hi in largest.items())


def test_params_in_returns_the_sections_sorted(good):
    llm = params_in(good, "llm_data", "llm_training", "llm_unlearning")
    assert list(llm) == sorted(llm) and "llm_train_layers" in llm and all(k.startswith("llm_") for k in llm)
    display = params_in(good, "display")
    assert set(display) == {"run_name", "device", "samples_to_generate", "max_widget_steps"}
    assert params_in(good, "run") == {"seed": good["seed"]}
    both = params_in(good, "model", "training")
    assert list(both) == sorted(both) and {"n_layer", "epochs"} <= set(both) and "original_seeds" not in both
    assert set(params_in(good, "plan")) == {"original_seeds", "reference_seeds", "methods", "llm_original_seeds",
                                            "llm_reference_seeds", "llm_methods", "dose_insertions",
                                            "sanity_set_models"}
    every = params_in(good, *SECTIONS)
    assert every == dict(sorted(good.items()))                 # the sections partition the schema
    with pytest.raises(ValueError, match="use some of run, plan"):
        params_in(good, "modle")

"""The "forget my sentence" lab (forgetlab.lab, forgetlab.lab_widget) on the small study of conftest.py."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from forgetlab import engine, lab, trajectories
from forgetlab.lab import LabInputError, LabRequest
from forgetlab.tokenizer import encode

SENTENCE = "My grandmother's cat is called Pumpernickel and sleeps on the piano."


# ---- bad inputs: a message that names the fix -------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    ({"text": ""}, ["empty", "type a sentence"]),
    ({"text": "   \n"}, ["empty", "type a sentence"]),
    ({"text": "", "kind": "canary"}, ["empty", "secret digits"]),
    ({"text": SENTENCE, "insertions": 0}, ["at least once", "1 to 200", "untick 'insert'"]),
    ({"text": SENTENCE, "insertions": -3}, ["at least once", "1 to 200"]),
    ({"text": SENTENCE, "insertions": 201}, ["above 200", "1 to 200"]),
    ({"text": SENTENCE, "insertions": 2.5}, ["not a whole number", "1 to 200"]),
    ({"text": SENTENCE, "insertions": True}, ["not a whole number"]),
    ({"text": SENTENCE, "kind": "poem"}, ["unknown", "'sentence' or 'canary'"]),
])
def test_bad_request_is_refused_with_its_fix(kwargs, words):
    with pytest.raises(LabInputError) as err:
        LabRequest(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_insertions_are_not_checked_when_nothing_is_inserted():
    assert LabRequest(SENTENCE, insertions=0, insert=False).insert is False


def test_too_long_sentence_names_the_context_and_a_length_that_fits(small_params, small_data):
    context = small_data.block_size - 1
    text = " ".join(["forsooth"] * 60)
    n = len(encode(small_data.tokenizer, text))
    assert n > context
    with pytest.raises(LabInputError) as err:
        lab.lab_example(small_params, small_data, LabRequest(text))
    msg = str(err.value)
    assert f"{n} tokens" in msg and f"holds {context}" in msg and "shorten it to about" in msg
    keep = int(msg.split("shorten it to about ")[1].split()[0])
    ex = lab.lab_example(small_params, small_data, LabRequest(text[:keep]))    # the advice is right
    assert ex.n_tokens <= context


@pytest.mark.parametrize("secret", ["12", "1234", "12a", "1 2", "١٢٣"])
def test_canary_secret_must_be_exactly_the_digits(small_params, small_data, secret):
    d = small_data.canary_digits
    with pytest.raises(LabInputError, match=f"not {d} digits: type exactly {d} digits"):
        lab.lab_example(small_params, small_data, LabRequest(secret, "canary"))


def test_canary_secret_of_the_run_itself_is_refused(small_params, small_data):
    taken = small_data.select("canary", "forget").secret.iloc[0]
    with pytest.raises(LabInputError, match="one of this run's own canaries: type other"):
        lab.lab_example(small_params, small_data, LabRequest(taken, "canary"))


# ---- the example and its peers ---------------------------------------------------------------------

def test_sentence_example_and_peers_have_its_token_length(small_params, small_data):
    ex = lab.lab_example(small_params, small_data, LabRequest(f"  {SENTENCE}  "))
    assert list(ex.ids) == [small_data.bos] + encode(small_data.tokenizer, SENTENCE) and ex.score_start == 1
    table = lab.peer_examples(small_params, small_data, ex)
    counts = table.role.value_counts().to_dict()
    assert counts == {"forget": 1, "twin": 1, "control": lab.CONTROLS, "population": lab.POPULATION}
    assert (table.n_tokens == ex.n_tokens).all() and (table.n_scored == ex.n_tokens).all()
    assert table.uid.is_unique and table.ids.map(tuple).is_unique
    held = set(map(tuple, (w[1:] for w in lab.sentence_windows(small_data, ex.n_tokens))))
    assert all(tuple(ids[1:]) in held for ids in table[table.role != "forget"].ids)    # held-out plays only
    again = lab.peer_examples(small_params, small_data, ex)
    pd.testing.assert_frame_equal(table, again)                                         # seeded draw


def test_canary_example_and_peers_are_other_unused_secrets(small_params, small_data):
    d = small_data.canary_digits
    taken = set(small_data.select("canary").secret)
    secret = next(f"{v:0{d}d}" for v in range(10 ** d) if f"{v:0{d}d}" not in taken)
    ex = lab.lab_example(small_params, small_data, LabRequest(secret, "canary"))
    assert list(ex.ids) == small_data.canary_ids(secret) and ex.text == f"My secret number is {secret}"
    table = lab.peer_examples(small_params, small_data, ex)
    peers = table[table.role != "forget"]
    assert peers.secret.is_unique and not set(peers.secret) & (taken | {secret})
    assert (peers.secret.str.len() == d).all() and (table.score_start == ex.score_start).all()
    assert (table.role == "control").sum() == lab.CONTROLS and (table.role == "twin").sum() == 1


# ---- building and unlearning ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sentence_lab(small_params, small_data, session_cache):
    backend = lab.build_lab(small_params, LabRequest(SENTENCE, insertions=20), session_cache, data=small_data)
    return backend, engine.run_study(backend, session_cache)


def test_inserted_sentence_starts_far_above_the_noise_floor_and_falls(sentence_lab):
    backend, results = sentence_lab
    flags = lab.flags(results)
    assert len(flags) == 1 and not flags.flagged.iloc[0]
    g = lab.genex_before_after(results).set_index("example")
    mine, controls = g.loc["your example"], g.loc["never-trained controls (mean)"]
    assert mine.genex_before_bits > max(5.0, 2 * mine.noise_band_bits)
    assert abs(controls.genex_before_bits) < mine.noise_band_bits
    assert mine.after_step == backend.steps
    assert mine.genex_after_bits < mine.genex_before_bits - 2.0
    assert "Not flagged" in lab.flag_sentence(flags, backend)


def test_lab_records_relex_utility_and_a_utility_per_step(sentence_lab):
    backend, results = sentence_lab
    steps = sorted(results.step.unique())
    assert steps[0] == 0 and steps[-1] == backend.steps
    for metric in ("ll", "relex_bits", "genex_bits", "membership_auc"):
        assert set(results[results.metric == metric].step) == set(steps), metric
    # utility is measured at step 0, the last step and every utility_every-th recorded step
    every = backend.settings("ga").utility_every
    due = {s for s in steps if engine.utility_due(int(s), backend.steps, every)}
    assert {0, backend.steps} <= due
    for metric in ("heldout_ppl", "retain_loss"):
        assert set(results[results.metric == metric].step) == due, metric
    relex = results[(results.metric == "relex_bits") & (results.role == "forget")]
    assert relex.value.max() <= np.log2(1 + lab.POPULATION) + 1e-9


def test_models_come_back_from_the_cache(sentence_lab, small_params, small_data, session_cache):
    backend, _ = sentence_lab
    again = lab.build_lab(small_params, LabRequest(SENTENCE, insertions=20), session_cache, data=small_data)
    assert again.key(small_params["seed"]) == backend.key(small_params["seed"])
    a, b = backend.original(small_params["seed"]), again.original(small_params["seed"])
    assert all((x == y).all() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_step_runner_runs_more_steps_of_the_lab(sentence_lab, session_cache):
    backend, _ = sentence_lab
    more = trajectories.StepRunner(backend, session_cache)("sentence", "ga", 2)
    assert more.step.max() == backend.steps + 2
    genex = more[(more.metric == "genex_bits") & (more.role == "forget")]
    assert len(genex) >= 1 and np.isfinite(genex.value).all()


def test_sentence_not_inserted_is_flagged(small_params, small_data, session_cache):
    backend = lab.build_lab(small_params, LabRequest(SENTENCE, insert=False), session_cache, data=small_data,
                            steps=2)
    results = engine.run_study(backend, session_cache)
    flags = lab.flags(results)
    assert flags.flagged.tolist() == [True]
    assert abs(flags.genex_bits.iloc[0]) <= lab.FLAG_MIN_BITS
    assert "Flagged" in lab.flag_sentence(flags, backend)


def test_canary_lab_gives_exact_exposure_at_first_and_last_step(small_params, small_data, session_cache):
    d = small_data.canary_digits
    taken = set(small_data.select("canary").secret)
    secret = next(f"{v:0{d}d}" for v in range(10 ** d - 1, 0, -1) if f"{v:0{d}d}" not in taken)
    backend = lab.build_lab(small_params, LabRequest(secret, "canary", 20), session_cache, data=small_data, steps=2)
    results = engine.run_study(backend, session_cache)
    exact = results[(results.metric == "exposure_exact_bits") & (results.role == "forget")]
    assert sorted(exact.step) == [0, 2]
    assert ((0 <= exact.value) & (exact.value <= d * np.log2(10) + 1e-9)).all()
    assert set(results[results.role == "forget"].metric) >= {"exposure_bits", "genex_bits", "relex_bits"}


# ---- the form, without a browser -------------------------------------------------------------------

@pytest.fixture()
def form(small_params, session_cache):
    from forgetlab.lab_widget import LabForm
    return LabForm(small_params, session_cache, steps=2)


@pytest.mark.parametrize("text, kind, insertions, words", [
    ("", "sentence", 20, "type a sentence"),
    (SENTENCE, "sentence", 0, "at least once"),
    (" ".join(["forsooth"] * 60), "sentence", 20, "shorten it"),
    ("12x", "canary", 20, "type exactly"),
])
def test_form_shows_bad_input_as_a_message(form, text, kind, insertions, words):
    msg = form.submit(text, kind, insertions)
    assert msg.startswith("Not run:") and words in msg
    assert words in form.message.value and "#b00020" in form.message.value
    assert form.explorer is None and form.explorer_box.children == ()


def test_form_builds_the_lab_and_shows_the_explorer(form):
    form.text.value, form.insertions.value = SENTENCE, 20
    msg = form.submit()
    assert msg.startswith("Done"), msg
    assert form.explorer is not None and form.explorer_box.children == (form.explorer.widget,)
    assert form.explorer.kinds == ["sentence"] and form.explorer.labels["sentence"] == "your sentence"
    assert "Not flagged" in form.flag.value
    assert form.progress.value == form.progress.max and not form.button.disabled
    assert "ends at step 4" in form.explorer.request_more_steps(2)


def test_form_reports_a_failure_without_raising(form, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(lab, "build_lab", broken)
    msg = form.submit(SENTENCE, "sentence", 3)
    assert msg == "Failed: RuntimeError: disk full" and form.progress.bar_style == "danger"
    assert not form.button.disabled and form.explorer is None


def test_form_hint_follows_the_kind(form, small_params):
    form.kind.value = "canary"
    assert "exactly 3 digits" in form.hint.value and "My secret number is" in form.hint.value
    form.kind.value = "sentence"
    assert f"at most {small_params['block_size'] - 1} tokens" in form.hint.value


def test_notebook_09_runs_the_lab_in_batch_and_ignores_the_form_in_nbval():
    import json
    from pathlib import Path
    nb = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / "09_forget_my_sentence.ipynb").read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    names = {line.split("=")[0].strip() for line in "".join(params["source"]).splitlines() if "=" in line}
    assert {"profile", "overrides", "output_dir", "sentence", "kind", "insertions"} <= names
    setup = next(c for c in code if "fl.determinism()" in c)
    assert setup.index("fl.determinism()") < setup.index("from forgetlab import")     # the first call
    assert all(c.startswith("# NBVAL_IGNORE_OUTPUT") for c in code if "LabForm(" in c and "import" not in c)
    assert any("genex_before_after" in c for c in code) and any("save_figure" in c for c in code)

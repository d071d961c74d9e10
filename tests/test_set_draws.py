"""Set-draw models (forgetlab.set_draws): fresh forget-sized sets disjoint from every role, built like the forget
set; their models fine-tuned exactly like an original; the study's roles and keys untouched."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from forgetlab import base_models, experiment, set_draws
from fake_backend import FakeBackend, tiny_gpt2


@pytest.fixture(scope="module")
def draws(small_params, small_data) -> pd.DataFrame:
    return set_draws.build_draws(small_params, small_data, 2)


def test_each_draw_has_the_forget_sets_size_length_and_source_per_kind(small_data, draws):
    forget = small_data.examples[small_data.examples.role == "forget"]
    for j in (0, 1):
        mine = draws[draws.draw == j]
        for kind, f in forget.groupby("kind"):
            d = mine[mine.kind == kind]
            assert len(d) == len(f) and sorted(d.n_tokens) == sorted(f.n_tokens)
            assert sorted(d.n_scored) == sorted(f.n_scored) and set(d.source) == set(f.source)
            assert d.uid.tolist() == [f"{kind}-draw{j}-{i:03d}" for i in range(len(f))]
    assert set(draws.role) == {set_draws.ROLE}


def test_draws_are_disjoint_from_every_role_and_from_each_other(small_data, draws):
    taken = {tuple(ids) for ids in small_data.examples.ids}
    drawn = [tuple(ids) for ids in draws.ids]
    assert not taken & set(drawn) and len(set(drawn)) == len(drawn)
    secrets = set(small_data.examples.secret) - {""}
    drawn_secrets = [s for s in draws.secret if s]
    assert drawn_secrets and not secrets & set(drawn_secrets) and len(set(drawn_secrets)) == len(drawn_secrets)
    # ID windows come from the training plays the base did not train on (there are plenty at this size)
    assert not draws[draws.kind == "id"].in_base_stream.any()


def test_draw_j_is_the_same_whatever_the_number_of_draws_and_the_study_is_untouched(small_params, small_data,
                                                                                    draws):
    before = small_data.examples.copy()
    one = set_draws.build_draws(small_params, small_data, 1)
    pd.testing.assert_frame_equal(one, draws[draws.draw == 0].reset_index(drop=True))
    pd.testing.assert_frame_equal(small_data.examples, before)
    # sanity_set_models (section plan) enters no key of the study's data or models
    other = dict(small_params, sanity_set_models=5)
    assert experiment.data_key(other) == experiment.data_key(small_params)
    for role in ("original", "reference", "base"):
        assert experiment.model_key(other, "fp", role, 0) == experiment.model_key(small_params, "fp", role, 0)


def test_in_rows_finds_windows_lying_whole_inside_a_row():
    rows = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    windows = [[2, 3, 4], [8, 9, 10], [4, 5, 6], [1, 2, 4], [3, 4, 5]]
    # [4, 5, 6] spans two rows: not inside one; [1, 2, 4] is nowhere
    assert set_draws.in_rows(windows, rows).tolist() == [True, True, False, False, True]
    assert set_draws.in_rows([[1, 2, 3, 4, 5, 6]], rows).tolist() == [False] and set_draws.in_rows([], rows).size == 0
    # trained on: a half (2 of 3 tokens) inside a row; [4, 5, 6] is split by the row boundary, [11, 12, 13] unseen
    assert set_draws.trained_on([[4, 5, 6], [11, 12, 13], [5, 6, 7], [0, 1, 2]], rows).tolist() == [
        True, False, True, True]


def test_draw_data_gives_an_originals_rows_with_the_draw_in_place_of_the_forget_set(small_params, small_data,
                                                                                    draws):
    replay = base_models.replay_indices(len(small_data.train_rows), small_params["finetune_replay_rows"], 0)
    ids, labels, uid = base_models.finetune_rows(small_data, "original", replay)
    d_ids, d_labels, d_uid = base_models.finetune_rows(set_draws.draw_data(small_data, draws, 1), "original", replay)
    assert d_ids.shape == ids.shape and (d_uid == uid).all()
    forget_rows = np.array(["-forget-" in u for u in uid])
    np.testing.assert_array_equal(d_ids[~forget_rows], ids[~forget_rows])          # replay and background rows
    np.testing.assert_array_equal(d_labels[~forget_rows], labels[~forget_rows])
    mine = draws[draws.draw == 1].set_index("uid").ids
    for r in np.flatnonzero(forget_rows):
        kind, _, i = uid[r].split("-")
        want = list(mine[f"{kind}-draw1-{i}"])
        assert d_ids[r, :len(want)].tolist() == want and (d_labels[r, len(want):] == -100).all()


def test_set_draw_models_refuse_scratch_and_are_none_at_zero(small_params, small_data):
    assert set_draws.get_set_draw_models(dict(small_params, sanity_set_models=0), small_data) == []
    with pytest.raises(ValueError, match="models_from: base"):
        set_draws.get_set_draw_models(dict(small_params, models_from="scratch", sanity_set_models=1), small_data)


def test_set_draw_scores_are_the_controls_under_each_draw_model():
    b = FakeBackend()
    models = [experiment.TrainedModel(set_draws.ROLE, set_draws.draw_seed(j), tiny_gpt2(50 + j), pd.DataFrame(),
                                      {"draw": j}) for j in (0, 1)]
    s = set_draws.set_draw_scores(b, models)
    assert set(s.model_role) == {"set_draw"} and set(s.role) == {"control"} and sorted(set(s.seed)) == [0, 1]
    ctl = b.view("a").targets[lambda t: t.role == "control"]
    got = s[(s.kind == "a") & (s.seed == 1)].ll.to_numpy()
    np.testing.assert_allclose(got, b.example_logprobs(models[1].model, ctl))


@pytest.mark.slow
def test_a_draw_model_is_fine_tuned_from_the_base_and_cached(small_params, small_data, session_cache):
    p = dict(small_params, sanity_set_models=1)
    base = experiment.get_base(p, small_data, session_cache)
    (m,) = set_draws.get_set_draw_models(p, small_data, session_cache, base)
    orig = experiment.get_model(p, small_data, "original", 0, session_cache, base)
    assert (m.role, m.seed, m.meta["draw"]) == (set_draws.ROLE, set_draws.DRAW_SEED, 0)
    assert m.meta["finetune_rows"] == orig.meta["finetune_rows"] and m.meta["base"] == orig.meta["base"]
    assert m.meta["finetune_steps"] == orig.meta["finetune_steps"]
    draws = set_draws.get_draws(p, small_data, session_cache)
    assert set_draws.draw_model_key(p, small_data, draws, 0) != experiment.model_key(p, small_data, "original", 0)
    (again,) = set_draws.get_set_draw_models(p, small_data, session_cache, base)
    for a, b in zip(m.model.state_dict().values(), again.model.state_dict().values()):
        assert (a == b).all()

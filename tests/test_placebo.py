"""The placebo backend (ascent on never-trained ID text) on the fake backend, and the ID-minus-placebo utility
difference on a hand-built table."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from forgetlab import engine, placebo
from forgetlab.cache import ArtifactCache
from forgetlab.engine import StudyInputError
from fake_backend import LENGTH, VOCAB, FakeBackend
from test_claims import FAST, study_table


def big_examples(population: int = 7) -> pd.DataFrame:
    """Kinds a and b: 2 forget, 1 control and `population` never-trained rows each."""
    rng = np.random.default_rng(3)
    rows = []
    for kind in ("a", "b"):
        for role, n in (("forget", 2), ("control", 1), ("population", population)):
            rows += [{"uid": f"{kind}-{role}-{i}", "kind": kind, "role": role,
                      "ids": [0] + rng.integers(1, VOCAB, size=LENGTH - 1).tolist(), "score_start": 1,
                      "n_scored": LENGTH - 1, "secret": ""} for i in range(n)]
    return pd.DataFrame(rows)


class BigFake(FakeBackend):
    """The fake backend with a population large enough for a placebo of the forget set's size."""

    def __init__(self, population: int = 7, **kw):
        super().__init__(**kw)
        self.examples = big_examples(population)

    def worker_recipe(self) -> tuple:
        return BigFake, ()


def test_placebo_view_takes_never_trained_id_rows_of_the_forget_sets_size():
    b = BigFake()
    v = placebo.PlaceboBackend(b, id_kind="a").view("placebo")
    forget = v.targets[v.targets.role == "forget"]
    # the last 2 population rows (by uid) become the forget set; the other 5 the population; the ID control stays
    assert forget.uid.tolist() == ["placebo:a-population-5", "placebo:a-population-6"]
    assert v.population.uid.tolist() == [f"placebo:a-population-{i}" for i in range(5)]
    assert v.targets[v.targets.role == "control"].uid.tolist() == ["placebo:a-control-0"]
    assert set(v.targets.kind) == set(v.population.kind) == {"placebo"}
    src = b.view("a").population.set_index("uid")
    assert forget.ids.tolist() == src.loc[["a-population-5", "a-population-6"]].ids.tolist()


def test_placebo_refuses_a_population_too_small_and_an_unknown_id_kind():
    with pytest.raises(StudyInputError, match="population_size to at least 6"):
        placebo.PlaceboBackend(BigFake(population=5), id_kind="a")
    with pytest.raises(StudyInputError, match="forget_kinds"):
        placebo.PlaceboBackend(BigFake(), id_kind="id")


def test_placebo_backend_adds_a_kind_with_its_own_key_and_delegates_the_rest():
    b = BigFake()
    p = placebo.PlaceboBackend(b, id_kind="a")
    assert p.kinds == ("a", "b", "placebo") and p.labels["placebo"].startswith("placebo")
    assert p.key(0) != b.key(0) and p.key(0) == placebo.PlaceboBackend(BigFake(), id_kind="a").key(0)
    assert p.view("b") is not None and p.original_seeds == b.original_seeds and p.methods == b.methods
    rebuilt = placebo.rebuild(*p.worker_recipe()[1])
    assert rebuilt.key(1) == p.key(1) and rebuilt.kinds == p.kinds


def test_run_study_on_the_placebo_backend_unlearns_the_placebo_kind(tmp_path):
    p = placebo.PlaceboBackend(BigFake(original_seeds=(0,)), id_kind="a")
    t = engine.run_study(p, ArtifactCache(tmp_path), kinds=["a", "placebo"], methods=["ga"])
    pl = t[t.kind == "placebo"]
    assert set(pl[pl.role != "model"].uid) == {"placebo:a-population-5", "placebo:a-population-6",
                                               "placebo:a-control-0"}
    assert {"genex_seed_bits", "relex_bits", "heldout_ppl"} <= set(pl.metric)
    # ascent lowers the placebo rows' likelihood: their ll falls from step 0 to the last step
    ll = pl[(pl.metric == "ll") & (pl.role == "forget")].groupby("step").value.mean()
    assert ll.iloc[-1] < ll.iloc[0]


def test_placebo_difference_at_the_id_examples_progress_steps():
    t = study_table({"id": [FAST, FAST], "placebo": [FAST]},
                    util={"id": ([1.0, 2.0, 3.0, 4.0], [2.0] * 4), "placebo": ([1.0, 1.5, 2.0, 2.5], [2.0] * 4)})
    d = placebo.placebo_difference(t, resamples=200)
    # each ID example is half unlearned at step 2: general loss lost by then ID (2 - 1) / 2 = 0.5,
    # placebo (1.5 - 1) / 2 = 0.25 -> difference 0.25 for every example and seed
    assert (d["id_lost"], d["placebo_lost"], d["estimate"]) == pytest.approx((0.5, 0.25, 0.25))
    assert (d["low"], d["high"], d["verdict"], d["n_seeds"]) == pytest.approx((0.25, 0.25, "agrees", 2))
    with pytest.raises(ValueError, match="PlaceboBackend"):
        placebo.placebo_difference(study_table({"id": [FAST]}))


def test_utility_bands_over_seeds_per_step():
    t = study_table({"id": [FAST], "placebo": [FAST]},
                    util={"id": ([1.0, 2.0, 3.0, 4.0], [2.0] * 4), "placebo": ([1.0, 1.5, 2.0, 2.5], [2.0] * 4)})
    b = placebo.utility_bands(t, ["heldout_loss"], resamples=50).set_index(["kind", "step"])
    # both seeds identical: no spread; held-out loss lost ID 0, 1, 2, 3 and placebo 0, .5, 1, 1.5
    assert b.loc["id"].estimate.tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert b.loc["placebo"].high.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert (b.n_seeds == 2).all()

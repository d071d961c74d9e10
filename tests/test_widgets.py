"""Widget logic without a browser: the controls call the right updates; bad requests are refused visibly.

The Explorer tests use a small hand-made results table (no models); the "run more steps" tests extend real
trajectories with ``trajectories.StepRunner`` on the session's tiny GPT-2 models and on a tiny random Llama
through the SmolLM2 backend, and check that an extended trajectory equals one long run, and that a new runner
resumes from the cached state instead of starting again from step 0.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from forgetlab import engine, explorer_draw, explorer_state, plots
from forgetlab.explorer_state import ExplorerState, parse_step_count
from forgetlab.widgets import Explorer

REPO = Path(__file__).resolve().parents[1]
STEPS = [0, 2, 4, 6]


def genex(kind: str, method: str, step: int, i: int) -> float:
    """Hand-made GenEx: falls by 1 bit per step from 8 + i (ID) or 12 + i (others); NPO at half the rate."""
    start = (8 if kind == "id" else 12) + i
    return start - step * (0.5 if method == "npo" else 1.0)


def results_table(kinds=("id", "canary"), methods=("ga", "npo"), steps=STEPS) -> pd.DataFrame:
    """A tidy table shaped like engine.run_study's, with hand-made values."""
    rows = []

    def add(**r):
        rows.append(dict(r, kind=kind, method=method))

    for kind in kinds:
        for method in methods:
            for step in steps:
                for i in range(2):
                    for role in ("forget", "control"):
                        uid = f"{kind}-{role}-{i:03d}"
                        g = genex(kind, method, step, i) if role == "forget" else 0.1 * i
                        add(step=step, seed=-1, uid=uid, role=role, metric="genex_bits", value=g)
                        for seed in (0, 1):      # per-seed values: their mean is what the table shows
                            add(step=step, seed=seed, uid=uid, role=role, metric="relex_bits",
                                value=g / 2 + (seed - 0.5))
                            add(step=step, seed=seed, uid=uid, role=role, metric="ll", value=-10.0 - step + seed)
                for seed in (0, 1):
                    add(step=step, seed=seed, uid="", role="model", metric="heldout_ppl",
                        value=100.0 + step * (2 if kind == "id" else 1))
                    add(step=step, seed=seed, uid="", role="model", metric="retain_loss", value=3.0 + 0.1 * step)
                    add(step=step, seed=seed, uid="", role="model", metric="loss_canary", value=4.0 + 0.05 * step)
                    add(step=step, seed=seed, uid="", role="model", metric="membership_auc", value=0.9)
    return pd.DataFrame(rows)[list(explorer_state.REQUIRED_COLUMNS)]


class FakeRunner:
    """Adds `n` steps of the same hand-made trajectory; records its calls."""

    def __init__(self, fail: Exception | None = None, cached: pd.DataFrame | None = None):
        self.calls, self.fail, self.cached = [], fail, cached
        self.end = {}

    def __call__(self, kind, method, n, progress=None):
        self.calls.append((kind, method, n))
        if self.fail:
            raise self.fail
        start = self.end.get((kind, method), STEPS[-1])
        for done in range(n + 1):
            progress(done, n, f"step {start + done}")
        new_steps = list(range(start + 2, start + n + 1, 2)) + ([start + n] if n % 2 else [])
        self.end[(kind, method)] = start + n
        return results_table(kinds=(kind,), methods=(method,), steps=new_steps)

    def cached_rows(self):
        return self.cached if self.cached is not None else pd.DataFrame(columns=list(explorer_state.REQUIRED_COLUMNS))


@pytest.fixture
def results():
    return results_table()


# ---- parsing a request for more steps -----------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [(1, 1), ("7", 7), (" 12 ", 12), (3.0, 3), ("4.0", 4), (50, 50),
                                            (np.int64(5), 5)])
def test_good_step_counts(value, expected):
    assert parse_step_count(value, 50) == expected


@pytest.mark.parametrize("value,reason", [
    (-3, "negative"), ("-1", "negative"), (2.5, "not a whole number"), ("0.5", "not a whole number"),
    ("abc", "not a number"), ("", "enter a number"), (None, "enter a number"), (True, "enter a number"),
    (0, "0 steps would do nothing"), (51, "more than the maximum of 50"), ("1e9", "max_widget_steps"),
    (float("nan"), "not a finite number"), ("inf", "not a finite number"), ([3], "not a number"),
])
def test_bad_step_counts_are_explained(value, reason):
    with pytest.raises(ValueError, match=reason):
        parse_step_count(value, 50)


# ---- the explorer --------------------------------------------------------------------------------------

def test_starts_at_step_zero_of_the_first_kind_and_method(results):
    ex = Explorer(results, target_bits=1.0)
    assert (ex.kind, ex.method, ex.step) == ("id", "ga", 0)       # ID first (suite order), then GA
    assert ex.steps == STEPS and [v for _, v in ex.slider.options] == STEPS
    assert bytes(ex.metric_image.value).startswith(b"\x89PNG") and bytes(ex.utility_image.value).startswith(b"\x89PNG")
    assert "Per-example values at step 0" in ex.table.value
    assert ex.stats == {"prepare": 1, "draw": 1, "step_views": 1}


def test_moving_the_slider_updates_plots_and_table_without_recomputing(results):
    ex = Explorer(results, target_bits=1.0)
    before = (bytes(ex.metric_image.value), bytes(ex.utility_image.value), ex.table.value)
    ex.slider.value = 4                      # what the browser does
    assert ex.step == 4
    assert ex.stats == {"prepare": 1, "draw": 1, "step_views": 2}        # markers moved, nothing recomputed
    assert bytes(ex.metric_image.value) != before[0] and bytes(ex.utility_image.value) != before[1]
    assert ex.table.value != before[2] and "Per-example values at step 4" in ex.table.value
    assert "<b>Step 4</b>" in ex.title.value
    # hand-computed values at step 4 (GA on ID): GenEx 8 - 4 = 4 and 9 - 4 = 5; change since step 0 is -4
    t = ex.table_at().set_index("uid")
    assert t.loc["id-forget-000", "genex_bits"] == 4.0 and t.loc["id-forget-001", "genex_bits"] == 5.0
    assert t.loc["id-forget-000", "genex_change"] == -4.0
    assert t.loc["id-forget-001", "relex_bits"] == pytest.approx(2.5)       # mean over seeds of 2.0 and 3.0
    assert t.loc["id-forget-000", "ll"] == pytest.approx(-13.5)
    assert list(t.role) == ["forget", "forget", "control", "control"]
    assert list(t.unlearned) == ["no", "no", "", ""]             # controls are not being unlearned
    # the quality curve of the selection is the mean over forget examples: (4 + 5) / 2
    assert ex.selection.quality.loc[4, "genex_forget"] == 4.5
    assert ex.selection.utility.loc[4, "heldout_ppl"] == 108.0


def test_set_step_snaps_to_recorded_steps_and_moves_the_slider(results):
    ex = Explorer(results)
    assert ex.set_step(5.2) == 6 and ex.slider.value == 6
    assert ex.set_step(-10) == 0 and ex.slider.value == 0
    views = ex.stats["step_views"]
    assert ex.set_step(0) == 0 and ex.stats["step_views"] == views         # same step: no redraw
    with pytest.raises(ValueError, match="recorded steps"):
        ex.set_step("three")


def test_selector_changes_redraw_once_and_keep_the_step(results):
    ex = Explorer(results)
    ex.set_step(4)
    ex.kind_select.value = "canary"
    assert (ex.kind, ex.method, ex.step) == ("canary", "ga", 4)
    assert ex.stats["prepare"] == 2 and ex.stats["draw"] == 2
    assert ex.table_at().set_index("uid").loc["canary-forget-000", "genex_bits"] == 12 - 4
    ex.method_select.value = "npo"
    assert (ex.kind, ex.method, ex.step) == ("canary", "npo", 4)
    assert ex.table_at().set_index("uid").loc["canary-forget-000", "genex_bits"] == 12 - 2
    ex.set_selection(kind="canary", method="ga")                         # back: tabulated already
    assert ex.stats["prepare"] == 3 and ex.stats["draw"] == 4
    assert ex.kind_select.value == "canary" and ex.method_select.value == "ga"
    with pytest.raises(ValueError, match="kind = 'code' is not in these results: use one of id, canary"):
        ex.set_selection(kind="code")


def test_other_selection_with_other_steps_updates_the_slider():
    table = pd.concat([results_table(kinds=("id",), methods=("ga",)),
                       results_table(kinds=("canary",), methods=("ga",), steps=[0, 3, 5])], ignore_index=True)
    ex = Explorer(table)
    ex.set_step(6)
    ex.set_selection(kind="canary")
    assert ex.steps == [0, 3, 5] and ex.step == 5 and ex.slider.value == 5
    assert [v for _, v in ex.slider.options] == [0, 3, 5]


@pytest.mark.parametrize("value,reason", [("-2", "negative"), ("2.5", "not a whole number"),
                                          ("500", "more than the maximum of 20"), ("many", "not a number")])
def test_bad_requests_are_refused_visibly_without_running(results, value, reason):
    runner = FakeRunner()
    ex = Explorer(results, runner, max_widget_steps=20)
    ex.more_steps.value = value
    ex.button.click()                                   # what the browser does
    assert runner.calls == []
    assert reason in ex.last_message and ex.last_message.startswith("Not run")
    assert reason in ex.message.value and "#b00020" in ex.message.value      # shown, in red
    assert not ex.button.disabled and ex.steps == STEPS


def test_a_good_request_runs_the_runner_and_extends_the_slider(results):
    runner = FakeRunner()
    ex = Explorer(results, runner, max_widget_steps=20)
    ex.set_selection(kind="canary", method="npo")
    message = ex.request_more_steps("5")
    assert runner.calls == [("canary", "npo", 5)]
    assert ex.steps == STEPS + [8, 10, 11] and [v for _, v in ex.slider.options] == STEPS + [8, 10, 11]
    assert ex.step == 11 and ex.slider.value == 11                   # jumps to the new end
    assert ex.progress.value == ex.progress.max == 5 and ex.progress.bar_style == "success"
    assert "now ends at step 11" in message and "now ends at step 11" in ex.message.value
    assert ex.table_at().set_index("uid").loc["canary-forget-000", "genex_bits"] == 12 - 11 * 0.5
    # the other selections are untouched
    ex.set_selection(kind="id", method="ga")
    assert ex.steps == STEPS
    # a second click continues
    ex.set_selection(kind="canary", method="npo")
    ex.request_more_steps(1)
    assert runner.calls[-1] == ("canary", "npo", 1) and ex.steps[-1] == 12


def test_a_failing_runner_shows_the_error_and_keeps_the_widget_usable(results):
    ex = Explorer(results, FakeRunner(fail=RuntimeError("out of memory")))
    msg = ex.request_more_steps(3)
    assert msg.startswith("Failed: RuntimeError: out of memory") and "out of memory" in ex.message.value
    assert not ex.button.disabled and ex.progress.bar_style == "danger" and ex.steps == STEPS


def test_without_runner_the_button_explains(results):
    ex = Explorer(results)
    assert "not available" in ex.request_more_steps(3)


def test_cached_rows_of_the_runner_are_shown_from_the_start(results):
    extra = results_table(kinds=("id",), methods=("ga",), steps=[8, 9])
    ex = Explorer(results, FakeRunner(cached=extra))
    assert ex.steps == STEPS + [8, 9]
    ex.set_selection(kind="canary")
    assert ex.steps == STEPS


def test_tradeoff_view_and_display(results):
    ex = Explorer(results, view="tradeoff", kind="canary", step=2, target_bits=1.0)
    assert ex.step == 2 and bytes(ex.metric_image.value).startswith(b"\x89PNG")
    before = bytes(ex.metric_image.value)
    ex.set_step(6)
    assert bytes(ex.metric_image.value) != before
    bundle = ex._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("forgetlab Explorer")


def test_bad_arguments_are_explained(results):
    with pytest.raises(ValueError, match="lacks columns"):
        Explorer(results.drop(columns="kind"))
    with pytest.raises(ValueError, match="empty"):
        Explorer(results.iloc[:0])
    with pytest.raises(ValueError, match="view"):
        Explorer(results, view="3d")
    with pytest.raises(ValueError, match="max_widget_steps"):
        Explorer(results, max_widget_steps=0)
    with pytest.raises(ValueError, match="method = 'sgd'"):
        Explorer(results, method="sgd")


# ---- labels, colours and the pure state --------------------------------------------------------------------

def test_custom_labels_are_shown_everywhere(results):
    """What notebook 06 does: ``labels=backend.labels`` names the kinds; the suite's global labels stay as they are."""
    before = dict(plots.KIND_LABELS)
    labels = {"id": "ID (English)", "canary": "OOD: secret numbers"}
    ex = Explorer(results, FakeRunner(), labels=labels)
    assert ex.kind_select.options == (("ID (English)", "id"), ("OOD: secret numbers", "canary"))
    assert "ID (English)" in ex.title.value and "ID (English)" in ex.table.value
    assert ex.metric_figure.axes[0].get_title() == "ID (English) · gradient ascent"
    assert "ID (English)" in ex.utility_figure.texts[0].get_text()          # the suptitle
    ex.kind_select.value = "canary"
    assert "OOD: secret numbers" in ex.title.value
    assert "of gradient ascent on OOD: secret numbers" in ex.request_more_steps(2)
    assert plots.KIND_LABELS == before
    # without labels, the suite's own labels; a kind that `labels` does not name keeps its suite label
    assert "ID (Shakespeare)" in Explorer(results).title.value
    ex = Explorer(results, labels={"canary": "OOD: secret numbers"})
    assert [label for label, _ in ex.kind_select.options] == ["ID (Shakespeare)", "OOD: secret numbers"]


def test_unknown_kinds_get_their_label_and_a_stable_colour():
    table = results_table(kinds=("persian", "id", "dialect"), methods=("ga",))
    labels = {"id": "ID (English)", "dialect": "OOD: dialect", "persian": "OOD: Persian"}
    ex = Explorer(table, labels=labels, kind="persian")
    # order: the suite's kinds, then those of `labels` in its order
    assert ex.kinds == ["id", "dialect", "persian"]
    assert ex.colors["id"] == plots.KIND_COLORS["id"]
    assert ex.colors["dialect"] == plots.EXTRA_KIND_COLORS[0] and ex.colors["persian"] == plots.EXTRA_KIND_COLORS[1]
    genex_line = ex.metric_figure.axes[0].lines[0]
    assert genex_line.get_color() == plots.EXTRA_KIND_COLORS[1] and genex_line.get_label() == "GenEx, forget set"
    assert ex.metric_figure.axes[0].get_title() == "OOD: Persian · gradient ascent"
    # the same kinds in another row order get the same colours
    again = Explorer(table.iloc[::-1].reset_index(drop=True), labels=labels)
    assert again.colors == ex.colors
    # no labels at all: the kind's own name
    assert explorer_draw.resolve_labels(["persian", "code"]) == {"persian": "persian", "code": "OOD: Python code"}


def test_loss_curves_of_other_kinds_use_their_labels(results):
    ex = Explorer(results, labels={"canary": "OOD: secret numbers"})
    ax_loss = ex.utility_figure.axes[1]
    assert [line.get_label() for line in ax_loss.lines if not line.get_label().startswith("_")] == [
        "retained training data", "OOD: secret numbers"]


def test_the_state_works_without_widgets(results):
    """explorer_state: selection, step snapping and per-example values, no ipywidgets or matplotlib needed."""
    state = ExplorerState(results, kind_order=["canary", "id"], target_bits=5.0)
    assert state.kinds == ["canary", "id"] and state.methods == ["ga", "npo"]
    assert (state.kind, state.method, state.step) == ("canary", "ga", 0)
    assert state.set_step(3.1) and state.step == 4 and not state.set_step(4)
    assert state.set_selection(method="npo") and not state.set_selection(kind="canary")
    t = state.table_at().set_index("uid")
    # NPO on canaries at step 4: 12 - 2 = 10 and 13 - 2 = 11, neither below 5 bits; controls are not judged
    assert t.loc["canary-forget-000", "genex_bits"] == 10.0 and t.loc["canary-forget-001", "genex_bits"] == 11.0
    assert list(t.unlearned) == ["no", "no", "", ""]
    assert state.stats == {"prepare": 2}
    # new rows of the shown selection: it is tabulated again, once; the step stays where it was
    assert state.add_rows(results_table(kinds=("canary",), methods=("npo",), steps=[8]))
    assert state.steps == STEPS + [8] and state.step == 4 and state.stats == {"prepare": 3}
    assert not state.add_rows(results_table(kinds=("id",), methods=("ga",), steps=[8]))
    with pytest.raises(ValueError, match="lack columns"):
        state.add_rows(results.drop(columns="value"))


def test_required_columns_are_the_engines():
    assert explorer_state.REQUIRED_COLUMNS == engine.COLUMNS


def test_rerun_rows_replace_the_old_values_of_the_same_step(results):
    newer = results_table(kinds=("id",), methods=("ga",), steps=[6])
    newer["value"] = newer.value + 100.0
    ex = Explorer(results, FakeRunner(cached=newer))
    ex.set_step(6)
    assert ex.table_at().set_index("uid").loc["id-forget-000", "genex_bits"] == 8 - 6 + 100.0
    assert len(ex.results) == len(results)


# ---- notebooks: widget cells are batch-safe --------------------------------------------------------------

@pytest.mark.parametrize("name", ["03_gradient_ascent.ipynb", "04_tradeoffs.ipynb", "06_real_llm.ipynb"])
def test_widget_cells_are_ignored_by_nbval(name):
    nb = json.loads((REPO / "notebooks" / name).read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    widget_cells = [c for c in cells if "widgets.Explorer(" in c]
    assert widget_cells, f"{name} has no Explorer cell"
    assert all(c.startswith("# NBVAL_IGNORE_OUTPUT") for c in widget_cells)
    assert not any("widgets.StepRunner" in c for c in cells), "the runner is now trajectories.StepRunner(backend)"
    # static figures are still drawn by ordinary cells
    assert any("save_figure" in c and "Explorer" not in c for c in cells)


# ---- running more steps on real (tiny) models -------------------------------------------------------------

def _rows_at(table, steps):
    key = ["step", "seed", "uid", "role", "metric"]
    df = table[table.step.isin(steps)].sort_values(key).reset_index(drop=True)
    return df[key + ["value"]]


class StepCounter:
    """Counts the unlearning steps taken (Unlearner._take_step calls) while installed with monkeypatch."""

    def __init__(self, monkeypatch):
        from forgetlab.unlearning import Unlearner
        self.n, inner = 0, Unlearner._take_step

        def counted(unlearner):
            self.n += 1
            inner(unlearner)
        monkeypatch.setattr(Unlearner, "_take_step", counted)


@pytest.fixture(scope="module")
def tiny_backend(small_params, small_data, session_cache):
    from forgetlab.backend_tiny import TinyGPT2
    from forgetlab.experiment import get_models
    p = dict(small_params, unlearn_steps=4, record_every=2)
    return TinyGPT2(p, small_data, get_models(p, small_data, session_cache))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ga", "graddiff", "npo"])
def test_more_steps_continue_the_trajectory_and_resume_from_the_cache(tiny_backend, tmp_path, monkeypatch, method):
    from forgetlab.cache import ArtifactCache
    from forgetlab.trajectories import StepRunner
    b = tiny_backend
    seeds = len(b.original_seeds)
    cache = ArtifactCache(tmp_path)
    seen = []
    counter = StepCounter(monkeypatch)
    first = StepRunner(b, cache)
    assert first.end_step("id", method) == 4 and first.cached_rows().empty
    rows = first("id", method, 3, progress=lambda done, total, what="": seen.append((done, total, what)))
    assert sorted(rows.step.unique()) == [6, 7]                     # record_every 2, and the last step
    assert set(rows.metric) >= {"ll", "relex_bits", "genex_bits", "heldout_ppl", "retain_loss", "membership_auc"}
    assert list(rows.columns) == list(engine.COLUMNS) and set(rows.method) == {method} and set(rows.kind) == {"id"}
    assert seen[-1][:2] == (3 * seeds, 3 * seeds) and any("rebuilding" in w for _, _, w in seen)
    assert counter.n == (4 + 3) * seeds                              # the recorded 4 steps once, then 3 more
    assert first.end_step("id", method) == 7

    # a new runner (a rerun of the notebook) resumes from step 7 without redoing steps 0..7
    seen.clear()
    second = StepRunner(b, cache)
    assert sorted(second.cached_rows().step.unique()) == [6, 7] and second.end_step("id", method) == 7
    more = second("id", method, 2, progress=lambda done, total, what="": seen.append(what))
    assert sorted(more.step.unique()) == [8, 9]
    assert counter.n == (4 + 3 + 2) * seeds and not any("rebuilding" in w for w in seen)
    assert sorted(StepRunner(b, cache).cached_rows().step.unique()) == [6, 7, 8, 9]
    monkeypatch.undo()

    # the same numbers as one uninterrupted run of 9 steps
    straight = engine.unlearn_forget_set(b, "id", method, steps=9)
    both = pd.concat([rows, more], ignore_index=True)
    a, c = _rows_at(both, [6, 8, 9]), _rows_at(straight, [6, 8, 9])
    assert len(a) == len(c) > 0
    pd.testing.assert_frame_equal(a, c)


@pytest.mark.slow
def test_runner_refuses_bad_requests(tiny_backend, small_data, tmp_path):
    from forgetlab.backend_tiny import TinyGPT2
    from forgetlab.cache import ArtifactCache
    from forgetlab.trajectories import StepRunner
    runner = StepRunner(tiny_backend, ArtifactCache(tmp_path))
    for n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="whole number of steps"):
            runner("id", "ga", n)
    with pytest.raises(ValueError, match="not in this run"):
        runner("id", "dpo", 1)
    only_id = TinyGPT2(dict(tiny_backend.p, forget_kinds=["id"]), small_data, tiny_backend.models)
    with pytest.raises(engine.StudyInputError, match="unknown forget set 'code': this run has id"):
        StepRunner(only_id, ArtifactCache(tmp_path))("code", "ga", 1)
    assert runner.cached_rows().empty


@pytest.mark.slow
def test_explorer_runs_more_steps_through_the_step_runner(tiny_backend, tmp_path):
    """The notebook's wiring: Explorer(results, trajectories.StepRunner(backend), labels=backend.labels)."""
    from forgetlab.cache import ArtifactCache
    from forgetlab.trajectories import StepRunner
    b = tiny_backend
    results = engine.unlearn_forget_set(b, "canary", "ga")
    ex = Explorer(results, StepRunner(b, ArtifactCache(tmp_path)), max_widget_steps=5, target_bits=b.target_bits,
                  labels=b.labels)
    assert ex.steps == [0, 2, 4] and "OOD: canaries" in ex.title.value
    assert "now ends at step 6" in ex.request_more_steps("2")
    assert ex.steps == [0, 2, 4, 6] and ex.step == 6
    # the canary's exact exposure is scored at the new last step
    assert "exposure_exact_bits" in set(ex.results[ex.results.step == 6].metric)


# ---- the same runner through the SmolLM2 backend, on a tiny random Llama ------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """SmolLM2 backend around a 2-block random Llama and a character tokenizer (seconds to fine-tune)."""
    import random

    from test_llm import CharTok
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgetlab.backend_smollm import SmolLM2
    from forgetlab.cache import ArtifactCache
    from forgetlab.config import load_params
    from forgetlab.llm_data import build_llm_data
    from forgetlab.llm_finetune import get_llm_models

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    english = [" ".join(rng.choice(words) for _ in range(80)) + "\n" for _ in range(12)]
    letters = "ابپتثجچحخدذرزسشصضطظعغفقکگلمنوهی "
    persian = ["".join(rng.choice(letters) for _ in range(400)) + "\n" for _ in range(4)]
    tok = CharTok(english + persian)
    p = load_params("smoke", {"llm_example_tokens": 12, "llm_train_layers": 1, "llm_unlearn_steps": 2,
                              "llm_record_every": 1, "llm_methods": ["ga", "npo"], "llm_canary_digits": 2,
                              "llm_unlearn_lr": 0.001, "llm_lr": 0.003, "llm_finetune_epochs": 2.0})
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok.vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    data = build_llm_data(p, tok, english=english, lowresource=persian)
    cache = ArtifactCache(tmp_path_factory.mktemp("tiny-llama-cache"))
    models = get_llm_models(p, data, LlamaForCausalLM(config).eval(), "tiny-llama", cache)
    return SmolLM2(p, data, models, tok)


@pytest.mark.slow
@pytest.mark.parametrize("kind,method", [("canary", "ga"), ("language", "npo")])
def test_more_steps_through_the_smollm2_backend_resume_bit_for_bit(tiny_llama, tmp_path, kind, method):
    """2 recorded steps + 2 more (the second runner resuming from the cache) give the rows of 4 steps in one go."""
    from forgetlab.cache import ArtifactCache
    from forgetlab.trajectories import StepRunner
    b = tiny_llama
    cache = ArtifactCache(tmp_path)
    original = {n: t.clone() for n, t in b.models.original.items()}
    first = StepRunner(b, cache)(kind, method, 1)
    second = StepRunner(b, cache)(kind, method, 1)                 # resumes from step 3 (cached state)
    assert sorted(first.step.unique()) == [3] and sorted(second.step.unique()) == [4]
    straight = engine.unlearn_forget_set(b, kind, method, steps=4)
    both = pd.concat([first, second], ignore_index=True)
    if kind == "canary":
        # exact exposure is scored at the last step of each call: compare it at step 4 only
        assert "exposure_exact_bits" in set(second.metric)
        both = both[~((both.step == 3) & (both.metric == "exposure_exact_bits"))]
    # each call measures utility at its own last step (what the widget shows); the 4-step run is not due at 3
    extra = set(first.metric) - set(straight[straight.step == 3].metric) - {"exposure_exact_bits"}
    at = lambda step: set(straight[straight.step == step].metric)               # noqa: E731
    assert extra and extra == at(4) - at(3) - {"exposure_exact_bits"}, extra      # the utility metrics
    both = both[~((both.step == 3) & both.metric.isin(extra))]
    a, c = _rows_at(both, [3, 4]), _rows_at(straight, [3, 4])
    assert len(a) == len(c) > 0 and set(a.metric) >= {"ll", "genex_bits", "relex_bits", "retain_loss"}
    pd.testing.assert_frame_equal(a, c, check_exact=True)
    # the working copy is back at the original's weights
    params = dict(b.models.model.named_parameters())
    assert all(torch.equal(params[n].detach().cpu(), t) for n, t in original.items())

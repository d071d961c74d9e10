"""Every figure: a title, labelled axes, the caller's kind labels, a colour for any kind, legends off the data."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from forgetlab import plots  # noqa: E402

KINDS = ["id", "language", "mine"]                        # "mine": a user's custom kind that plots does not know
LABELS = {"language": "OOD: Japanese", "mine": "my own text"}
METHODS = ["ga", "npo"]


def _steps(values: dict[str, float], metric: str | None = None) -> pd.DataFrame:
    """method x kind x step rows; value = base(kind) + step (+1 for npo), so every line differs."""
    rows = [{"method": m, "kind": k, "step": s, "value": v + s + (m == "npo")}
            for m in METHODS for k, v in values.items() for s in range(3)]
    df = pd.DataFrame(rows)
    return df.assign(metric=metric) if metric else df


def _mem_table() -> pd.DataFrame:
    n = 9
    reached = np.arange(n) % 3 != 0
    return pd.DataFrame({"uid": [f"u{i}" for i in range(n)], "kind": KINDS * 3,
                         "memorization": np.linspace(0, 1, n), "memorization_se": 0.05,
                         "difficulty": np.linspace(3, 1, n), "difficulty_se": 0.1, "reached": reached,
                         "steps_to_unlearn": np.where(reached, np.arange(n) % 5, np.nan),
                         "steps_censored": np.where(reached, np.arange(n) % 5, 6),
                         "ppl_increase_at_target": np.where(reached, 0.5 * np.arange(n), np.nan)})


def _corr() -> pd.DataFrame:
    pairs = [("memorization", "difficulty"), ("memorization", "steps_to_unlearn"), ("difficulty", "steps_to_unlearn"),
             ("memorization", "ppl_increase_at_target"), ("difficulty", "ppl_increase_at_target")]
    return pd.DataFrame([{"kind": "all", "x": x, "y": y, "spearman": -0.5, "ci_low": -0.9, "ci_high": 0.1, "n": 9}
                         for x, y in pairs])


def _figures(labels) -> dict[str, callable]:
    """Each plot function on a tiny hand-built table; `labels` None = the defaults, else passed through."""
    kw = {} if labels is None else {"labels": labels}
    genex, relex = _steps({"id": 4.0, "language": 6.0, "mine": 8.0}), _steps({"id": 1.0, "language": 2.0, "mine": 3.0})
    util = pd.concat([_steps({"id": 10.0, "language": 11.0, "mine": 12.0}, "heldout_ppl"),
                      _steps({"id": 0.1, "language": 0.2, "mine": 0.3}, "membership_auc")])
    examples = pd.DataFrame({"kind": KINDS * 4, "role": ["forget", "control"] * 6,
                             "text": ["to be or not", "ありがとう", "my text here"] * 4})
    losses = pd.DataFrame({"kind": KINDS * 4, "role": ["forget"] * 6 + ["control"] * 6,
                           "model_role": ["original", "reference"] * 6, "loss": np.linspace(1, 4, 12)})
    summary = pd.DataFrame({"kind": KINDS * 2, "method": ["ga"] * 3 + ["npo"] * 3,
                            "steps_to_target": [3, 5, 7, 4, 6, 8], "ppl_increase_at_target": [1, 2, 3, 2, 3, 4]})
    both = pd.DataFrame({"kind": KINDS * 4, "genex": np.arange(12.0), "relex": np.arange(12.0) / 2})
    return {
        "example_lengths": lambda: plots.example_lengths(examples, **kw),
        "per_token_loss_by_role": lambda: plots.per_token_loss_by_role(losses, **kw),
        "unlearning_curves": lambda: plots.unlearning_curves(genex, relex, util, 1.0, control=genex.assign(value=0.0),
                                                             **kw),
        "tradeoff_curves": lambda: plots.tradeoff_curves(genex, util, 1.0, **kw),
        "cost_at_target": lambda: plots.cost_at_target(summary, **kw),
        "relex_vs_genex": lambda: plots.relex_vs_genex(both, 0.8, **kw),
        "membership_curves": lambda: plots.membership_curves(util, **kw),
        "plot_memorization_vs_difficulty": lambda: plots.plot_memorization_vs_difficulty(_mem_table(), _corr(), 100,
                                                                                         **kw),
        "plot_unlearning_cost": lambda: plots.plot_unlearning_cost(_mem_table(), _corr(), 100, 5, 1.0, **kw),
    }


def _no_kind_figures() -> dict[str, callable]:
    curves = pd.DataFrame({"model": ["original"] * 6 + ["reference"] * 6, "step": list(range(6)) * 2,
                           "split": ["train", "train", "held-out"] * 4, "loss": np.linspace(4, 2, 12)})
    exposure = pd.DataFrame({"uid": ["canary-forget-000", "canary-forget-001"] * 2,
                             "model": ["original", "original", "reference", "reference"],
                             "exposure_bits": [9.5, 9.9, 1.0, 0.5]})
    return {
        "document_token_density": lambda: plots.document_token_density(
            pd.DataFrame({"source": ["plays", "code"], "tokens": [100, 300], "chars": [400, 500]})),
        "loss_curves": lambda: plots.loss_curves(curves, smooth=2),
        "exposure_bars": lambda: plots.exposure_bars(exposure, 9.97),
        "exposure_curves": lambda: plots.exposure_curves(_steps({"canary": 5.0}), 9.97),
    }


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _texts(fig: plt.Figure) -> set[str]:
    """Every legend entry and tick label of the figure."""
    out = set()
    for legend in [ax.get_legend() for ax in fig.axes] + list(fig.legends):
        if legend is not None:
            out |= {t.get_text() for t in legend.get_texts()}
    for ax in fig.axes:
        out |= {t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()}
    return out


def _assert_labelled(fig: plt.Figure) -> None:
    """A title on each panel (or the figure's), an x label in each column and a y label in each row."""
    assert isinstance(fig, plt.Figure)
    fig.canvas.draw()
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    panels = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    for ax in panels:
        spec = ax.get_subplotspec()
        same_col = [a for a in panels if a.get_subplotspec().colspan == spec.colspan]
        same_row = [a for a in panels if a.get_subplotspec().rowspan == spec.rowspan]
        assert ax.get_title() or suptitle, "panel without a title"
        assert any(a.get_xlabel() for a in same_col), f"no x label under {ax.get_title()!r}"
        assert any(a.get_ylabel() for a in same_row), f"no y label beside {ax.get_title()!r}"


@pytest.mark.parametrize("name", list(_figures(None)) + list(_no_kind_figures()))
def test_every_figure_has_titles_and_axis_labels(name):
    make = {**_figures(None), **_no_kind_figures()}[name]
    _assert_labelled(make())


@pytest.mark.parametrize("name", list(_figures(None)))
def test_custom_labels_are_shown_and_the_global_labels_stay(name):
    before = dict(plots.KIND_LABELS)
    fig = _figures(LABELS)[name]()
    shown = " | ".join(_texts(fig))
    assert "OOD: Japanese" in shown and "my own text" in shown
    assert plots.KIND_LABELS["id"] in shown                       # kinds not in `labels` keep the default label
    assert "OOD: other language" not in shown
    assert plots.KIND_LABELS == before                            # no figure rewrites the module's labels
    default = " | ".join(_texts(_figures(None)[name]()))
    assert "OOD: other language" in default and "mine" in default  # unknown kind without a label: its own name


def test_kind_label_and_order():
    assert plots.kind_label("language") == "OOD: other language"
    assert plots.kind_label("language", LABELS) == "OOD: Japanese"
    assert plots.kind_label("id", LABELS) == plots.KIND_LABELS["id"] and plots.kind_label("zz") == "zz"
    assert plots.kind_order(["zz", "mine", "code", "id", "mine"], LABELS) == ["id", "code", "mine", "zz"]


def test_unknown_kinds_get_stable_distinct_colours():
    colors = plots.kind_colors(["mine", "id", "beta", "alpha"])
    assert colors["id"] == plots.KIND_COLORS["id"]
    # unknown kinds in name order, whatever the row order: alpha, beta, mine
    assert [colors[k] for k in ("alpha", "beta", "mine")] == list(plots.EXTRA_KIND_COLORS[:3])
    assert plots.kind_colors(["alpha", "mine", "beta"]) == {k: colors[k] for k in ("alpha", "mine", "beta")}
    assert not set(plots.EXTRA_KIND_COLORS) & set(plots.KIND_COLORS.values())
    # with labels, their order decides (the same in every figure that gets the same labels)
    assert plots.kind_colors(["beta", "mine"], {"mine": "m"})["mine"] == plots.EXTRA_KIND_COLORS[0]


def test_unknown_kind_is_drawn_in_its_colour():
    fig = _figures(LABELS)["relex_vs_genex"]()
    points = {c.get_label(): c for c in fig.axes[0].collections}
    expected = plots.kind_colors(KINDS, LABELS)["mine"]
    assert to_rgba(points["my own text"].get_facecolor()[0], 1) == to_rgba(expected, 1)


def test_exposure_bars_legend_sits_beside_the_bars():
    fig = _no_kind_figures()["exposure_bars"]()
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1                  # right of the axes: it covers no bar
    assert {"original", "reference"} <= {t.get_text() for t in ax.get_legend().get_texts()}

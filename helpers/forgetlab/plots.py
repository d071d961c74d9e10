"""Figures of the suite: one function per figure, each titled, labelled and with units.

Every function that shows kinds takes an optional ``labels`` mapping (kind -> display label) that overrides
:data:`KIND_LABELS` for that figure only, so no caller rewrites the module's globals. Kinds without a colour of
their own (a user's custom kind) take one from :data:`EXTRA_KIND_COLORS` in a stable order. Legends sit outside
the axes, where they cannot cover data.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "ipympl", "widget", "qt", "tk", "macosx")):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

KIND_LABELS = {"id": "ID (Shakespeare)", "canary": "OOD: canaries", "language": "OOD: other language",
               "code": "OOD: Python code"}
KIND_COLORS = {"id": "#1f77b4", "canary": "#d62728", "language": "#2ca02c", "code": "#9467bd"}
EXTRA_KIND_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")   # none of KIND_COLORS
METHOD_LABELS = {"ga": "gradient ascent", "graddiff": "gradient difference", "npo": "NPO"}
METHOD_STYLES = {"ga": "-", "graddiff": "--", "npo": ":"}
MEM_AXIS_LABELS = {"memorization": "memorization (nats / token)", "difficulty": "difficulty (loss, nats / token)",
                   "steps_to_unlearn": "steps to unlearn (GenEx < target)",
                   "ppl_increase_at_target": "held-out perplexity increase at target"}


def setup_style() -> None:
    sns.set_theme(context="notebook", style="whitegrid")
    plt.rcParams.update({"figure.dpi": 90, "axes.titleweight": "bold", "legend.frameon": True})


def kind_label(kind: str, labels: Mapping[str, str] | None = None) -> str:
    """Display label of a kind: from `labels` if it has one, else :data:`KIND_LABELS`, else the kind itself."""
    if labels is not None and kind in labels:
        return labels[kind]
    return KIND_LABELS.get(kind, kind)


def kind_order(kinds: Iterable[str], labels: Mapping[str, str] | None = None) -> list[str]:
    """The kinds present, in display order: known kinds first (KIND_LABELS order), then `labels` order, then as seen."""
    present = list(dict.fromkeys(kinds))
    rank = list(dict.fromkeys([*KIND_LABELS, *(labels or {})]))
    return [k for k in rank if k in present] + [k for k in present if k not in rank]


def kind_colors(kinds: Iterable[str], labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """Colour of each kind: :data:`KIND_COLORS`, or for another kind the next of :data:`EXTRA_KIND_COLORS`.

    Unknown kinds are coloured in a stable order (their order in `labels`, then by name), not in the order the
    rows happen to come, so the same kinds with the same `labels` get the same colours in every figure.
    """
    kinds = list(dict.fromkeys(kinds))
    pos = {k: i for i, k in enumerate(labels or {})}
    unknown = sorted((k for k in kinds if k not in KIND_COLORS), key=lambda k: (pos.get(k, len(pos)), str(k)))
    colors = {k: KIND_COLORS[k] for k in kinds if k in KIND_COLORS}
    colors.update({k: EXTRA_KIND_COLORS[i % len(EXTRA_KIND_COLORS)] for i, k in enumerate(unknown)})
    return colors


def _legend_outside(ax: plt.Axes, **kw) -> None:
    """A legend to the right of the axes (never over the data); tight_layout and savefig make room for it."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **{"fontsize": 8, **kw})


def example_lengths(examples: pd.DataFrame, *, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Characters per example and examples per role, by kind: same tokens, different text."""
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.8))
    kinds = kind_order(examples.kind, labels)
    names = {k: kind_label(k, labels) for k in kinds}
    colors = kind_colors(kinds, labels)
    df = examples.assign(chars=examples.text.str.len(), kind_label=examples.kind.map(names))
    order = [names[k] for k in kinds]
    sns.boxplot(data=df, x="chars", y="kind_label", hue="kind_label", order=order, hue_order=order,
                palette={names[k]: colors[k] for k in kinds}, legend=False, ax=axes[0])
    axes[0].set(title="Text length of examples", xlabel="characters per example", ylabel="kind")
    sns.countplot(data=df, y="kind_label", hue="role", order=order, ax=axes[1])
    axes[1].set(title="Examples by kind and role", xlabel="examples (count)", ylabel="kind")
    _legend_outside(axes[1], title="role")
    fig.suptitle("Forget sets are matched in tokens; their text length shows how the tokenizer sees each kind",
                 fontsize=10)
    fig.tight_layout()
    return fig


def document_token_density(sources: pd.DataFrame) -> plt.Figure:
    """Tokens per character of each source document: OOD text splits into many more tokens."""
    df = sources.assign(tokens_per_char=sources.tokens / sources.chars.clip(lower=1))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.stripplot(data=df, x="tokens_per_char", y="source", hue="source", ax=ax, size=5, legend=False)
    ax.set(title="How well the Shakespeare tokenizer compresses each source",
           xlabel="tokens per character (lower = more familiar)", ylabel="source")
    fig.tight_layout()
    return fig


def loss_curves(curves: pd.DataFrame, smooth: int = 25, heldout: str = "whole held-out plays") -> plt.Figure:
    """Train (smoothed) and held-out loss per model; `curves` has model, step, split, loss; `heldout` names the
    held-out text in the right panel's title."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for name, df in curves.groupby("model", sort=False):
        train = df[df.split == "train"]
        axes[0].plot(train.step, train.loss.rolling(smooth, min_periods=1).mean(), label=name)
        held = df[df.split == "held-out"]
        axes[1].plot(held.step, held.loss, marker="o", label=name)
    axes[0].set(title=f"Training loss (rolling mean of {smooth} steps)", xlabel="optimizer step",
                ylabel="cross-entropy (nats / token)")
    axes[1].set(title=f"Held-out loss ({heldout})", xlabel="optimizer step")
    _legend_outside(axes[1], title="model")
    fig.tight_layout()
    return fig


def exposure_bars(table: pd.DataFrame, max_bits: float) -> plt.Figure:
    """Exposure of each forget canary in each model; `table` has uid, model, exposure_bits."""
    fig, ax = plt.subplots(figsize=(9.5, 3.6))
    sns.barplot(data=table, x="uid", y="exposure_bits", hue="model", ax=ax)
    ax.axhline(max_bits, color="k", ls="--", lw=1, label=f"maximum log2|R| = {max_bits:.1f}")
    ax.axhline(1.0, color="grey", ls=":", lw=1, label="chance level (about 1 bit)")
    ax.set(title="Canary exposure: original model (saw the canaries) vs reference models (did not)",
           xlabel="forget canary", ylabel="exposure (bits)")
    ax.tick_params(axis="x", rotation=45)
    _legend_outside(ax, title="model")              # beside the bars: inside, it covered the tallest ones
    fig.tight_layout()
    return fig


def per_token_loss_by_role(table: pd.DataFrame, *, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Per-token loss of forget vs never-trained examples, by kind and model role.

    The kind labels come from `labels` (or :data:`KIND_LABELS`); a table without ``kind`` may bring its own
    ``kind_label`` column.
    """
    if "kind" in table.columns and (labels is not None or "kind_label" not in table.columns):
        table = table.assign(kind_label=table.kind.map(lambda k: kind_label(k, labels)))
    if "kind" in table.columns:
        first_label = table.groupby("kind", sort=False).kind_label.first()
        order = list(dict.fromkeys(first_label[k] for k in kind_order(table.kind, labels)))
    else:
        order = list(dict.fromkeys(table.kind_label))
    g = sns.catplot(data=table, x="kind_label", y="loss", hue="role", col="model_role", kind="box", order=order,
                    height=3.6, aspect=1.4, sharey=True)
    g.set_axis_labels("kind", "loss (nats / token)")
    g.set_titles("{col_name} model")
    g.figure.suptitle("Forget examples vs never-trained examples of the same kind", y=1.04, fontweight="bold")
    for ax in g.axes.flat:
        ax.tick_params(axis="x", rotation=15)
    return g.figure


def annotate_corr(ax: plt.Axes, rho: float, lo: float, hi: float, label: str = "Spearman ρ") -> None:
    """Write a rank correlation and its confidence interval in the panel's corner."""
    text = f"{label} = {rho:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(rho) else f"{label}: n/a"
    ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", fontsize=8,
            bbox=dict(boxstyle="round", fc="white", alpha=0.8))


def unlearning_curves(genex: pd.DataFrame, relex: pd.DataFrame, util: pd.DataFrame, target_bits: float,
                      control: pd.DataFrame | None = None, *, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Per step: mean forget-set GenEx, RelEx and held-out perplexity; one column per method, one line per kind."""
    methods = list(dict.fromkeys(genex.method))
    fig, axes = plt.subplots(3, len(methods), figsize=(4.6 * len(methods), 9), sharex="col", squeeze=False)
    ppl = util[util.metric == "heldout_ppl"]
    kinds = kind_order(genex.kind, labels)
    colors = kind_colors(kinds, labels)
    for j, method in enumerate(methods):
        for kind in kinds:
            style = dict(color=colors[kind], label=kind_label(kind, labels))
            g = genex[(genex.method == method) & (genex.kind == kind)]
            axes[0, j].plot(g.step, g.value, **style)
            if control is not None:
                c = control[(control.method == method) & (control.kind == kind)]
                axes[0, j].plot(c.step, c.value, color=colors[kind], ls=":", lw=1)
            r = relex[(relex.method == method) & (relex.kind == kind)]
            axes[1, j].plot(r.step, r.value, **style)
            u = ppl[(ppl.method == method) & (ppl.kind == kind)]
            axes[2, j].plot(u.step, u.value, **style)
        axes[0, j].axhline(target_bits, color="k", ls="--", lw=1)
        axes[0, j].axhline(0, color="grey", lw=0.8)
        axes[0, j].set_title(METHOD_LABELS.get(method, method))
        axes[2, j].set_xlabel("unlearning step")
    axes[0, 0].set_ylabel("GenEx of forget set (bits)")
    axes[1, 0].set_ylabel("RelEx of forget set (bits)")
    axes[2, 0].set_ylabel("held-out perplexity")
    handles, names = axes[0, 0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], color="k", ls="--", lw=1), plt.Line2D([], [], color="grey", ls=":", lw=1)]
    names += [f"target ({target_bits:g} bit)", "non-member controls (noise floor)"]
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle("Unlearning step by step: quality (GenEx, RelEx; 0 = as if never seen) above, utility below")
    fig.tight_layout()
    return fig


def exposure_curves(exposure: pd.DataFrame, max_bits: float) -> plt.Figure:
    """Canary exposure (skew-normal estimate) per step, one line per method."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for method, g in exposure.groupby("method", sort=False):
        ax.plot(g.step, g.value, ls=METHOD_STYLES.get(method, "-"), color=KIND_COLORS["canary"],
                label=METHOD_LABELS.get(method, method))
    ax.axhline(max_bits, color="k", ls="--", lw=1, label=f"log2|R| = {max_bits:.1f}")
    ax.set(title="Canary exposure during unlearning (mean over forget canaries)", xlabel="unlearning step",
           ylabel="exposure (bits)")
    _legend_outside(ax, title="method")
    fig.tight_layout()
    return fig


def tradeoff_curves(genex: pd.DataFrame, util: pd.DataFrame, target_bits: float, *,
                    labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Quality against performance: GenEx of the forget set vs held-out perplexity, walked step by step."""
    ppl = util[util.metric == "heldout_ppl"].rename(columns={"value": "ppl"})
    df = genex.merge(ppl[["method", "kind", "step", "ppl"]], on=["method", "kind", "step"])
    colors = kind_colors(kind_order(df.kind, labels), labels)
    fig, ax = plt.subplots(figsize=(9.5, 5))
    for (method, kind), g in df.groupby(["method", "kind"], sort=False):
        ax.plot(g.ppl, g.value, ls=METHOD_STYLES.get(method, "-"), color=colors[kind], marker=".", ms=3,
                label=f"{kind_label(kind, labels)} · {METHOD_LABELS.get(method, method)}")
        ax.plot(g.ppl.iloc[0], g.value.iloc[0], "o", color=colors[kind], ms=6)
    ax.axhline(target_bits, color="k", ls="--", lw=1, label=f"target {target_bits:g} bit")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Quality vs performance (start of each curve: ●)", xlabel="held-out perplexity (lower is better)",
           ylabel="GenEx of forget set (bits; lower = more forgotten)")
    _legend_outside(ax, fontsize=7)
    fig.tight_layout()
    return fig


def cost_at_target(summary: pd.DataFrame, *, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Steps to unlearn and perplexity increase at that point, per kind and method."""
    df = summary.assign(kind_label=summary.kind.map(lambda k: kind_label(k, labels)),
                        method_label=summary.method.map(lambda m: METHOD_LABELS.get(m, m)))
    order = [kind_label(k, labels) for k in kind_order(summary.kind, labels)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    sns.barplot(data=df, x="kind_label", y="steps_to_target", hue="method_label", order=order, ax=axes[0])
    axes[0].set(title="Steps until forget-set GenEx < target", xlabel="kind of forget set", ylabel="unlearning steps")
    sns.barplot(data=df, x="kind_label", y="ppl_increase_at_target", hue="method_label", order=order, ax=axes[1])
    axes[1].set(title="Utility cost at that step", xlabel="kind of forget set",
                ylabel="held-out perplexity increase")
    for ax in axes:
        ax.tick_params(axis="x", rotation=15)
    if axes[0].get_legend() is not None:           # one legend for both panels, beside them
        axes[0].get_legend().remove()
    _legend_outside(axes[1], title="method")
    fig.text(0.5, -0.03, "missing bar: the target was not reached within the step budget", ha="center", fontsize=8)
    fig.tight_layout()
    return fig


def relex_vs_genex(both: pd.DataFrame, rho: float, *, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """RelEx (reference-free) against GenEx (needs reference models), every example and step."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    kinds = kind_order(both.kind, labels)
    colors = kind_colors(kinds, labels)
    for kind in kinds:
        g = both[both.kind == kind]
        ax.scatter(g.genex, g.relex, s=6, alpha=0.4, color=colors[kind], label=kind_label(kind, labels))
    ax.set(title=f"Does RelEx track GenEx? (Spearman ρ = {rho:.2f})", xlabel="GenEx (bits)", ylabel="RelEx (bits)")
    _legend_outside(ax, markerscale=3, title="kind")
    fig.tight_layout()
    return fig


def membership_curves(util: pd.DataFrame, *, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """AUC of a loss-threshold attacker telling forget examples from never-trained peers, per step."""
    auc = util[util.metric == "membership_auc"]
    colors = kind_colors(kind_order(auc.kind, labels), labels)
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    for (method, kind), g in auc.groupby(["method", "kind"], sort=False):
        ax.plot(g.step, g.value, color=colors[kind], ls=METHOD_STYLES.get(method, "-"),
                label=f"{kind_label(kind, labels)} · {METHOD_LABELS.get(method, method)}")
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance (0.5)")
    ax.set(title="Could an attacker still tell the forget set apart?", xlabel="unlearning step",
           ylabel="membership AUC (loss attack)", ylim=(0, 1.02))
    _legend_outside(ax, fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ memorization (notebook 05)

def _corr_row(corr: pd.DataFrame, x: str, y: str) -> pd.Series:
    """The correlation of x with y over all examples, from a ``mem_scores.correlation_table``."""
    return corr[(corr.kind == "all") & (corr.x == x) & (corr.y == y)].iloc[0]


def _annotate_with_headroom(ax: plt.Axes, c: pd.Series) -> None:
    """ρ [95% CI] in the corner, with headroom above the points so the box hides none of them."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.22 * (hi - lo))
    annotate_corr(ax, c.spearman, c.ci_low, c.ci_high, label=f"Spearman ρ (n={int(c.n)})")


def _bootstrap_note(fig: plt.Figure, resamples: int, y: float = -0.01) -> None:
    fig.text(0.5, y, f"[ ]: 95% percentile bootstrap interval of ρ over {resamples} resamples of the examples",
             ha="center", fontsize=8)


def plot_memorization_vs_difficulty(table: pd.DataFrame, corr: pd.DataFrame, resamples: int, *,
                                    labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Scatter of memorization against difficulty per pool example, coloured by kind, with standard errors."""
    fig, ax = plt.subplots(figsize=(9, 5))
    kinds = kind_order(table.kind, labels)
    colors = kind_colors(kinds, labels)
    for kind in kinds:
        g = table[table.kind == kind]
        ax.errorbar(g.difficulty, g.memorization, xerr=g.difficulty_se, yerr=g.memorization_se, fmt="o", ms=5,
                    alpha=0.8, elinewidth=0.7, color=colors[kind], label=kind_label(kind, labels))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Counterfactual memorization vs difficulty (bars: ±1 standard error)",
           xlabel=MEM_AXIS_LABELS["difficulty"] + ", models that did not see x",
           ylabel=MEM_AXIS_LABELS["memorization"] + ", seen - unseen")
    _annotate_with_headroom(ax, _corr_row(corr, "memorization", "difficulty"))
    _legend_outside(ax, title="kind")
    fig.tight_layout()
    _bootstrap_note(fig, resamples, y=-0.02)
    return fig


def plot_unlearning_cost(table: pd.DataFrame, corr: pd.DataFrame, resamples: int, max_steps: int,
                         target_bits: float, *, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Steps to unlearn (top) and utility lost by then (bottom) against memorization and difficulty."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
    kinds = kind_order(table.kind, labels)
    colors = kind_colors(kinds, labels)
    for col, x in enumerate(("memorization", "difficulty")):
        for kind in kinds:
            g = table[table.kind == kind]
            hit, miss = g[g.reached.astype(bool)], g[~g.reached.astype(bool)]
            axes[0, col].scatter(hit[x], hit.steps_to_unlearn, s=22, color=colors[kind], alpha=0.8,
                                 label=kind_label(kind, labels))
            axes[0, col].scatter(miss[x], miss.steps_censored, s=26, facecolors="none", edgecolors=colors[kind],
                                 alpha=0.8)
            axes[1, col].scatter(hit[x], hit.ppl_increase_at_target, s=22, color=colors[kind], alpha=0.8)
        axes[0, col].axhline(max_steps, color="k", ls="--", lw=0.8)
        axes[0, col].set(ylabel=MEM_AXIS_LABELS["steps_to_unlearn"] if col == 0 else "",
                         ylim=(-0.5, max_steps + 1.5), title=f"Steps to unlearn vs {x}")
        axes[1, col].set(xlabel=MEM_AXIS_LABELS[x], ylabel="held-out perplexity increase" if col == 0 else "",
                         title=f"Utility lost by then vs {x}")
        _annotate_with_headroom(axes[0, col], _corr_row(corr, x, "steps_to_unlearn"))
        _annotate_with_headroom(axes[1, col], _corr_row(corr, x, "ppl_increase_at_target"))
    handles, names = axes[0, 0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], marker="o", ls="", mfc="none", mec="k"),
                plt.Line2D([], [], color="k", ls="--", lw=0.8)]
    names += [f"not unlearned within {max_steps} steps (drawn at {max_steps + 1})", "step budget"]
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.07))
    fig.suptitle(f"Which examples are hard to unlearn? Gradient ascent until GenEx < {target_bits:g} bit")
    fig.tight_layout()
    _bootstrap_note(fig, resamples, y=-0.09)
    return fig


# --------------------------------------------------------------- memorization endpoints (notebook 05, issue 14)

MEM_ENDPOINT_LABELS = {"memorization": "memorization, set A (nats/token)",
                       "difficulty": "difficulty, set B (nats/token)",
                       "steps_to_50pct": "steps to remove 50% of initial GenEx",
                       "fraction_removed_per_step": "share of initial GenEx removed per step",
                       "steps_to_target": "raw steps to GenEx < target"}
_MEM_ENDPOINT_SHORT = {"steps_to_50pct": "steps to remove 50%", "fraction_removed_per_step": "share removed per step",
                       "steps_to_target": "raw steps to target"}


def plot_memorization_endpoint_correlations(table: pd.DataFrame, corr: pd.DataFrame, max_steps: int, *,
                                            endpoint: str = "steps_to_50pct",
                                            labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Top: memorization vs difficulty, and `endpoint` vs each, per pool example (open circles: never reached
    within the budget, drawn at max_steps + 1). Bottom: every Spearman ρ of a ``mem_stats.correlation_table``
    with its 95% interval over groups and models, pooled (black) and within each kind."""
    fig = plt.figure(figsize=(14, 10), layout="constrained")
    upper, lower = fig.subfigures(2, 1, height_ratios=[1, 1.15])
    top = list(upper.subplots(1, 3))
    forest = lower.subplots()
    main = corr[corr.bootstrap == "groups and models"] if "bootstrap" in corr else corr
    kinds = kind_order(table.kind, labels)
    colors = kind_colors(kinds, labels)
    censorable = endpoint.startswith("steps_")
    panels = [("difficulty", "memorization"), ("memorization", endpoint), ("difficulty", endpoint)]
    for ax, (x, y) in zip(top, panels):
        for kind in kinds:
            g = table[table.kind == kind]
            miss = g[y] > max_steps if censorable and y == endpoint else np.zeros(len(g), dtype=bool)
            ax.scatter(g[x][~miss], g[y][~miss], s=22, alpha=0.8, color=colors[kind], label=kind_label(kind, labels))
            ax.scatter(g[x][miss], g[y][miss], s=26, facecolors="none", edgecolors=colors[kind], alpha=0.8)
        if censorable and y == endpoint:
            ax.axhline(max_steps, color="k", ls="--", lw=0.8)
        c = main[(main.kind == "all") & (((main.x == x) & (main.y == y)) | ((main.x == y) & (main.y == x)))]
        ax.set(xlabel=MEM_ENDPOINT_LABELS[x], ylabel=MEM_ENDPOINT_LABELS[y],
               title=f"{_MEM_ENDPOINT_SHORT.get(y, y)} vs {x}")
        ax.title.set_fontsize(10)
        if len(c):
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + 0.25 * (hi - lo))
            r = c.iloc[0]
            annotate_corr(ax, r.spearman, r.ci_low, r.ci_high, label=f"pooled ρ (n={int(r.n)})")
    scopes = ["all"] + [k for k in kinds if k in set(main.kind)]
    pairs = list(dict.fromkeys(zip(main.x, main.y)))
    step = 0.8 / max(1, len(scopes))
    for j, scope in enumerate(scopes):
        rows = main[main.kind == scope].set_index(["x", "y"]).reindex(pairs)
        ypos = np.arange(len(pairs)) + step * (j - (len(scopes) - 1) / 2)
        err = np.vstack([rows.spearman - rows.ci_low, rows.ci_high - rows.spearman]).clip(min=0)
        forest.errorbar(rows.spearman, ypos, xerr=np.nan_to_num(err), fmt="o", ms=5, capsize=2,
                        color="k" if scope == "all" else colors[scope],
                        label="all kinds pooled" if scope == "all" else f"within {kind_label(scope, labels)}")
    forest.axvline(0, color="grey", lw=0.8)
    forest.grid(False, axis="y")
    for k in range(len(pairs) - 1):                      # bands: one per pair, its scopes inside
        forest.axhline(k + 0.5, color="0.85", lw=0.8)
    forest.set_yticks(np.arange(len(pairs)),
                      [f"{MEM_ENDPOINT_LABELS[y].split(',')[0]} ~ {x}" if y != "difficulty"
                       else "memorization ~ difficulty" for x, y in pairs], fontsize=8)
    forest.invert_yaxis()
    forest.set(xlim=(-1.05, 1.05), xlabel="Spearman ρ, with its 95% interval over unlearning groups and model pairs",
               ylabel="endpoint (or score) ~ score",
               title="Rank correlations, pooled and within each kind (n/a: too few examples in a kind)")
    _legend_outside(forest, title="scope")
    _legend_outside(top[2], title="kind")
    fig.suptitle(f"Memorization, difficulty and unlearning speed (primary endpoint: "
                 f"{MEM_ENDPOINT_LABELS[endpoint]}; open circles: not reached in {max_steps} steps)")
    return fig

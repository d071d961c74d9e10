"""Figures of the suite: one function per figure, each titled, labelled and with units."""
from __future__ import annotations

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
METHOD_LABELS = {"ga": "gradient ascent", "graddiff": "gradient difference", "npo": "NPO"}
METHOD_STYLES = {"ga": "-", "graddiff": "--", "npo": ":"}


def setup_style() -> None:
    sns.set_theme(context="notebook", style="whitegrid")
    plt.rcParams.update({"figure.dpi": 90, "axes.titleweight": "bold", "legend.frameon": True})


def kind_label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind)


def example_lengths(examples: pd.DataFrame) -> plt.Figure:
    """Characters per example and scored tokens per example, by kind: same tokens, different text."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    df = examples.assign(chars=examples.text.str.len(), kind_label=examples.kind.map(kind_label))
    order = [kind_label(k) for k in KIND_LABELS if k in set(examples.kind)]
    palette = {kind_label(k): c for k, c in KIND_COLORS.items()}
    sns.boxplot(data=df, x="chars", y="kind_label", hue="kind_label", order=order, palette=palette, ax=axes[0])
    axes[0].set(title="Text length of examples", xlabel="characters per example", ylabel="")
    sns.countplot(data=df, y="kind_label", hue="role", order=order, ax=axes[1])
    axes[1].set(title="Examples by kind and role", xlabel="examples (count)", ylabel="")
    axes[1].legend(title="role", fontsize=8)
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


def loss_curves(curves: pd.DataFrame, smooth: int = 25) -> plt.Figure:
    """Train (smoothed) and held-out loss per model; `curves` has model, step, split, loss."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for name, df in curves.groupby("model", sort=False):
        train = df[df.split == "train"]
        axes[0].plot(train.step, train.loss.rolling(smooth, min_periods=1).mean(), label=name)
        held = df[df.split == "held-out"]
        axes[1].plot(held.step, held.loss, marker="o", label=name)
    axes[0].set(title=f"Training loss (rolling mean of {smooth} steps)", xlabel="optimizer step",
                ylabel="cross-entropy (nats / token)")
    axes[1].set(title="Held-out loss (whole held-out plays)", xlabel="optimizer step")
    axes[1].legend(title="model", fontsize=8)
    fig.tight_layout()
    return fig


def exposure_bars(table: pd.DataFrame, max_bits: float) -> plt.Figure:
    """Exposure of each forget canary in each model; `table` has uid, model, exposure_bits."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    sns.barplot(data=table, x="uid", y="exposure_bits", hue="model", ax=ax)
    ax.axhline(max_bits, color="k", ls="--", lw=1, label=f"maximum log2|R| = {max_bits:.1f}")
    ax.axhline(1.0, color="grey", ls=":", lw=1, label="chance level (about 1 bit)")
    ax.set(title="Canary exposure: original model (saw the canaries) vs reference models (did not)",
           xlabel="forget canary", ylabel="exposure (bits)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def per_token_loss_by_role(table: pd.DataFrame) -> plt.Figure:
    """Per-token loss of forget vs never-trained examples, by kind and model role."""
    g = sns.catplot(data=table, x="kind_label", y="loss", hue="role", col="model_role", kind="box",
                    height=3.6, aspect=1.4, sharey=True)
    g.set_axis_labels("", "loss (nats / token)")
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


def _kinds_in(df: pd.DataFrame) -> list[str]:
    return [k for k in KIND_LABELS if k in set(df.kind)]


def unlearning_curves(genex: pd.DataFrame, relex: pd.DataFrame, util: pd.DataFrame, target_bits: float,
                      control: pd.DataFrame | None = None) -> plt.Figure:
    """Per step: mean forget-set GenEx, RelEx and held-out perplexity; one column per method, one line per kind."""
    methods = list(dict.fromkeys(genex.method))
    fig, axes = plt.subplots(3, len(methods), figsize=(4.6 * len(methods), 9), sharex="col", squeeze=False)
    ppl = util[util.metric == "heldout_ppl"]
    for j, method in enumerate(methods):
        for kind in _kinds_in(genex):
            style = dict(color=KIND_COLORS[kind], label=kind_label(kind))
            g = genex[(genex.method == method) & (genex.kind == kind)]
            axes[0, j].plot(g.step, g.value, **style)
            if control is not None:
                c = control[(control.method == method) & (control.kind == kind)]
                axes[0, j].plot(c.step, c.value, color=KIND_COLORS[kind], ls=":", lw=1)
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
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], color="k", ls="--", lw=1), plt.Line2D([], [], color="grey", ls=":", lw=1)]
    labels += [f"target ({target_bits:g} bit)", "non-member controls (noise floor)"]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.04))
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tradeoff_curves(genex: pd.DataFrame, util: pd.DataFrame, target_bits: float) -> plt.Figure:
    """Quality against performance: GenEx of the forget set vs held-out perplexity, walked step by step."""
    ppl = util[util.metric == "heldout_ppl"].rename(columns={"value": "ppl"})
    df = genex.merge(ppl[["method", "kind", "step", "ppl"]], on=["method", "kind", "step"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for (method, kind), g in df.groupby(["method", "kind"], sort=False):
        ax.plot(g.ppl, g.value, ls=METHOD_STYLES.get(method, "-"), color=KIND_COLORS[kind], marker=".", ms=3,
                label=f"{kind_label(kind)} · {METHOD_LABELS.get(method, method)}")
        ax.plot(g.ppl.iloc[0], g.value.iloc[0], "o", color=KIND_COLORS[kind], ms=6)
    ax.axhline(target_bits, color="k", ls="--", lw=1, label=f"target {target_bits:g} bit")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Quality vs performance (start of each curve: ●)", xlabel="held-out perplexity (lower is better)",
           ylabel="GenEx of forget set (bits; lower = more forgotten)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def cost_at_target(summary: pd.DataFrame) -> plt.Figure:
    """Steps to unlearn and perplexity increase at that point, per kind and method."""
    df = summary.assign(kind_label=summary.kind.map(kind_label), method_label=summary.method.map(METHOD_LABELS))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.barplot(data=df, x="kind_label", y="steps_to_target", hue="method_label", ax=axes[0])
    axes[0].set(title="Steps until forget-set GenEx < target", xlabel="", ylabel="unlearning steps")
    sns.barplot(data=df, x="kind_label", y="ppl_increase_at_target", hue="method_label", ax=axes[1])
    axes[1].set(title="Utility cost at that step", xlabel="", ylabel="held-out perplexity increase")
    for ax in axes:
        ax.tick_params(axis="x", rotation=15)
        ax.legend(fontsize=8, title="")
    fig.text(0.5, -0.03, "missing bar: the target was not reached within the step budget", ha="center", fontsize=8)
    fig.tight_layout()
    return fig


def relex_vs_genex(both: pd.DataFrame, rho: float) -> plt.Figure:
    """RelEx (reference-free) against GenEx (needs reference models), every example and step."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kind in _kinds_in(both):
        g = both[both.kind == kind]
        ax.scatter(g.genex, g.relex, s=6, alpha=0.4, color=KIND_COLORS[kind], label=kind_label(kind))
    ax.set(title=f"Does RelEx track GenEx? (Spearman ρ = {rho:.2f})", xlabel="GenEx (bits)", ylabel="RelEx (bits)")
    ax.legend(fontsize=8, markerscale=3)
    fig.tight_layout()
    return fig


def membership_curves(util: pd.DataFrame) -> plt.Figure:
    """AUC of a loss-threshold attacker telling forget examples from never-trained peers, per step."""
    auc = util[util.metric == "membership_auc"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for (method, kind), g in auc.groupby(["method", "kind"], sort=False):
        ax.plot(g.step, g.value, color=KIND_COLORS[kind], ls=METHOD_STYLES.get(method, "-"),
                label=f"{kind_label(kind)} · {METHOD_LABELS.get(method, method)}")
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance (0.5)")
    ax.set(title="Could an attacker still tell the forget set apart?", xlabel="unlearning step",
           ylabel="membership AUC (loss attack)", ylim=(0, 1.02))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig

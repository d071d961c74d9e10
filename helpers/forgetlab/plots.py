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

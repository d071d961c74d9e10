"""The two sanity checks of the study design, computed from the models before any unlearning.

1. **Controls' GenEx ≈ 0.** Controls are drawn like the forget set but never trained on by any model. Before
   unlearning, their GenEx (each original seed against the reference ensemble) must be within noise of 0 for
   every kind: the 95% interval of its mean (bootstrap over original seeds, then controls) contains 0. If not,
   GenEx measures something besides the example (the kind, or the amount of training).
2. **Reference membership AUC ≈ 0.5.** Under the reference models (which never saw the forget set), a
   loss-threshold attacker must not tell the forget set from its never-trained population: the AUC of
   per-token ll, forget against population, averaged over reference models, has a 95% interval (bootstrap over
   examples of both groups) that contains 0.5. If not, the population is not drawn like the forget set.

Both read one tidy table of scores (:func:`start_scores`): kind, uid, role, model_role, seed, ll, n_scored.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import metrics
from .intervals import LEVEL, Interval, hierarchical_bootstrap, percentile_interval

SCORE_COLUMNS = ["kind", "uid", "role", "model_role", "seed", "ll", "n_scored"]


def start_scores(backend, kinds=None) -> pd.DataFrame:
    """ll of every forget, control and population example of each kind under every original model (before
    unlearning) and every reference model: one row per example x model (columns :data:`SCORE_COLUMNS`)."""
    kinds = list(kinds or backend.kinds)
    views = [backend.view(k) for k in kinds]
    ex = pd.concat([pd.concat([v.targets, v.population], ignore_index=True) for v in views], ignore_index=True)
    base = ex[["kind", "uid", "role", "n_scored"]]
    frames = []
    ref = backend.reference_logprobs(ex)
    for i, row in enumerate(np.atleast_2d(ref)):
        frames.append(base.assign(model_role="reference", seed=i, ll=row))
    for seed in backend.original_seeds:
        model = backend.original(seed)
        try:
            frames.append(base.assign(model_role="original", seed=seed, ll=backend.example_logprobs(model, ex)))
        finally:
            backend.release(model)
    return pd.concat(frames, ignore_index=True)[SCORE_COLUMNS]


def control_genex(scores: pd.DataFrame) -> pd.DataFrame:
    """GenEx (bits) of every control under each original seed against all reference models: kind, seed, uid,
    value."""
    ctl = scores[scores.role == "control"]
    rows = []
    for kind, g in ctl.groupby("kind", sort=False):
        ref = g[g.model_role == "reference"].pivot_table(index="seed", columns="uid", values="ll")
        orig = g[g.model_role == "original"].pivot_table(index="seed", columns="uid", values="ll")
        if ref.empty or orig.empty:
            raise ValueError(f"kind {kind!r}: controls need scores under original and reference models")
        orig = orig.reindex(columns=ref.columns)
        for seed, ll in orig.iterrows():
            bits = metrics.genex_bits(ll.to_numpy(), ref.to_numpy())
            rows += [{"kind": kind, "seed": seed, "uid": u, "value": float(b)} for u, b in zip(ref.columns, bits)]
    return pd.DataFrame(rows, columns=["kind", "seed", "uid", "value"])


def control_offsets(scores: pd.DataFrame) -> pd.DataFrame:
    """Per kind and original seed: the controls' mean GenEx before unlearning (``mean_bits``) and their number.

    This is the seed-level offset that the study's endpoints remove (:func:`forgetlab.claims.calibrate`): how
    much better (> 0) or worse (< 0) that original models never-trained text of the kind than the reference
    ensemble does. Check 1 below stays on raw GenEx: it is the check that shows the offset."""
    from .claims import offsets_of
    return offsets_of(control_genex(scores)).rename(columns={"offset": "mean_bits"})


def controls_check(scores: pd.DataFrame, resamples: int = 1000, rng_seed: int = 0, level: float = LEVEL
                   ) -> pd.DataFrame:
    """Check 1 per kind: mean control GenEx (bits) with its interval over original seeds, then controls;
    ``passes`` when the interval contains 0. Also the largest |GenEx| of a single control."""
    g = control_genex(scores)
    rows = []
    for kind, k in g.groupby("kind", sort=False):
        iv = hierarchical_bootstrap(k, "value", resamples=resamples, rng_seed=rng_seed, level=level)
        rows.append({"kind": kind, "mean_bits": iv.estimate, "low": iv.low, "high": iv.high,
                     "max_abs_bits": float(k.value.abs().max()), "controls": k.uid.nunique(),
                     "original_seeds": iv.n_seeds, "passes": iv.contains(0.0)})
    return pd.DataFrame(rows)


def auc_interval(member: np.ndarray, nonmember: np.ndarray, resamples: int = 1000, rng_seed: int = 0,
                 level: float = LEVEL) -> Interval:
    """Mean over models of the membership AUC (members' score higher), with a bootstrap over examples.

    member [models, m] and nonmember [models, n] are per-token ll; each resample draws members and non-members
    with replacement (the same draw for every model) and averages the per-model AUC.
    """
    member, nonmember = np.atleast_2d(member), np.atleast_2d(nonmember)
    if member.shape[1] == 0 or nonmember.shape[1] == 0:
        return Interval(math.nan, math.nan, math.nan, member.shape[0], 0, resamples, level)
    point = float(np.mean([metrics.membership_auc(a, b) for a, b in zip(member, nonmember)]))
    rng = np.random.default_rng(rng_seed)
    boot = np.empty(resamples)
    for r in range(resamples):
        i = rng.integers(0, member.shape[1], member.shape[1])
        j = rng.integers(0, nonmember.shape[1], nonmember.shape[1])
        boot[r] = np.mean([metrics.membership_auc(a[i], b[j]) for a, b in zip(member, nonmember)])
    return Interval(point, *percentile_interval(boot, level), member.shape[0],
                    member.shape[1] + nonmember.shape[1], resamples, level)


def reference_membership_check(scores: pd.DataFrame, resamples: int = 1000, rng_seed: int = 0,
                               level: float = LEVEL) -> pd.DataFrame:
    """Check 2 per kind: membership AUC of the forget set against its population under the reference models
    (per-token ll), with its interval; ``passes`` when the interval contains 0.5. The originals' AUC (the same
    attack on the models that did train on the forget set) is shown beside it for contrast."""
    rows = []
    for kind, g in scores.groupby("kind", sort=False):
        g = g.assign(score=g.ll / g.n_scored)
        out = {"kind": kind}
        for who in ("reference", "original"):
            m = g[g.model_role == who].pivot_table(index="seed", columns=["role", "uid"], values="score")
            if m.empty:
                continue
            iv = auc_interval(m["forget"].to_numpy(), m["population"].to_numpy(), resamples, rng_seed, level)
            out.update({f"{who}_auc": iv.estimate, f"{who}_low": iv.low, f"{who}_high": iv.high})
            if who == "reference":
                out.update({"forget": m["forget"].shape[1], "population": m["population"].shape[1],
                            "reference_models": m.shape[0], "passes": iv.contains(0.5)})
        rows.append(out)
    return pd.DataFrame(rows)


def sanity_markdown(controls: pd.DataFrame, membership: pd.DataFrame, labels=None) -> str:
    """Both checks in words, one line per kind, saying which pass."""
    name = (labels or {}).get
    lines = ["**Check 1: never-trained controls' GenEx before unlearning (should be ≈ 0 bits).**", ""]
    for r in controls.itertuples():
        lines.append(f"- {name(r.kind, r.kind)}: mean {r.mean_bits:.2f} bits, 95% interval [{r.low:.2f}, "
                     f"{r.high:.2f}] over {r.original_seeds} original seed(s) x {r.controls} controls "
                     f"(largest single |GenEx| {r.max_abs_bits:.2f}) → {'passes' if r.passes else 'FAILS'}")
    lines += ["", "**Check 2: membership AUC of the forget set against its population under the reference "
              "models (should be ≈ 0.5).**", ""]
    for r in membership.itertuples():
        lines.append(f"- {name(r.kind, r.kind)}: reference AUC {r.reference_auc:.2f} [{r.reference_low:.2f}, "
                     f"{r.reference_high:.2f}] ({r.forget} forget vs {r.population} population examples, "
                     f"{r.reference_models} reference models) → {'passes' if r.passes else 'FAILS'}; "
                     f"the originals, which trained on it: {r.original_auc:.2f}")
    return "\n".join(lines)

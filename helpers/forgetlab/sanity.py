"""The two sanity checks of the study design, computed from the models before any unlearning.

1. **Controls' GenEx ≈ 0.** Controls are drawn like the forget set but never trained on by any model. Before
   unlearning, their GenEx (each original seed against the reference ensemble) must be within noise of its null
   value for every kind: the 95% interval of its mean (bootstrap over original seeds, then controls) contains it.
   If not, GenEx measures something besides the example (the kind, or the amount of training). The null value is
   not exactly 0 (:func:`control_null`): GenEx sets one original against the log-mean-exp of several references,
   which lies above their mean, so even an original that is just one more reference scores below 0 on average
   (by a few tenths of a bit to a few bits: more where the references disagree more about an example).
   That bootstrap holds the reference ensemble fixed, and the forget set F and its twin set T are one random draw
   each, shared by every original and every reference, so the controls can share a *set-level* offset (they
   happen to resemble F or T more) that no interval over seeds and controls can contain. The interval is widened
   by both parts (:func:`set_draw_variance`): the reference seeds' noise, and, with set-draw models
   (:mod:`forgetlab.set_draws`: the base fine-tuned like an original on fresh draws of the sets), the set draw.
2. **Reference membership AUC ≈ 0.5.** Under the reference models (which never saw the forget set), a
   loss-threshold attacker must not tell the forget set from its never-trained population: the AUC of
   per-token ll, forget against population, averaged over reference models, has a 95% interval (bootstrap over
   examples of both groups) that contains 0.5. If not, the population is not drawn like the forget set.

Both read one tidy table of scores (:func:`start_scores`): kind, uid, role, model_role, seed, ll, n_scored; check 1
also reads the controls' rows under the set-draw models (model_role ``set_draw``, seed = the draw), when there are.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

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


def control_null(scores: pd.DataFrame) -> pd.DataFrame:
    """Per kind and control: the GenEx (bits) that a never-trained example has on average under an original that
    is only one more model like the references (``null_bits`` = (mean ll - log-mean-exp ll) over the reference
    models / ln 2, <= 0: zero only when they all agree). An original's control GenEx minus it is that original's
    ll minus the references' mean ll: the *excess*, 0 in expectation when membership plays no part."""
    ctl = scores[(scores.role == "control") & (scores.model_role == "reference")]
    rows = []
    for kind, g in ctl.groupby("kind", sort=False):
        ref = g.pivot_table(index="seed", columns="uid", values="ll")
        ll = ref.to_numpy()
        null = (ll.mean(axis=0) - metrics.log_mean_exp(ll, axis=0)) / metrics.LN2
        rows += [{"kind": kind, "uid": u, "null_bits": float(v)} for u, v in zip(ref.columns, null)]
    return pd.DataFrame(rows, columns=["kind", "uid", "null_bits"])


def control_offsets(scores: pd.DataFrame) -> pd.DataFrame:
    """Per kind and original seed: the controls' mean GenEx before unlearning (``mean_bits``) and their number.

    This is the seed-level offset that the study's endpoints remove (:func:`forgetlab.claims.calibrate`): how
    much better (> 0) or worse (< 0) that original models never-trained text of the kind than the reference
    ensemble does. Check 1 below stays on raw GenEx: it is the check that shows the offset."""
    from .claims import offsets_of
    return offsets_of(control_genex(scores)).rename(columns={"offset": "mean_bits"})


def set_draw_variance(scores: pd.DataFrame) -> pd.DataFrame:
    """Per kind: the two parts of the controls' mean GenEx's noise that a bootstrap over original seeds and
    controls leaves out (bits).

    Each training set is a group of models: F (the originals, one per seed), T (the references) and every set draw
    (model_role ``set_draw``, one model per draw). Per model, m = the mean ll of the kind's controls in bits; per
    group, M_G = the mean of m over its n_G models; sigma2_seed = the pooled within-group variance of m (groups
    with several seeds). The mean control GenEx is about M_F - M_T, so its variance is 2 sigma2_set (each of F and
    T is one draw of a set) + sigma2_seed (1/n_F + 1/n_T). The bootstrap over original seeds covers sigma2_seed/n_F;
    left out are the reference ensemble's seed noise, ``reference_sd_bits`` = sqrt(sigma2_seed / n_T), and, when
    there are set-draw models, the set draw: var(M_G) = sigma2_set + sigma2_seed / n_G, so with S2 the sample
    variance of the group means sigma2_set = max(0, S2 - sigma2_seed * mean(1/n_G)) (unweighted method of moments)
    and ``set_sd_bits`` = sqrt(2 sigma2_set) (NaN without set-draw models). ``noise_sd_bits`` combines the two.
    GenEx's reference side is a log-mean-exp over reference models, not a mean; a set offset shifts both alike, so
    the mean ll is its scale.
    """
    ctl = scores[(scores.role == "control") & scores.model_role.isin(["original", "reference", "set_draw"])]
    rows = []
    for kind, g in ctl.groupby("kind", sort=False):
        m = g.pivot_table(index=["model_role", "seed"], columns="uid", values="ll").dropna(axis=1)
        per_model = m.mean(axis=1) / metrics.LN2
        group = [f"draw {s}" if r == "set_draw" else r for r, s in per_model.index]
        by = per_model.groupby(group, sort=False)
        means, n = by.mean(), by.size()
        within = by.apply(lambda v: float(((v - v.mean()) ** 2).sum()))
        dof = int((n - 1).sum())
        seed_var = float(within.sum() / dof) if dof > 0 else 0.0
        n_ref = int(n.get("reference", 0))
        reference_var = seed_var / n_ref if n_ref else 0.0
        if (g.model_role == "set_draw").any():
            between = float(means.var(ddof=1))
            set_var = max(0.0, between - seed_var * float((1.0 / n).mean()))
        else:
            between = set_var = math.nan
        rows.append({"kind": kind, "set_groups": len(means) if not math.isnan(set_var) else 0,
                     "between_var": between, "seed_var": seed_var, "set_var": set_var,
                     "reference_models": n_ref, "set_sd_bits": math.sqrt(2.0 * set_var),
                     "reference_sd_bits": math.sqrt(reference_var),
                     "noise_sd_bits": math.sqrt(reference_var + (0.0 if math.isnan(set_var) else 2.0 * set_var))})
    return pd.DataFrame(rows, columns=["kind", "set_groups", "between_var", "seed_var", "set_var", "reference_models",
                                       "set_sd_bits", "reference_sd_bits", "noise_sd_bits"])


def widened(estimate: float, low: float, high: float, sd: float, level: float = LEVEL) -> tuple[float, float]:
    """The interval (low, high) around `estimate` with a normal error of SD `sd` added: each half-width combined
    in quadrature with z * sd (z the normal quantile of `level`, 1.96 at 95%)."""
    z = float(stats.norm.ppf(0.5 + level / 2))
    return (estimate - math.hypot(estimate - low, z * sd), estimate + math.hypot(high - estimate, z * sd))


def controls_check(scores: pd.DataFrame, resamples: int = 1000, rng_seed: int = 0, level: float = LEVEL
                   ) -> pd.DataFrame:
    """Check 1 per kind: mean control GenEx (bits) with its interval (``low``, ``high``); ``passes`` when it
    contains the null value ``null_bits`` (:func:`control_null`, the mean over controls; 0 when the references
    agree). Also ``excess_bits`` = mean - null and the largest |GenEx| of a single control.

    The interval is a bootstrap over original seeds, then controls, of each control's excess (GenEx minus its own
    null value), shifted back to the GenEx scale (``seeds_low``, ``seeds_high``), and widened (:func:`widened`)
    by the noise the bootstrap leaves out (:func:`set_draw_variance`): the reference ensemble's seed noise
    (``reference_sd_bits``) and, when `scores` hold set-draw models' scores, the set draw (``set_sd_bits``, NaN
    without them); ``noise_sd_bits`` is the two combined."""
    g = control_genex(scores)
    null = control_null(scores)
    g = g.merge(null, on=["kind", "uid"], how="left", validate="many_to_one")
    noise = set_draw_variance(scores).set_index("kind")
    rows = []
    for kind, k in g.groupby("kind", sort=False):
        base = float(k.drop_duplicates("uid").null_bits.mean())
        iv = hierarchical_bootstrap(k.assign(value=k.value - k.null_bits), "value", resamples=resamples,
                                    rng_seed=rng_seed, level=level)
        get = lambda col, default=math.nan: float(noise[col].get(kind, default))   # noqa: E731
        sd = get("noise_sd_bits", 0.0)
        low, high = widened(iv.estimate, iv.low, iv.high, sd, level)
        rows.append({"kind": kind, "mean_bits": base + iv.estimate, "low": base + low, "high": base + high,
                     "null_bits": base, "excess_bits": iv.estimate,
                     "max_abs_bits": float(k.value.abs().max()), "controls": k.uid.nunique(),
                     "original_seeds": iv.n_seeds, "passes": bool(low <= 0.0 <= high),
                     "seeds_low": base + iv.low, "seeds_high": base + iv.high, "set_sd_bits": get("set_sd_bits"),
                     "reference_sd_bits": get("reference_sd_bits", 0.0), "noise_sd_bits": sd,
                     "set_groups": int(get("set_groups", 0))})
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


def run_checks(start: pd.DataFrame, draw_scores: pd.DataFrame | None = None, resamples: int = 1000
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both checks as notebook 02 runs them: check 1 on ``start`` (:func:`start_scores`) with the set-draw models'
    control scores (:func:`forgetlab.set_draws.set_draw_scores`), check 2 on ``start`` alone."""
    scores = start if draw_scores is None else pd.concat([start, draw_scores], ignore_index=True)
    return controls_check(scores, resamples=resamples), reference_membership_check(start, resamples=resamples)


def sanity_markdown(controls: pd.DataFrame, membership: pd.DataFrame, labels=None) -> str:
    """Both checks in words, one line per kind, saying which pass."""
    name = (labels or {}).get
    lines = ["**Check 1: never-trained controls' GenEx before unlearning (should be ≈ its null value: 0 bits, less "
             "the few tenths to few bits by which the references' log-mean-exp exceeds their mean).**", ""]
    for r in controls.itertuples():
        sd = getattr(r, "set_sd_bits", math.nan)
        where = f"seeds and controls ({r.original_seeds} x {r.controls}) [{r.seeds_low:.2f}, {r.seeds_high:.2f}]"
        if math.isnan(sd):
            where += f" widened by the reference seeds' SD {r.reference_sd_bits:.2f} bits"
        else:
            where += (f" widened by the reference seeds' SD {r.reference_sd_bits:.2f} and the set-draw SD {sd:.2f} "
                      f"bits ({r.set_groups} training sets)")
        null = getattr(r, "null_bits", 0.0)
        lines.append(f"- {name(r.kind, r.kind)}: mean {r.mean_bits:.2f} bits, 95% interval [{r.low:.2f}, "
                     f"{r.high:.2f}] {where}; null value {null:.2f} bits (largest single |GenEx| "
                     f"{r.max_abs_bits:.2f}) → "
                     f"{'passes' if r.passes else 'FAILS'}")
    lines += ["", "**Check 2: membership AUC of the forget set against its population under the reference "
              "models (should be ≈ 0.5).**", ""]
    for r in membership.itertuples():
        lines.append(f"- {name(r.kind, r.kind)}: reference AUC {r.reference_auc:.2f} [{r.reference_low:.2f}, "
                     f"{r.reference_high:.2f}] ({r.forget} forget vs {r.population} population examples, "
                     f"{r.reference_models} reference models) → {'passes' if r.passes else 'FAILS'}; "
                     f"the originals, which trained on it: {r.original_auc:.2f}")
    return "\n".join(lines)

"""The study's claims about ID vs OOD, each decided by a 95% interval (never by comparing two numbers).

From the tidy table of :func:`forgetlab.engine.run_study` (per original seed, ``genex_seed_bits``):

- **Calibration** (:func:`control_offsets`, :func:`calibrate`): an original seed may model a whole kind better or
  worse than the reference ensemble does, which shifts the GenEx of *every* example of that kind under that seed,
  trained on or not (in smoke, ID controls sit near -18 bits under one seed and +2 under another). So each example
  is measured against the controls of its own kind and original seed: *calibrated GenEx* = GenEx minus the mean
  step-0 GenEx of that (kind, seed)'s controls. This removes a seed-level offset; it does not remove the spread
  between examples within a seed, nor any change of the offset during unlearning (the controls move too).
- **Endpoints** per forget example and original seed (:func:`endpoints`), all on calibrated GenEx: steps until it
  falls to or below its kind's noise floor (the 95th percentile of the controls' |calibrated GenEx| at step 0,
  pooled over seeds, at least `minimum`), censored at the last step when never reached; steps to remove 50% / 90%
  of its own initial calibrated GenEx (the exposure above its seed's never-trained level).
- **Utility** per model and step (:func:`utility_table`): held-out loss (log of held-out perplexity), each OOD
  kind's never-trained population loss, and the *general loss*, their mean (all nats/token).
- **Progress** per example (:func:`at_progress`): the utility the model had lost by the step at which the example
  had lost `fraction` of its initial GenEx, and that loss per bit removed.
- **Claims** (:func:`claims_table`): ID minus OOD with a paired hierarchical bootstrap interval (original seeds,
  then examples within them) and :func:`forgetlab.intervals.verdict`:
  C1 OOD needs more steps (restricted mean steps to the target, and to remove 50%; the median survival
  difference beside it); C2 OOD loses less utility per bit removed; C3 ID loses more utility at equal forgetting
  progress (50% of initial GenEx removed).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .intervals import (INTERVAL_WORDS, Interval, difference_interval, example_endpoints, hierarchical_bootstrap,
                        noise_floor_target, verdict)
from .survival import median_survival_interval

SEED_METRIC = "genex_seed_bits"
KEYS = ["kind", "method", "seed", "uid"]
UTILITY_LABELS = {"general_loss": "general loss (mean of held-out and population losses, nats/token)",
                  "heldout_loss": "held-out ID loss (nats/token)", "retain_loss": "retain loss (nats/token)"}


@dataclass(frozen=True)
class Claim:
    """One claim about ID minus OOD: which endpoint column it reads and which sign it predicts."""
    code: str
    statement: str
    measure: str            # column of the per-example table
    censored: str | None    # its censoring flag (steps), or None
    direction: str          # "negative": the claim says ID - OOD < 0; "positive": > 0
    unit: str
    utility: str = ""       # the utility measure of C2/C3 ("" for step endpoints)

    @property
    def column(self) -> str:
        """The per-example column it reads (utility measures get their own columns)."""
        return f"{self.measure}@{self.utility}" if self.utility else self.measure


def default_claims(fraction: float = 0.5, utilities: Sequence[str] = ("heldout_loss", "general_loss")
                   ) -> list[Claim]:
    """C1 (two step endpoints), then C2 and C3 for each utility measure."""
    pct = f"{round(fraction * 100):d}%"
    out = [Claim("C1", "OOD needs more steps to unlearn (calibrated GenEx to the controls' noise floor)",
                 "steps_to_target", "censored", "negative", "steps"),
           Claim("C1", "OOD needs more steps to remove 50% of its initial GenEx", "steps_to_50pct",
                 "censored_50pct", "negative", "steps")]
    for u in utilities:
        name = UTILITY_LABELS.get(u, u)
        out.append(Claim("C2", f"OOD has a better trade-off: less {name} lost per bit of GenEx removed (at {pct} "
                         "removed)", "utility_lost_per_bit", None, "positive", "nats/token per bit", u))
        out.append(Claim("C3", f"ID unlearning makes utility decay faster: more {name} lost at equal progress "
                         f"({pct} of initial GenEx removed)", "utility_lost", None, "positive", "nats/token", u))
    return sorted(out, key=lambda c: c.code)


# ---- endpoints -------------------------------------------------------------------------------------

def per_seed(results: pd.DataFrame, metric: str = SEED_METRIC, roles: Sequence[str] = ("forget",)) -> pd.DataFrame:
    """Rows of one per-example metric per original seed (seed >= 0): step, seed, uid, role, kind, method, value."""
    df = results[(results.metric == metric) & results.role.isin(list(roles)) & (results.seed >= 0)]
    if df.empty:
        raise ValueError(f"no {metric!r} rows with seed >= 0 for roles {list(roles)}: pass the table of "
                         "engine.run_study (it adds genex_seed_bits per original seed)")
    return df[["step", "seed", "uid", "role", "kind", "method", "value"]]


def start_controls(results: pd.DataFrame, metric: str = SEED_METRIC) -> pd.DataFrame:
    """The controls' rows before unlearning (first recorded step), one per kind x original seed x control."""
    ctl = per_seed(results, metric, ("control",))
    return ctl[ctl.step == ctl.step.min()].drop_duplicates(["kind", "seed", "uid"])  # step 0 is shared by methods


def control_offsets(results: pd.DataFrame, metric: str = SEED_METRIC) -> pd.DataFrame:
    """Per kind and original seed: ``offset``, the controls' mean value at step 0 (how much better, > 0, or
    worse, < 0, that original models never-trained text of the kind than the references do), and ``controls``."""
    return offsets_of(start_controls(results, metric))


def offsets_of(controls: pd.DataFrame) -> pd.DataFrame:
    """Per kind and original seed of control rows (kind, seed, value): ``offset`` (their mean) and ``controls``."""
    return controls.groupby(["kind", "seed"], sort=False).value.agg(offset="mean", controls="size").reset_index()


def calibrate(rows: pd.DataFrame, offsets: pd.DataFrame) -> pd.DataFrame:
    """`rows` (kind, seed, value, ...) with ``value`` minus its (kind, seed) ``offset`` (kept as a column)."""
    out = rows.drop(columns="offset", errors="ignore").merge(offsets[["kind", "seed", "offset"]],
                                                             on=["kind", "seed"], how="left")
    if out.offset.isna().any():
        bad = sorted(set(map(tuple, out.loc[out.offset.isna(), ["kind", "seed"]].to_numpy().tolist())))
        raise KeyError(f"no controls at step 0 for (kind, seed) {bad[:5]}: calibration needs control_size > 0 "
                       "for every kind and original seed (or pass calibrated=False)")
    return out.assign(value=out.value - out.offset)


def noise_floors(results: pd.DataFrame, metric: str = SEED_METRIC, quantile: float = 0.95,
                 minimum: float = 0.0, calibrated: bool = True) -> dict[str, float]:
    """Per kind: the `quantile` of the controls' |value| at step 0, pooled over original seeds, at least
    `minimum`; with `calibrated`, of their value minus their (kind, seed) mean (see :func:`calibrate`)."""
    ctl = start_controls(results, metric)
    if calibrated:
        ctl = calibrate(ctl, control_offsets(results, metric))
    return {k: noise_floor_target(g.value, quantile, minimum) for k, g in ctl.groupby("kind", sort=False)}


def endpoints(results: pd.DataFrame, metric: str = SEED_METRIC, floors: Mapping[str, float] | None = None,
              fractions: Sequence[float] = (0.5, 0.9), quantile: float = 0.95, minimum: float = 0.0,
              calibrated: bool = True) -> pd.DataFrame:
    """Per forget example x original seed x method: initial, final, steps_to_target / censored (first step at
    or below the kind's noise floor, column target), steps_to_<p>pct / censored_<p>pct (see
    intervals.example_endpoints) and the (kind, seed) ``offset`` subtracted (0 when not `calibrated`). Every
    value is calibrated GenEx when `calibrated`; pass `floors` made with the same `calibrated`."""
    floors = dict(floors) if floors is not None else noise_floors(results, metric, quantile, minimum, calibrated)
    rows = per_seed(results, metric)[["step", "value", *KEYS]]
    rows = calibrate(rows, control_offsets(results, metric)) if calibrated else rows.assign(offset=0.0)
    # "at or below the floor" (|value| <= floor is within noise): strictly below the next float up
    out = example_endpoints(rows, {k: float(np.nextafter(f, np.inf)) for k, f in floors.items()}, fractions,
                            by=[*KEYS, "offset"])
    return out.assign(target=out.kind.map(floors))


def with_per_token(df: pd.DataFrame, n_scored: Mapping[str, float],
                   columns: Sequence[str] = ("value",)) -> pd.DataFrame:
    """`df` with ``<column>_per_token`` = column / n_scored of the row's uid (bits per scored token)."""
    missing = set(df.uid) - set(n_scored)
    if missing:
        raise KeyError(f"no n_scored for uids {sorted(missing)[:5]}: pass every example's scored-token count")
    n = df.uid.map(n_scored).astype(float)
    return df.assign(**{f"{c}_per_token": df[c] / n for c in columns})


# ---- utility ---------------------------------------------------------------------------------------

def utility_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per kind, method, original seed and step: heldout_loss = log(heldout_ppl), every loss_<kind>, retain_loss,
    and general_loss = mean of heldout_loss and the loss_<kind> columns (nats/token)."""
    m = results[(results.role == "model") & (results.seed >= 0)]
    wide = m.pivot_table(index=["kind", "method", "seed", "step"], columns="metric", values="value").reset_index()
    wide.columns.name = None
    if "heldout_ppl" not in wide:
        raise ValueError("no heldout_ppl rows: the backend's utility must report held-out perplexity")
    wide["heldout_loss"] = np.log(wide.heldout_ppl)
    pops = [c for c in wide.columns if c.startswith("loss_")]
    wide["general_loss"] = wide[["heldout_loss", *pops]].mean(axis=1)
    return interpolate_utility(wide)


def interpolate_utility(wide: pd.DataFrame, keys: Sequence[str] = ("kind", "method", "seed")) -> pd.DataFrame:
    """Utility columns at every recorded step: linear in the step between two measured steps.

    A run measures utility every ``utility_every`` steps (and at step 0 and its last step) but its forgetting
    metrics at every recorded step; analyses that read utility at a forgetting step (C2, C3, the placebo)
    interpolate. Steps outside the measured range stay NaN."""
    cols = [c for c in wide.columns if c not in (*keys, "step", "membership_auc")]
    if not cols or not wide[cols].isna().any().any():
        return wide
    out = wide.sort_values([*keys, "step"]).copy()
    for _, idx in out.groupby(list(keys), sort=False).groups.items():
        block = out.loc[idx, ["step", *cols]].set_index("step")
        out.loc[idx, cols] = block.interpolate(method="index", limit_area="inside").to_numpy()
    return out.sort_index()


def utility_lost(results: pd.DataFrame, utility: str = "general_loss") -> pd.DataFrame:
    """kind, method, seed, step, utility_lost: the increase of `utility` since the first step of its run."""
    u = utility_table(results)
    if utility not in u:
        raise KeyError(f"utility {utility!r} is not recorded (has {[c for c in u.columns if 'loss' in c]})")
    u = u.sort_values(["kind", "method", "seed", "step"])
    first = u.groupby(["kind", "method", "seed"])[utility].transform("first")
    return u[["kind", "method", "seed", "step"]].assign(utility_lost=u[utility] - first)


def at_progress(results: pd.DataFrame, fraction: float = 0.5, utility: str = "general_loss",
                ends: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per forget example x seed x method: the step at which it had lost `fraction` of its initial GenEx
    (``progress_step``; its last step when censored), bits removed by then, the utility lost by then and
    ``utility_lost_per_bit`` (NaN when nothing was removed or initial GenEx <= 0). GenEx is calibrated as in
    `ends` (default :func:`endpoints`: calibrated); the bits removed do not depend on it."""
    name = f"{round(fraction * 100):d}pct"
    ends = ends if ends is not None else endpoints(results, fractions=(fraction,))
    ends = ends if "offset" in ends else ends.assign(offset=0.0)
    e = ends[[*KEYS, "offset", "initial", f"steps_to_{name}", f"censored_{name}"]].rename(
        columns={f"steps_to_{name}": "progress_step", f"censored_{name}": "progress_censored"})
    e = e[e.progress_step.notna()]
    g = per_seed(results)[["step", "value", *KEYS]].rename(columns={"step": "progress_step", "value": "genex_then"})
    out = e.merge(g, on=[*KEYS, "progress_step"], how="left")
    out["genex_then"] = out.genex_then - out.offset
    lost = utility_lost(results, utility).rename(columns={"step": "progress_step"})
    out = out.merge(lost, on=["kind", "method", "seed", "progress_step"], how="left")
    out["removed_bits"] = out.initial - out.genex_then
    with np.errstate(divide="ignore", invalid="ignore"):
        out["utility_lost_per_bit"] = np.where(out.removed_bits > 0, out.utility_lost / out.removed_bits, np.nan)
    return out


# ---- claims ----------------------------------------------------------------------------------------

def _arm(iv: Interval, prefix: str) -> dict:
    return {f"{prefix}estimate": iv.estimate, f"{prefix}low": iv.low, f"{prefix}high": iv.high}


def claims_table(results: pd.DataFrame, method: str = "ga", utilities: Sequence[str] = ("heldout_loss", "general_loss"),
                 fraction: float = 0.5, id_kind: str = "id", resamples: int = 1000, rng_seed: int = 0,
                 claims: Sequence[Claim] | None = None, minimum: float = 0.0, calibrated: bool = True
                 ) -> pd.DataFrame:
    """One row per claim x OOD kind for `method`: each arm's mean with its interval, ID minus OOD (estimate,
    low, high: a paired hierarchical bootstrap over original seeds, then examples), the verdict, the share
    of censored examples per arm and, for step endpoints, the median-survival difference with its interval.
    C2 and C3 come once per utility measure in `utilities`. Endpoints read calibrated GenEx and a noise floor of at
    least `minimum` bits (see :func:`endpoints`).

    Empty when the run has no `id_kind` forget set or not this method.
    """
    claims = list(claims or default_claims(fraction, utilities))
    res = results[results.method == method]
    if res.empty or id_kind not in set(res.kind):
        return pd.DataFrame()
    table = endpoints(res, fractions=sorted({0.5, 0.9, fraction}), minimum=minimum, calibrated=calibrated)
    for u in sorted({c.utility for c in claims if c.utility}):
        prog = at_progress(res, fraction, u, table)[[*KEYS, "utility_lost", "utility_lost_per_bit"]]
        table = table.merge(prog.rename(columns={m: f"{m}@{u}" for m in ("utility_lost", "utility_lost_per_bit")}),
                            on=KEYS, how="left")
    kw = dict(resamples=resamples, rng_seed=rng_seed)
    rows = []
    arm_id = table[table.kind == id_kind]
    for kind in [k for k in pd.unique(table.kind) if k != id_kind]:
        arm_ood = table[table.kind == kind]
        for c in claims:
            col = c.column
            # seeds where both arms have a value (an arm may lose a seed whose examples have nothing to remove)
            a, b = arm_id[arm_id[col].notna()], arm_ood[arm_ood[col].notna()]
            common = sorted(set(a.seed) & set(b.seed))
            a, b = a[a.seed.isin(common)], b[b.seed.isin(common)]
            diff = difference_interval(a, b, col, **kw)
            row = {"claim": c.code, "statement": c.statement, "measure": col, "unit": c.unit, "ood_kind": kind,
                   "method": method, "utility": c.utility, "direction": c.direction,
                   **_arm(hierarchical_bootstrap(a, col, **kw), "id_"),
                   **_arm(hierarchical_bootstrap(b, col, **kw), "ood_"),
                   **_arm(diff, ""), "verdict": verdict(diff, c.direction), "n_seeds": diff.n_seeds,
                   "n_units": diff.n_units, "resamples": resamples}
            if c.censored:
                row["id_censored"] = float(a[c.censored].mean()) if len(a) else math.nan
                row["ood_censored"] = float(b[c.censored].mean()) if len(b) else math.nan
                med = median_survival_interval(a, b, col, c.censored, **kw)
                row.update({"median_estimate": med.estimate, "median_low": med.low, "median_high": med.high})
            rows.append(row)
    return pd.DataFrame(rows)


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return "∞" if x == math.inf else ("-∞" if x == -math.inf else f"{x:.3g}")


SIDE_WORDS = {"negative": "below 0 (ID smaller than OOD)", "positive": "above 0 (ID larger than OOD)"}


def claims_markdown(table: pd.DataFrame, labels: Mapping[str, str] | None = None) -> str:
    """The claims in plain words: per claim its statement, then per OOD kind the ID - OOD difference with its
    95% interval and verdict; ends with what the interval means (:data:`INTERVAL_WORDS`)."""
    if table.empty:
        return "No ID forget set (or not this method) in this run, so the ID-vs-OOD claims cannot be checked."
    name = (labels or {}).get
    lines = [f"**What this run measured ({table.method.iloc[0]}; ID minus OOD, 95% interval):**", ""]
    for (code, statement), g in table.groupby(["claim", "statement"], sort=False):
        r0 = g.iloc[0]
        lines.append(f"- **{code}** — *{statement}*. The claim predicts a difference {SIDE_WORDS[r0.direction]}.")
        for r in g.itertuples():
            cens = (f"; censored examples ID {r.id_censored:.0%}, OOD {r.ood_censored:.0%}"
                    if "id_censored" in g and not pd.isna(r.id_censored) else "")
            lines.append(f"  - {name(r.ood_kind, r.ood_kind)}: ID {_fmt(r.id_estimate)} vs OOD "
                         f"{_fmt(r.ood_estimate)} {r.unit}; difference {_fmt(r.estimate)} "
                         f"[{_fmt(r.low)}, {_fmt(r.high)}] → **{r.verdict}**{cens}")
    n_seeds = int(table.n_seeds.max())
    lines += ["", f"*What the interval means.* {INTERVAL_WORDS}"]
    if n_seeds < 2:
        lines.append(f"This run has {n_seeds} original seed: its intervals reflect the examples only, not how "
                     "much another original model would change the answer.")
    lines.append("Steps of examples that never reach their endpoint count as the step budget (restricted mean: "
                 "a lower bound for them); the median-survival difference in the table treats them as censored.")
    return "\n".join(lines)


def summary_record(table: pd.DataFrame) -> list[dict]:
    """The claims for ``summary.json``: every row with its bounds; infinities and NaN become null."""
    def clean(v):
        if isinstance(v, (float, np.floating)):
            return float(v) if math.isfinite(v) else None
        return v.item() if hasattr(v, "item") else v
    return [{k: clean(v) for k, v in r.items()} for r in table.to_dict(orient="records")]


def endpoint_summary(ends: pd.DataFrame, resamples: int = 1000, rng_seed: int = 0) -> pd.DataFrame:
    """Per kind and method: initial GenEx and restricted-mean / median steps to the target, to 50% and to 90%
    removed, each with its 95% interval (seeds, then examples), and the share of censored examples."""
    rows = []
    kw = dict(resamples=resamples, rng_seed=rng_seed)
    for (kind, method), g in ends.groupby(["kind", "method"], sort=False):
        row = {"kind": kind, "method": method, "target_bits": float(g.target.iloc[0]), "examples": g.uid.nunique(),
               "seeds": g.seed.nunique(), **_arm(hierarchical_bootstrap(g, "initial", **kw), "initial_genex_")}
        for col, cens in (("steps_to_target", "censored"), ("steps_to_50pct", "censored_50pct"),
                          ("steps_to_90pct", "censored_90pct")):
            if col not in g:
                continue
            ok = g[g[col].notna()]
            row.update(_arm(hierarchical_bootstrap(ok, col, **kw), f"{col}_mean_"))
            row.update(_arm(median_survival_interval(ok, duration=col, censored=cens, **kw), f"{col}_median_"))
            row[f"{col}_censored"] = float(ok[cens].mean()) if len(ok) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


# ---- utility lost against forgetting progress (C2 curves) -------------------------------------------

def _progress_arrays(results: pd.DataFrame, kind: str, method: str, utilities: Sequence[str], calibrated: bool):
    """Per original seed: capped fraction removed [examples, steps] and utility lost [utilities, steps]."""
    g = per_seed(results[(results.kind == kind) & (results.method == method)])
    if calibrated:
        g = calibrate(g, control_offsets(results[results.kind == kind]))
    lost = {u: utility_lost(results[(results.kind == kind) & (results.method == method)], u) for u in utilities}
    out = []
    for seed, gs in g.groupby("seed", sort=True):
        wide = gs.pivot_table(index="uid", columns="step", values="value").sort_index(axis=1)
        wide = wide[wide.iloc[:, 0] > 0]
        if wide.empty:
            continue
        frac = np.minimum(1.0 - wide.to_numpy() / wide.iloc[:, [0]].to_numpy(), 1.0)
        steps = wide.columns.to_numpy()
        u = np.stack([lost[n][lost[n].seed == seed].set_index("step").utility_lost.reindex(steps).to_numpy()
                      for n in utilities])
        out.append((frac, u))
    return out


def _curve_at(frac: np.ndarray, u: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Utility lost [utilities, grid] when the mean fraction removed (running max) first reaches each grid value."""
    x = np.maximum.accumulate(np.nanmean(frac, axis=0))
    return np.stack([np.where(grid <= x[-1], np.interp(grid, x, row), np.nan) for row in u])


def progress_curves(results: pd.DataFrame, utilities: Sequence[str] = ("general_loss",), grid=None,
                    resamples: int = 1000, rng_seed: int = 0, level: float = 0.95, calibrated: bool = True
                    ) -> pd.DataFrame:
    """Utility lost against the fraction of initial GenEx removed, per kind and method, with a band.

    Per example the fraction removed is 1 - GenEx(t) / GenEx(0) (calibrated GenEx, as the endpoints; raw with
    ``calibrated=False``), capped at 1 (an over-unlearned example cannot offset one still exposed); examples with GenEx(0) <= 0 are left out. Per seed, the mean over examples (its
    running maximum) is matched to the utility lost at the same step by linear interpolation; the curve is the
    mean over seeds. The band resamples seeds, then examples within them (95%, percentile); it is left out
    (NaN) where the run did not get that far. Columns: kind, method, utility, fraction, utility_lost, low, high.
    """
    grid = np.linspace(0.0, 1.0, 21) if grid is None else np.asarray(grid, dtype=np.float64)
    rng = np.random.default_rng(rng_seed)
    a = (1.0 - level) / 2.0
    frames = []
    for (kind, method), _ in results[results.metric == SEED_METRIC].groupby(["kind", "method"], sort=False):
        seeds = _progress_arrays(results, kind, method, utilities, calibrated)
        if not seeds:
            continue
        point = np.mean([_curve_at(f, u, grid) for f, u in seeds], axis=0)
        boot = np.empty((resamples, len(utilities), grid.size))
        for r in range(resamples):
            drawn = rng.integers(0, len(seeds), len(seeds))
            boot[r] = np.mean([_curve_at(seeds[s][0][rng.integers(0, len(seeds[s][0]), len(seeds[s][0]))],
                                         seeds[s][1], grid) for s in drawn], axis=0)
        ok = np.isfinite(boot).mean(axis=0) >= 0.5          # a band only where most resamples got that far
        filled = np.where(ok, np.where(np.isfinite(boot), boot, np.nan), 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo = np.where(ok, np.nanquantile(filled, a, axis=0), np.nan)
            hi = np.where(ok, np.nanquantile(filled, 1 - a, axis=0), np.nan)
        for i, name in enumerate(utilities):
            frames.append(pd.DataFrame({"kind": kind, "method": method, "utility": name, "fraction": grid,
                                        "utility_lost": point[i], "low": lo[i], "high": hi[i]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["kind", "method", "utility", "fraction", "utility_lost", "low", "high"])

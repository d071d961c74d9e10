"""The unlearning study: unlearn each forget set with each method and record every metric per step.

The result is one tidy table (one row per method x kind x seed x step x example x metric), cached
like the models, from which notebooks 03 and 04 draw every figure and summary.

Metrics recorded at each recorded step:
- per forget and control example: ``ll`` (nats, under each unlearned seed), ``relex_bits``, and for
  canaries ``exposure_bits`` (skew-normal extrapolation from a fixed candidate sample; exact over all
  of R at the first and last step, as ``exposure_exact_bits``);
- after the run, ``genex_bits`` per example and step, from the lls of all unlearned seeds against all
  reference seeds;
- per model: utility (``heldout_ppl``, ``retain_loss``, ``loss_<kind>``) and ``membership_auc``.
"""
from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import metrics
from .cache import ArtifactCache, cache_key
from .experiment import TrainedModel, model_key
from .forget_sets import StudyData
from .unlearning import UnlearnSettings, Unlearner

STUDY_VERSION = 1
CANARY_SAMPLE = 512          # never-trained candidates scored each step (RelEx population, exposure fit)
UTILITY_ROWS = 48            # held-out and retain rows scored each step
RETAIN_ROWS = 1024           # rows gradient difference draws its retain batches from
UNLEARN_KEYS = ("unlearn_lr", "unlearn_steps", "unlearn_batch", "unlearn_optimizer", "grad_clip", "record_every",
                "retain_weight", "npo_beta", "seed")


class StudyInputError(ValueError):
    """The forget set, models or parameters cannot be used together; the message says why."""


def _trained_secrets(data: StudyData) -> set[str]:
    can = data.select("canary")
    return set(can[can.role.isin(["forget", "background"])].secret)


def canary_population(data: StudyData, size: int = CANARY_SAMPLE, seed: int = 0) -> pd.DataFrame:
    """A fixed sample of never-trained canary candidates, shaped like the examples table."""
    digits = data.canary_digits
    excluded = {int(s) for s in _trained_secrets(data)} | {int(s) for s in data.select("canary", "control").secret}
    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(10 ** digits), np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    chosen = np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))
    prefix = data.canary_prefix_ids()
    digit_ids = [data.tokenizer.token_to_id(str(d)) for d in range(10)]
    rows = [{"uid": f"canary-population-{v:0{digits}d}", "kind": "canary", "role": "population",
             "ids": prefix + [digit_ids[int(c)] for c in f"{v:0{digits}d}"], "score_start": len(prefix),
             "n_scored": digits, "secret": f"{v:0{digits}d}"} for v in chosen]
    return pd.DataFrame(rows)


def check_inputs(p: dict, data: StudyData, models: dict[str, list[TrainedModel]], kind: str) -> None:
    """Refuse combinations that would give meaningless numbers, before any long work."""
    if kind not in p["forget_kinds"]:
        raise StudyInputError(f"forget set {kind!r} is not in this run's training data (forget_kinds = "
                              f"{p['forget_kinds']}): add it to forget_kinds and retrain")
    if p["target_bits"] < 0:
        raise StudyInputError(f"target_bits = {p['target_bits']} is below zero: GenEx targets are >= 0 bits")
    if p["unlearn_steps"] < 1:
        raise StudyInputError("unlearn_steps must be at least 1")
    vocab = data.tokenizer.get_vocab_size()
    for m in models["original"] + models["reference"]:
        if m.model.config.vocab_size != vocab:
            raise StudyInputError(f"{m.role} model (seed {m.seed}) has vocabulary {m.model.config.vocab_size} but the "
                                  f"forget sets use a tokenizer of {vocab}: load models and data with the same parameters")
        if m.meta.get("data_fingerprint", data.fingerprint()) != data.fingerprint():
            raise StudyInputError(f"{m.role} model (seed {m.seed}) was trained on other data than these forget sets")


@dataclass
class ForgetSetView:
    """What one unlearning run scores: its forget and control examples and their never-trained population."""
    kind: str
    targets: pd.DataFrame      # forget + control examples of the kind
    population: pd.DataFrame   # never-trained peers (RelEx population, membership non-members)

    @classmethod
    def build(cls, data: StudyData, kind: str) -> "ForgetSetView":
        ex = data.select(kind)
        targets = ex[ex.role.isin(["forget", "control"])].reset_index(drop=True)
        population = canary_population(data) if kind == "canary" else ex[ex.role == "population"].reset_index(drop=True)
        return cls(kind, targets, population)


def reference_logprobs(models: dict[str, list[TrainedModel]], examples: pd.DataFrame) -> np.ndarray:
    """ll of each example under each reference model: [n_reference, n_examples]."""
    return np.stack([metrics.example_logprobs(m.model, examples) for m in models["reference"]])


def target_records(targets: pd.DataFrame, ll_t: np.ndarray, ll_pop: np.ndarray, extrapolate: bool) -> list[dict]:
    """Per forget and control example: ``ll``, ``relex_bits`` against the population and, with `extrapolate`
    (canaries), ``exposure_bits`` from a skew-normal fitted to the population."""
    relex = metrics.relex_bits(ll_t, ll_pop)
    exposure = metrics.extrapolated_exposure(ll_t, ll_pop) if extrapolate else None
    recs = []
    for i, r in enumerate(targets.itertuples()):
        recs += [{"uid": r.uid, "role": r.role, "metric": "ll", "value": float(ll_t[i])},
                 {"uid": r.uid, "role": r.role, "metric": "relex_bits", "value": float(relex[i])}]
        if exposure is not None:
            recs.append({"uid": r.uid, "role": r.role, "metric": "exposure_bits", "value": float(exposure[i])})
    return recs


def model_records(per_token_forget: np.ndarray, per_token_pop: np.ndarray, utility: dict[str, float]) -> list[dict]:
    """Per model: ``membership_auc`` (forget examples against the population, per-token ll) and the utility."""
    recs = [{"uid": "", "role": "model", "metric": "membership_auc",
             "value": metrics.membership_auc(per_token_forget, per_token_pop)}]
    return recs + [{"uid": "", "role": "model", "metric": name, "value": float(value)}
                   for name, value in utility.items()]


def make_evaluator(data: StudyData, view: ForgetSetView, final_step: int):
    """The function the unlearner calls at each recorded step; returns tidy records."""
    scored = pd.concat([view.targets, view.population], ignore_index=True)
    n_t = len(view.targets)
    n_scored = scored.n_scored.to_numpy()
    is_forget = (view.targets.role == "forget").to_numpy()

    def evaluate(model, step: int) -> list[dict]:
        ll = metrics.example_logprobs(model, scored)
        ll_t, ll_pop = ll[:n_t], ll[n_t:]
        recs = target_records(view.targets, ll_t, ll_pop, extrapolate=view.kind == "canary")
        if view.kind == "canary" and step in (0, final_step):
            all_ll = metrics.all_candidate_logprobs(model, data)
            for i, r in enumerate(view.targets.itertuples()):
                recs.append({"uid": r.uid, "role": r.role, "metric": "exposure_exact_bits",
                             "value": metrics.exposure_from_logprobs(ll_t[i], all_ll)})
        per_token = ll / n_scored
        return recs + model_records(per_token[:n_t][is_forget], per_token[n_t:],
                                    metrics.utility(model, data, eval_rows=UTILITY_ROWS))

    return evaluate


def retain_rows(data: StudyData, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data.train_rows), size=min(RETAIN_ROWS, len(data.train_rows)), replace=False))
    return data.train_rows[idx]


def unlearn_forget_set(p: dict, data: StudyData, models: dict[str, list[TrainedModel]], kind: str, method: str,
                       ref_ll: np.ndarray | None = None, steps: int | None = None,
                       keep_unlearners: bool = False) -> tuple[pd.DataFrame, list[Unlearner]]:
    """Unlearn one forget set from every original seed with one method; return the tidy table."""
    check_inputs(p, data, models, kind)
    settings = UnlearnSettings.from_params(p, method)
    steps = steps or settings.steps
    view = ForgetSetView.build(data, kind)
    forget = view.targets[view.targets.role == "forget"]
    if ref_ll is None:
        ref_ll = reference_logprobs(models, view.targets)
    evaluate = make_evaluator(data, view, steps)
    frames, unlearners = [], []
    for tm in models["original"]:
        model = copy.deepcopy(tm.model)
        u = Unlearner(model, [list(i) for i in forget.ids], forget.score_start.tolist(), settings, data.bos,
                      retain_rows=retain_rows(data, p["seed"]))
        frames.append(pd.DataFrame(u.run(steps, evaluate)).assign(seed=tm.seed))
        if keep_unlearners:
            unlearners.append(u)
    table = pd.concat(frames, ignore_index=True).assign(kind=kind, method=method)
    return add_genex(table, view.targets, ref_ll), unlearners


def add_genex(table: pd.DataFrame, targets: pd.DataFrame, ref_ll: np.ndarray) -> pd.DataFrame:
    """Append genex_bits rows (seed = -1: an expectation over all unlearned seeds) per example and step."""
    ll = table[table.metric == "ll"].pivot_table(index=["step", "seed"], columns="uid", values="value")
    ll = ll.reindex(columns=targets.uid)
    rows = []
    for step, block in ll.groupby(level="step"):
        bits = metrics.genex_bits(block.to_numpy(), ref_ll)
        rows += [{"step": step, "seed": -1, "uid": u, "role": r, "metric": "genex_bits", "value": float(b)}
                 for u, r, b in zip(targets.uid, targets.role, bits)]
    extra = pd.DataFrame(rows).assign(kind=table.kind.iloc[0], method=table.method.iloc[0])
    return pd.concat([table, extra], ignore_index=True)


def study_key(p: dict, data: StudyData, models: dict[str, list[TrainedModel]]) -> str:
    keys = [model_key(p, data, m.role, m.seed) for m in models["original"] + models["reference"]]
    return cache_key("study", STUDY_VERSION, {k: p[k] for k in UNLEARN_KEYS}, p["forget_kinds"], p["methods"],
                     p["target_bits"], keys, CANARY_SAMPLE, UTILITY_ROWS)


def run_study(p: dict, data: StudyData, models: dict[str, list[TrainedModel]],
              cache: ArtifactCache | None = None) -> pd.DataFrame:
    """Every forget set x every method: the full per-step table (cached)."""
    cache = cache or ArtifactCache()
    for kind in p["forget_kinds"]:
        check_inputs(p, data, models, kind)
    key = study_key(p, data, models)
    if cache.has("study", key):
        _, _, files = cache.load("study", key)
        return pd.read_csv(io.StringIO(files["results.csv"]), keep_default_na=False, na_values=[""],
                           dtype={"uid": str}).fillna({"uid": ""})
    ref_all = reference_logprobs(models, data.examples)
    frames = []
    jobs = [(k, m) for k in p["forget_kinds"] for m in p["methods"]]
    for kind, method in tqdm(jobs, desc="unlearning", mininterval=1.0):
        view = ForgetSetView.build(data, kind)
        ref_ll = ref_all[:, data.examples.uid.isin(view.targets.uid).to_numpy()]
        order = data.examples.uid[data.examples.uid.isin(view.targets.uid)].tolist()
        ref_ll = ref_ll[:, [order.index(u) for u in view.targets.uid]]
        frames.append(unlearn_forget_set(p, data, models, kind, method, ref_ll=ref_ll)[0])
    table = pd.concat(frames, ignore_index=True)
    cache.save("study", key, {"rows": len(table)}, files={"results.csv": table.to_csv(index=False)})
    return table


# ---- summaries -----------------------------------------------------------------------------------

def curves(table: pd.DataFrame, metric: str, role: str = "forget") -> pd.DataFrame:
    """Mean of a per-example metric over examples (and seeds) per method, kind and step."""
    df = table[(table.metric == metric) & (table.role == role)]
    return df.groupby(["method", "kind", "step"], as_index=False).value.mean()


def utility_curves(table: pd.DataFrame) -> pd.DataFrame:
    """Per-model metrics (utility, membership AUC) averaged over seeds: method, kind, step, metric, value."""
    df = table[table.role == "model"]
    return df.groupby(["method", "kind", "step", "metric"], as_index=False).value.mean()


def steps_to_unlearn(table: pd.DataFrame, target_bits: float, fractions: tuple[float, ...] = (0.5, 0.9)) -> pd.DataFrame:
    """Per method and kind: steps until mean forget GenEx < target, and to remove given fractions of it.

    Also: utility at that step, initial/final GenEx and RelEx, the control (noise-floor) GenEx, and
    utility lost per bit removed.
    """
    genex = curves(table, "genex_bits")
    relex = curves(table, "relex_bits")
    control = curves(table, "genex_bits", role="control")
    util = utility_curves(table)
    rows = []
    for (method, kind), g in genex.groupby(["method", "kind"], sort=False):
        g = g.sort_values("step")
        steps, values = g.step.to_numpy(), g.value.to_numpy()
        initial, final = values[0], values[-1]
        hit = metrics.steps_to_target(steps, values, target_bits)
        ppl = util[(util.method == method) & (util.kind == kind) & (util.metric == "heldout_ppl")].set_index("step").value
        ppl0 = float(ppl.iloc[0])
        at = float(ppl.get(hit, np.nan)) if np.isfinite(hit) else np.nan
        r = relex[(relex.method == method) & (relex.kind == kind)].sort_values("step").value.to_numpy()
        c = control[(control.method == method) & (control.kind == kind)].sort_values("step").value.to_numpy()
        row = {"method": method, "kind": kind, "initial_genex_bits": initial, "final_genex_bits": final,
               "initial_relex_bits": r[0], "final_relex_bits": r[-1], "control_genex_bits": c[0] if len(c) else np.nan,
               "steps_to_target": hit, "heldout_ppl_initial": ppl0, "heldout_ppl_at_target": at,
               "ppl_increase_at_target": at - ppl0 if np.isfinite(at) else np.nan,
               "final_heldout_ppl": float(ppl.iloc[-1]), "max_steps": int(steps[-1])}
        for f in fractions:
            row[f"steps_to_remove_{int(f * 100)}pct"] = (metrics.steps_to_target(steps, values, initial * (1 - f))
                                                        if initial > 0 else np.nan)
        removed = initial - target_bits
        row["ppl_increase_per_bit"] = row["ppl_increase_at_target"] / removed if removed > 0 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def relex_genex_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation of RelEx with GenEx across examples and steps, per method and kind, and overall."""
    relex = (table[table.metric == "relex_bits"].groupby(["method", "kind", "step", "uid"]).value.mean()
             .rename("relex"))
    genex = table[table.metric == "genex_bits"].set_index(["method", "kind", "step", "uid"]).value.rename("genex")
    both = pd.concat([relex, genex], axis=1, join="inner").reset_index()
    rows = [{"method": m, "kind": k, "spearman": metrics.rank_correlation(g.relex, g.genex), "pairs": len(g)}
            for (m, k), g in both.groupby(["method", "kind"], sort=False)]
    rows.append({"method": "all", "kind": "all", "spearman": metrics.rank_correlation(both.relex, both.genex),
                 "pairs": len(both)})
    return pd.DataFrame(rows)


def finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def claims(summary: pd.DataFrame, util: pd.DataFrame, method: str = "ga") -> pd.DataFrame:
    """The study's three claims about ID vs OOD, each checked against this run's numbers.

    Returns one row per claim and OOD kind: the measured ID and OOD values and whether the run agrees.
    A claim is "not measurable" when a value is missing (e.g. a target never reached).
    """
    s = summary[summary.method == method].set_index("kind")
    ppl = util[(util.method == method) & (util.metric == "heldout_ppl")]
    # utility decay: perplexity increase over the first half of the step budget
    half = {}
    for kind, g in ppl.groupby("kind"):
        g = g.sort_values("step")
        mid = g.step.iloc[-1] / 2
        half[kind] = float(g[g.step <= mid].value.iloc[-1] - g.value.iloc[0])
    rows = []
    if "id" not in s.index:
        return pd.DataFrame(rows)
    budget = float(s.max_steps.max())
    # a target never reached counts as "more than the step budget" (a censored value), not as missing
    steps = s.steps_to_target.fillna(np.inf)
    for kind in [k for k in s.index if k != "id"]:
        checks = [
            ("OOD needs more steps to unlearn", "steps_to_target", steps["id"], steps[kind], lambda i, o: o > i),
            ("OOD has a better quality/utility trade-off (less perplexity lost per bit removed)",
             "ppl_increase_per_bit", s.loc["id", "ppl_increase_per_bit"], s.loc[kind, "ppl_increase_per_bit"],
             lambda i, o: o < i),
            ("ID unlearning makes utility decay faster (perplexity rise over the first half of the steps)",
             "ppl_rise_first_half", half.get("id", np.nan), half.get(kind, np.nan), lambda i, o: i > o),
        ]
        for claim, measure, id_value, ood_value, agrees in checks:
            ok = not (np.isnan(id_value) or np.isnan(ood_value) or (np.isinf(id_value) and np.isinf(ood_value)))
            rows.append({"claim": claim, "ood_kind": kind, "measure": measure, "id_value": float(id_value),
                         "ood_value": float(ood_value), "step_budget": budget,
                         "verdict": ("agrees" if agrees(id_value, ood_value) else "disagrees") if ok else "not measurable"})
    return pd.DataFrame(rows)


def claims_markdown(table: pd.DataFrame, method: str = "ga") -> str:
    """A short written summary of `claims(...)`, one bullet per claim."""
    if table.empty:
        return "No ID forget set in this run, so the ID-vs-OOD claims cannot be checked."
    lines = [f"**What this run measured ({method}):**", ""]
    for claim, g in table.groupby("claim", sort=False):
        def fmt(v: float, budget: float) -> str:
            return f"not reached in {budget:.0f} steps" if np.isinf(v) else ("n/a" if np.isnan(v) else f"{v:.3g}")
        parts = [f"{r.ood_kind}: ID {fmt(r.id_value, r.step_budget)} vs OOD {fmt(r.ood_value, r.step_budget)} → {r.verdict}"
                 for r in g.itertuples()]
        n_agree = (g.verdict == "agrees").sum()
        lines.append(f"- *{claim}* — the run agrees for {n_agree} of {len(g)} OOD kinds ({'; '.join(parts)}).")
    return "\n".join(lines)

"""Memorization and difficulty per example, and how they relate to the cost of unlearning it.

The design (notebook 05):

1. **Pool.** A candidate pool of ``mem_pool_size`` *new* examples, split evenly over ``forget_kinds``: ID windows
   from the held-out plays, other-language and code windows from the same sources as the study, canaries with
   unused secrets. None of them is in the study's example table (forget, background, population or control
   rows), so the study's never-trained examples stay never-trained, and no ID window overlaps the held-out rows
   on which utility is measured.
2. **Subset models.** One base model trained without the pool (notebook 02's first reference model) is
   fine-tuned ``mem_models`` times, each time on one half of the pool (every example ``insertions`` times,
   as in the main study) mixed with the same sample of shared training rows, so the models do not drift.
   Halves come in *complementary pairs*, stratified by kind: model ``2j`` sees a random half of each kind
   and model ``2j+1`` the other half, so every example is seen by exactly half of the models and every model
   sees as many examples of each kind. All subset models use the same fine-tuning seed (same batch order):
   they differ only in which half they saw.
3. **Scores.** ``mem(x)`` = mean per-token ll of x over the models that saw it minus over those that did not
   (nats per token), with its standard error (Welch); **difficulty** = per-token loss of x under the models
   that did not see it.
4. **Unlearning.** Each example is unlearned by gradient ascent from the model of the first complementary
   pair that saw it (more pairs: ``unlearn_pairs``), in groups of at most ``mem_group_size`` examples of one
   kind. ``GenEx(x)`` per step uses the unlearned models that saw x against the subset models that did not
   see x (untouched); **steps to unlearn** is the first step with GenEx below ``target_bits``, and the
   utility lost is the held-out perplexity increase by that step.

Everything is seeded and cached (pool, each subset model, the unlearning table) under keys over everything
that determines it.
"""
from __future__ import annotations

import copy
import io
import json
import math
import random
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from . import metrics
from .cache import ArtifactCache, cache_key
from .experiment import TrainedModel, config_for, get_model, model_key
from .forget_sets import StudyData, dedupe_windows, example_row, canary_ids, line_start_windows, pad_rows
from .models import pick_device, seed_everything
from .scoring import mean_token_loss
from .training import TRAINING_VERSION, train_lm
from .unlearning import UnlearnSettings, Unlearner

MEM_VERSION = 1               # bump when anything below changes what is built
FINETUNE_LR_SCALE = 0.1       # fine-tuning peak learning rate = this x learning_rate (the base's final rate)
SHARED_RATIO = 1.0            # shared training rows per pool row in each subset model's fine-tuning data
UTILITY_ROWS = 16             # held-out rows scored at every unlearning step (perplexity)
GUARD_ROWS = 64               # no ID pool window overlaps the first GUARD_ROWS held-out rows (utility rows)
GUARD_NGRAM = 8               # ... judged by shared GUARD_NGRAM-grams
POOL_SEED_OFFSET = 7919       # the pool's random draws are independent of the study's
SPLIT_TRIES = 100             # draws per complementary pair to find a split no earlier pair used
CORR_PAIRS = (("memorization", "difficulty"), ("memorization", "steps_to_unlearn"),
              ("difficulty", "steps_to_unlearn"), ("memorization", "ppl_increase_at_target"),
              ("difficulty", "ppl_increase_at_target"))
SHORT = {"memorization": "memorization", "difficulty": "difficulty", "steps_to_unlearn": "steps to unlearn",
         "ppl_increase_at_target": "utility lost (perplexity increase)"}
LABELS = {"memorization": "memorization (nats / token)", "difficulty": "difficulty (loss, nats / token)",
          "steps_to_unlearn": "steps to unlearn (GenEx < target)",
          "ppl_increase_at_target": "held-out perplexity increase at target"}


class MemorizationInputError(ValueError):
    """Parameters or inputs of the memorization study cannot work together; the message says how to fix it."""


# ------------------------------------------------------------------------------------------------ pool

def kind_counts(total: int, kinds: list[str]) -> dict[str, int]:
    """Split `total` pool examples as evenly as possible over `kinds` (the first kinds get one more)."""
    if not kinds:
        raise MemorizationInputError("forget_kinds is empty: the pool needs at least one kind")
    if total < len(kinds):
        raise MemorizationInputError(f"mem_pool_size = {total} is smaller than the {len(kinds)} kinds "
                                     f"({', '.join(kinds)}): raise mem_pool_size to at least {len(kinds)}")
    base, extra = divmod(total, len(kinds))
    return {k: base + (i < extra) for i, k in enumerate(kinds)}


def _ngrams(seq: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


def build_pool(p: dict, data: StudyData) -> pd.DataFrame:
    """The candidate pool: `mem_pool_size` new examples of each kind in `forget_kinds` (role 'pool').

    Shaped like the study's example table (uid, kind, role, source, text, ids, n_tokens, score_start, n_scored,
    secret); uids are ``<kind>-pool-NNN``. Deterministic for given parameters.
    """
    from .data import load_sources

    counts = kind_counts(p["mem_pool_size"], list(p["forget_kinds"]))
    rng = random.Random(p["seed"] + POOL_SEED_OFFSET)
    tok, bos, L = data.tokenizer, data.bos, p["example_tokens"]
    used = {tuple(int(t) for t in ids) for ids in data.examples.ids}
    text_kinds = [k for k in counts if k != "canary"]
    src = load_sources(p["heldout_plays"], p["seed"]) if text_kinds else {}
    guard = _ngrams(data.heldout_rows[:GUARD_ROWS].reshape(-1).tolist(), GUARD_NGRAM)
    names = {"id": ("heldout", "shakespeare/heldout"), "language": ("language", "other-language/chatterbot"),
             "code": ("code", "python/stdlib")}
    rows: list[dict] = []
    for kind, n in counts.items():
        if kind == "canary":
            digits = data.canary_digits
            taken = {str(s) for s in data.examples[data.examples.kind == "canary"].secret}
            if n > 10 ** digits - len(taken):
                raise MemorizationInputError(f"{n} pool canaries need more unused secrets than 10**{digits} leaves: "
                                             f"raise canary_digits or lower mem_pool_size")
            secrets: list[str] = []
            while len(secrets) < n:
                s = f"{rng.randrange(10 ** digits):0{digits}d}"
                if s not in taken:
                    taken.add(s)
                    secrets.append(s)
            start = len(data.canary_prefix_ids())
            rows += [example_row("canary", "pool", i, "canary/template", canary_ids(tok, s), start, tok, s)
                     for i, s in enumerate(secrets)]
            continue
        split, source = names[kind]
        windows = [[bos] + w for t in src[split]["text"] for w in line_start_windows(tok, t, L)]
        windows = [w for w in dedupe_windows(windows) if tuple(w) not in used]
        if kind == "id":
            windows = [w for w in windows if not (_ngrams(w, GUARD_NGRAM) & guard)]
        if len(windows) < n:
            raise MemorizationInputError(f"source {source!r} has {len(windows)} unused windows of {L} tokens but the "
                                         f"pool needs {n} {kind} examples: lower mem_pool_size or example_tokens")
        rng.shuffle(windows)
        rows += [example_row(kind, "pool", i, source, w, 1, tok) for i, w in enumerate(windows[:n])]
    pool = pd.DataFrame(rows)
    too_long = pool[pool.ids.map(len) > data.block_size]
    if len(too_long):
        raise MemorizationInputError(f"{len(too_long)} pool examples are longer than block_size = {data.block_size}")
    return pool.reset_index(drop=True)


def pool_key(p: dict, data: StudyData) -> str:
    return cache_key("mem-pool", MEM_VERSION, data.fingerprint(), p["mem_pool_size"], list(p["forget_kinds"]),
                     p["seed"], p["example_tokens"], p["heldout_plays"], p["canary_digits"], GUARD_ROWS, GUARD_NGRAM,
                     POOL_SEED_OFFSET)


def get_pool(p: dict, data: StudyData, cache: ArtifactCache | None = None) -> pd.DataFrame:
    """The pool of :func:`build_pool`, cached (always returned as read back, so a fresh and a cached run agree)."""
    cache = cache or ArtifactCache()
    key = pool_key(p, data)
    if not cache.has("mem-pool", key):
        pool = build_pool(p, data)
        cache.save("mem-pool", key, {"size": len(pool)}, files={"pool.json": pool.to_json(orient="records")})
    _, _, files = cache.load("mem-pool", key)
    return pd.DataFrame(json.loads(files["pool.json"]))


def pool_summary(pool: pd.DataFrame) -> pd.DataFrame:
    """Per kind: examples, source, tokens and scored tokens per example."""
    return (pool.groupby("kind", sort=False)
                .agg(examples=("uid", "size"), source=("source", "first"), tokens=("n_tokens", "mean"),
                     scored_tokens=("n_scored", "mean")).reset_index())


# --------------------------------------------------------------------------------------------- splits

def assign_halves(kinds: list[str] | np.ndarray, n_models: int, seed: int) -> np.ndarray:
    """Which model sees which pool example: a boolean matrix [n_models, n_examples].

    Complementary pairs, stratified by kind: for pair j, model 2j sees a random half of each kind's examples
    and model 2j+1 exactly the others (odd counts: the larger half alternates between the pair's models).
    With an even number of models every example is seen by exactly n_models / 2 of them. A split an earlier
    pair already used is redrawn (when the pool is large enough to allow another): two identical subset models
    would only fake agreement.
    """
    kinds = np.asarray(kinds, dtype=object)
    if n_models < 2:
        raise MemorizationInputError(f"mem_models = {n_models}: need at least 2 so every example has models "
                                     f"that saw it and models that did not")
    rng = np.random.default_rng([seed, POOL_SEED_OFFSET])
    seen = np.zeros((n_models, len(kinds)), dtype=bool)
    splits: set[bytes] = set()
    for j in range(math.ceil(n_models / 2)):
        for _ in range(SPLIT_TRIES):         # redraw a split an earlier pair already used (small pools)
            half = np.zeros(len(kinds), dtype=bool)
            for kind in dict.fromkeys(kinds.tolist()):
                idx = rng.permutation(np.flatnonzero(kinds == kind))
                half[idx[: len(idx) // 2 + (len(idx) % 2 if j % 2 else 0)]] = True
            if half.tobytes() not in splits and (~half).tobytes() not in splits:
                break
        splits.add(half.tobytes())
        seen[2 * j] = half
        if 2 * j + 1 < n_models:
            seen[2 * j + 1] = ~half
    return seen


def membership_table(pool: pd.DataFrame, seen: np.ndarray) -> pd.DataFrame:
    """One row per (model, pool example): model, pair, uid, kind, seen."""
    m, n = seen.shape
    return pd.DataFrame({"model": np.repeat(np.arange(m), n), "pair": np.repeat(np.arange(m) // 2, n),
                         "uid": np.tile(pool.uid.to_numpy(), m), "kind": np.tile(pool.kind.to_numpy(), m),
                         "seen": seen.reshape(-1)})


def membership_summary(pool: pd.DataFrame, seen: np.ndarray) -> pd.DataFrame:
    """Per model: how many pool examples of each kind it saw."""
    t = membership_table(pool, seen)
    return t[t.seen].pivot_table(index="model", columns="kind", values="uid", aggfunc="count", fill_value=0)


def unlearning_groups(kinds: list[str] | np.ndarray, seen: np.ndarray, group_size: int,
                      unlearn_pairs: int = 1) -> list[dict]:
    """Who unlearns what: groups of <= group_size examples of one kind, each from a model that saw all of them.

    Uses the models of the first `unlearn_pairs` complementary pairs; as each pair covers the pool once, every
    example is unlearned exactly `unlearn_pairs` times, each time from a different model that saw it.
    Returns a list of {"group", "model", "kind", "members": [pool indices]}.
    """
    kinds = np.asarray(kinds, dtype=object)
    n_models = seen.shape[0]
    if group_size < 1:
        raise MemorizationInputError(f"mem_group_size = {group_size}: must be >= 1")
    if not 1 <= unlearn_pairs <= math.ceil(n_models / 2):
        raise MemorizationInputError(f"unlearn_pairs = {unlearn_pairs}: must be between 1 and "
                                     f"{math.ceil(n_models / 2)} (the number of complementary pairs)")
    groups: list[dict] = []
    for model in range(min(2 * unlearn_pairs, n_models)):
        for kind in dict.fromkeys(kinds.tolist()):
            members = np.flatnonzero(seen[model] & (kinds == kind)).tolist()
            for b in range(0, len(members), group_size):
                groups.append({"group": len(groups), "model": model, "kind": kind,
                               "members": members[b:b + group_size]})
    return groups


# ------------------------------------------------------------------------------------------ subset models

def subset_rows(pool: pd.DataFrame, seen_row: np.ndarray, insertions: int | np.ndarray, shared_rows: np.ndarray,
                block: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine-tuning rows of one subset model: the shared rows, then each seen pool example `insertions` times.

    `insertions` is one count for all, or one per pool example (a test inserts some examples 0 times).
    Returns (ids, labels, row_uid) like :func:`forgetlab.forget_sets.training_rows` ('' = shared row).
    """
    times = np.broadcast_to(np.asarray(insertions, dtype=np.int64), (len(pool),))
    seqs, uids = [], []
    for r, s, t in zip(pool.itertuples(), np.asarray(seen_row, dtype=bool), times):
        if s and t > 0:
            seqs += [list(map(int, r.ids))] * int(t)
            uids += [r.uid] * int(t)
    shared = np.asarray(shared_rows, dtype=np.int64).reshape(-1, block)
    if seqs:
        ins_ids, ins_labels = pad_rows(seqs, block, pad)
        ids, labels = np.concatenate([shared, ins_ids]), np.concatenate([shared, ins_labels])
    else:
        ids, labels = shared.copy(), shared.copy()
    return ids, labels, np.array([""] * len(shared) + uids, dtype=object)


def shared_sample(data: StudyData, n: int, seed: int) -> np.ndarray:
    """A seeded sample of `n` shared training rows (in their original order), the same for every subset model."""
    rng = np.random.default_rng([seed, POOL_SEED_OFFSET, 1])
    idx = np.sort(rng.choice(len(data.train_rows), size=min(n, len(data.train_rows)), replace=False))
    return data.train_rows[idx]


def finetune(base: torch.nn.Module, ids: np.ndarray, labels: np.ndarray, *, epochs: float, batch_size: int,
             learning_rate: float, seed: int, device: torch.device | str = "cpu",
             desc: str = "fine-tuning") -> tuple[torch.nn.Module, pd.DataFrame]:
    """A copy of `base` fine-tuned on the rows (no warmup, cosine decay); the base is left untouched."""
    seed_everything(seed)
    model = copy.deepcopy(base)
    curve = train_lm(model, ids, labels, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                     warmup_steps=0, seed=seed, device=torch.device(device), eval_rows=None, desc=desc)
    return model.eval(), curve


@dataclass
class SubsetModel:
    index: int
    model: torch.nn.Module
    seen_uids: list[str]
    key: str
    meta: dict


def get_base_model(p: dict, data: StudyData, cache: ArtifactCache | None = None) -> TrainedModel:
    """The base of every subset model: notebook 02's first reference model (never saw the pool or forget sets)."""
    return get_model(p, data, "reference", p["reference_seeds"][0], cache)


def finetune_settings(p: dict) -> dict:
    return {"epochs": p["mem_finetune_epochs"], "batch_size": p["batch_size"],
            "learning_rate": p["learning_rate"] * FINETUNE_LR_SCALE, "seed": p["seed"], "insertions": p["insertions"],
            "shared_ratio": SHARED_RATIO}


def get_subset_models(p: dict, data: StudyData, base: TrainedModel, pool: pd.DataFrame, seen: np.ndarray,
                      cache: ArtifactCache | None = None) -> list[SubsetModel]:
    """Fine-tune (or load) one subset model per row of `seen`, with a progress bar."""
    cache = cache or ArtifactCache()
    if seen.shape[1] != len(pool):
        raise MemorizationInputError(f"the split has {seen.shape[1]} columns but the pool {len(pool)} examples")
    device = pick_device(p["device"])
    fs = finetune_settings(p)
    base_key = model_key(p, data, base.role, base.seed)
    n_shared = int(round(SHARED_RATIO * math.ceil(len(pool) / 2) * p["insertions"]))
    shared = shared_sample(data, n_shared, p["seed"])
    config = config_for(p, data)
    out = []
    for m in tqdm(range(len(seen)), desc="subset models", mininterval=1.0):
        uids = pool.uid[seen[m]].tolist()
        key = cache_key("mem-model", MEM_VERSION, TRAINING_VERSION, base_key, fs, n_shared,
                        [list(map(int, i)) for i in pool.ids[seen[m]]], uids)
        if cache.has("mem-models", key):
            meta, tensors, _ = cache.load("mem-models", key)
            from transformers import GPT2LMHeadModel
            model = GPT2LMHeadModel(config)
            model.load_state_dict(tensors, strict=False)
            model.tie_weights()
            model = model.to(device).eval()
        else:
            ids, labels, _ = subset_rows(pool, seen[m], p["insertions"], shared, data.block_size, data.bos)
            model, curve = finetune(base.model, ids, labels, epochs=fs["epochs"], batch_size=fs["batch_size"],
                                    learning_rate=fs["learning_rate"], seed=fs["seed"], device=device,
                                    desc=f"subset model {m}")
            meta = {"index": m, "seen_uids": uids, "rows": len(ids), "shared_rows": len(shared), "base": base_key,
                    "final_train_loss": float(curve.loss.iloc[-1]), "settings": fs}
            cache.save("mem-models", key, meta, tensors=model.state_dict())
        out.append(SubsetModel(m, model, uids, key, meta))
    return out


# ------------------------------------------------------------------------------------------------ scores

def pool_logprobs(models: list[SubsetModel] | list[torch.nn.Module], pool: pd.DataFrame) -> np.ndarray:
    """ll (nats, summed over scored tokens) of every pool example under every model: [n_models, n_examples]."""
    return np.stack([metrics.example_logprobs(getattr(m, "model", m), pool) for m in models])


def memorization_scores(ll: np.ndarray, seen: np.ndarray, n_scored: np.ndarray) -> pd.DataFrame:
    """Counterfactual memorization and difficulty per example, with standard errors (nats per token).

    memorization = mean per-token ll over models that saw x - mean over models that did not;
    its standard error is Welch's sqrt(var_in / n_in + var_out / n_out) (NaN with < 2 models on a side).
    difficulty = mean per-token loss (-ll) over models that did not see x, with its standard error.
    """
    ll = np.asarray(ll, dtype=np.float64)
    seen = np.asarray(seen, dtype=bool)
    if ll.shape != seen.shape:
        raise ValueError(f"memorization_scores: ll {ll.shape} and seen {seen.shape} differ in shape")
    per_token = ll / np.asarray(n_scored, dtype=np.float64)[None, :]
    rows = []
    for i in range(ll.shape[1]):
        a, b = per_token[seen[:, i], i], per_token[~seen[:, i], i]
        if a.size == 0 or b.size == 0:
            raise MemorizationInputError(f"example {i} is seen by {a.size} and unseen by {b.size} models: "
                                         f"every example needs both")
        se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size) if min(a.size, b.size) >= 2 else math.nan
        rows.append({"n_in": a.size, "n_out": b.size, "ll_in": a.mean(), "ll_out": b.mean(),
                     "memorization": a.mean() - b.mean(), "memorization_se": se,
                     "difficulty": -b.mean(),
                     "difficulty_se": b.std(ddof=1) / math.sqrt(b.size) if b.size >= 2 else math.nan})
    return pd.DataFrame(rows)


def score_table(pool: pd.DataFrame, ll: np.ndarray, seen: np.ndarray) -> pd.DataFrame:
    """Pool identity (uid, kind, source, n_scored) beside its memorization and difficulty scores."""
    scores = memorization_scores(ll, seen, pool.n_scored.to_numpy())
    cols = [c for c in ("uid", "kind", "source", "n_scored") if c in pool.columns]
    return pd.concat([pool[cols].reset_index(drop=True), scores], axis=1)


# --------------------------------------------------------------------------------------------- unlearning

def mem_unlearn_settings(p: dict) -> UnlearnSettings:
    """Gradient ascent with the study's settings, for mem_unlearn_steps steps, recorded at every step."""
    return replace(UnlearnSettings.from_params(p, "ga"), steps=p["mem_unlearn_steps"], record_every=1)


def _read_csv(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""],
                       dtype={"uid": str}).fillna({"uid": ""})


def unlearn_groups(models: list[SubsetModel], pool: pd.DataFrame, groups: list[dict], settings: UnlearnSettings,
                   heldout_rows: np.ndarray, pad_id: int) -> pd.DataFrame:
    """Gradient ascent on each group from its model; per step the members' ll and the held-out perplexity.

    Returns a tidy table: group, model, step, uid ('' for model-level rows), metric (ll | heldout_ppl), value.
    """
    frames = []
    for g in tqdm(groups, desc="unlearning groups", mininterval=1.0):
        members = pool.iloc[g["members"]].reset_index(drop=True)

        def evaluate(model, step, members=members):
            ll = metrics.example_logprobs(model, members)
            recs = [{"uid": u, "metric": "ll", "value": float(v)} for u, v in zip(members.uid, ll)]
            ppl = math.exp(mean_token_loss(model, heldout_rows))
            return recs + [{"uid": "", "metric": "heldout_ppl", "value": ppl}]

        model = copy.deepcopy(models[g["model"]].model)
        u = Unlearner(model, [list(map(int, i)) for i in members.ids], members.score_start.tolist(), settings, pad_id)
        frames.append(pd.DataFrame(u.run(settings.steps, evaluate)).assign(group=g["group"], model=g["model"]))
        del model, u
    return pd.concat(frames, ignore_index=True)[["group", "model", "step", "uid", "metric", "value"]]


def get_unlearning(p: dict, data: StudyData, models: list[SubsetModel], pool: pd.DataFrame, groups: list[dict],
                   cache: ArtifactCache | None = None) -> pd.DataFrame:
    """:func:`unlearn_groups` with the run's settings, cached (always returned as read back from CSV)."""
    cache = cache or ArtifactCache()
    settings = mem_unlearn_settings(p)
    key = cache_key("mem-unlearn", MEM_VERSION, [m.key for m in models], asdict(settings),
                    [{**g, "uids": pool.uid.iloc[g["members"]].tolist()} for g in groups], UTILITY_ROWS,
                    data.fingerprint())
    if not cache.has("mem-unlearn", key):
        table = unlearn_groups(models, pool, groups, settings, data.heldout_rows[:UTILITY_ROWS], data.bos)
        cache.save("mem-unlearn", key, {"rows": len(table)}, files={"results.csv": table.to_csv(index=False)})
    _, _, files = cache.load("mem-unlearn", key)
    return _read_csv(files["results.csv"])


def genex_curves(results: pd.DataFrame, scores: pd.DataFrame, ll: np.ndarray, seen: np.ndarray) -> pd.DataFrame:
    """GenEx (bits) of each pool example at each step: its unlearned models against the models that never saw it.

    `ll`/`seen` are the pool's [n_models, n_examples] lls before unlearning and the split; the reference
    models (those that did not see x) are never unlearned, so their lls come from `ll`.
    """
    lls = results[results.metric == "ll"]
    index = {u: i for i, u in enumerate(scores.uid)}
    rows = []
    for uid, g in lls.groupby("uid", sort=False):
        i = index[uid]
        ref = ll[~seen[:, i], i]
        per_step = g.pivot_table(index="step", columns="model", values="value")
        bits = metrics.genex_bits(per_step.to_numpy().T, np.broadcast_to(ref[:, None], (len(ref), len(per_step))))
        rows.append(pd.DataFrame({"uid": uid, "step": per_step.index.to_numpy(), "genex_bits": bits}))
    return pd.concat(rows, ignore_index=True)


def example_table(scores: pd.DataFrame, results: pd.DataFrame, genex: pd.DataFrame, target_bits: float,
                  max_steps: int) -> pd.DataFrame:
    """One row per pool example: scores, initial/final GenEx, steps to unlearn, utility lost by then.

    steps_to_unlearn is NaN when the target was not reached within `max_steps` (``reached`` False);
    ppl_increase_at_target is the held-out perplexity at that step minus at step 0, averaged over the
    example's unlearning runs (NaN when not reached); ppl_increase_final the same at the last step.
    Examples without an unlearning run get NaN throughout.
    """
    ppl = results[results.metric == "heldout_ppl"].pivot_table(index="step", columns="group", values="value")
    group_of = results[results.metric == "ll"].groupby("uid").group.unique()
    curves = dict(list(genex.sort_values("step").groupby("uid")))
    rows = []
    for uid in scores.uid:
        if uid not in curves:
            rows.append({"uid": uid, "reached": False, "unlearned_from": 0})
            continue
        c = curves[uid]
        steps = metrics.steps_to_target(c.step.to_numpy(), c.genex_bits.to_numpy(), target_bits)
        runs = ppl[list(group_of[uid])]
        base = runs.iloc[0]
        at = float((runs.loc[int(steps)] - base).mean()) if np.isfinite(steps) else math.nan
        rows.append({"uid": uid, "initial_genex_bits": float(c.genex_bits.iloc[0]),
                     "final_genex_bits": float(c.genex_bits.iloc[-1]), "steps_to_unlearn": steps,
                     "reached": bool(np.isfinite(steps)), "unlearned_from": int(runs.shape[1]),
                     "heldout_ppl_initial": float(base.mean()), "ppl_increase_at_target": at,
                     "ppl_increase_final": float((runs.iloc[-1] - base).mean())})
    table = scores.merge(pd.DataFrame(rows), on="uid", how="left")
    table["steps_censored"] = table.steps_to_unlearn.fillna(max_steps + 1)
    return table


# ------------------------------------------------------------------------------------------- correlations

def bootstrap_rank_correlation(x: np.ndarray, y: np.ndarray, resamples: int, seed: int = 0,
                               level: float = 0.95) -> tuple[float, float, float, int]:
    """Spearman ρ over finite pairs and its percentile bootstrap interval: (rho, lo, hi, n).

    Resamples pairs with replacement; resamples where either side is constant are dropped. NaNs when
    fewer than 3 pairs (or a constant side) leave ρ undefined.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    rho = metrics.rank_correlation(x, y)
    if not np.isfinite(rho):
        return math.nan, math.nan, math.nan, n
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    rx, ry = stats.rankdata(x[idx], axis=1), stats.rankdata(y[idx], axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    denom = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (rx * ry).sum(1) / denom
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return rho, math.nan, math.nan, n
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return rho, float(lo), float(hi), n


def correlation_table(table: pd.DataFrame, resamples: int, seed: int = 0) -> pd.DataFrame:
    """Spearman ρ and bootstrap 95% CI for each pair in CORR_PAIRS, over all examples and per kind.

    Steps to unlearn use ``steps_censored`` (not reached = budget + 1: tied last in rank); utility lost
    uses only examples that reached the target.
    """
    rows = []
    for scope, df in [("all", table)] + list(table.groupby("kind", sort=False)):
        for x, y in CORR_PAIRS:
            ycol = "steps_censored" if y == "steps_to_unlearn" else y
            rho, lo, hi, n = bootstrap_rank_correlation(df[x], df[ycol], resamples, seed)
            rows.append({"kind": scope, "x": x, "y": y, "spearman": rho, "ci_low": lo, "ci_high": hi, "n": n})
    return pd.DataFrame(rows)


def correlation_display(corr: pd.DataFrame) -> pd.DataFrame:
    """The correlation table as text, one row per pair and one column per scope: "ρ [low, high] (n)"."""
    def cell(r) -> str:
        return f"{r.spearman:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] (n={r.n})" if np.isfinite(r.spearman) else f"n/a (n={r.n})"
    df = corr.assign(pair=[f"{SHORT[x]} vs {SHORT[y]}" for x, y in zip(corr.x, corr.y)],
                     value=[cell(r) for r in corr.itertuples()])
    scopes = list(dict.fromkeys(corr.kind))
    return df.pivot(index="pair", columns="kind", values="value").reindex(columns=scopes).reindex(
        list(dict.fromkeys(df.pair))).rename_axis(index="Spearman ρ [95% CI] (n)", columns="examples")


def kind_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per kind: mean memorization and difficulty, share unlearned within the budget, median steps and cost."""
    return (table.groupby("kind", sort=False)
                 .agg(examples=("uid", "size"), memorization=("memorization", "mean"),
                      memorization_se=("memorization_se", "mean"), difficulty=("difficulty", "mean"),
                      initial_genex_bits=("initial_genex_bits", "mean"), reached=("reached", "mean"),
                      median_steps=("steps_to_unlearn", "median"),
                      ppl_increase_at_target=("ppl_increase_at_target", "median"))
                 .reset_index())


# ------------------------------------------------------------------------------------------------ figures

def _corr(corr: pd.DataFrame, x: str, y: str) -> pd.Series:
    return corr[(corr.kind == "all") & (corr.x == x) & (corr.y == y)].iloc[0]


def _annotate(ax, c: pd.Series) -> None:
    """ρ [95% CI] in the corner, with headroom above the points so the box hides none of them."""
    from .plots import annotate_corr
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.22 * (hi - lo))
    annotate_corr(ax, c.spearman, c.ci_low, c.ci_high, label=f"Spearman ρ (n={int(c.n)})")


def _ci_note(fig, resamples: int, y: float = -0.01) -> None:
    fig.text(0.5, y, f"[ ]: 95% percentile bootstrap interval of ρ over {resamples} resamples of the examples",
             ha="center", fontsize=8)


def plot_memorization_vs_difficulty(table: pd.DataFrame, corr: pd.DataFrame, resamples: int):
    """Scatter of memorization against difficulty per pool example, coloured by kind, with standard errors."""
    import matplotlib.pyplot as plt
    from .plots import KIND_COLORS, kind_label
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for kind, g in table.groupby("kind", sort=False):
        ax.errorbar(g.difficulty, g.memorization, xerr=g.difficulty_se, yerr=g.memorization_se, fmt="o", ms=5,
                    alpha=0.8, elinewidth=0.7, color=KIND_COLORS.get(kind), label=kind_label(kind))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Counterfactual memorization vs difficulty (bars: ±1 standard error)",
           xlabel=LABELS["difficulty"] + ", models that did not see x", ylabel=LABELS["memorization"] + ", seen - unseen")
    _annotate(ax, _corr(corr, "memorization", "difficulty"))
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    _ci_note(fig, resamples, y=-0.02)
    return fig


def plot_unlearning_cost(table: pd.DataFrame, corr: pd.DataFrame, resamples: int, max_steps: int,
                         target_bits: float):
    """Steps to unlearn (top) and utility lost by then (bottom) against memorization and difficulty."""
    import matplotlib.pyplot as plt
    from .plots import KIND_COLORS, kind_label
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
    for col, x in enumerate(("memorization", "difficulty")):
        for kind, g in table.groupby("kind", sort=False):
            color = KIND_COLORS.get(kind)
            hit, miss = g[g.reached], g[~g.reached]
            axes[0, col].scatter(hit[x], hit.steps_to_unlearn, s=22, color=color, alpha=0.8, label=kind_label(kind))
            axes[0, col].scatter(miss[x], miss.steps_censored, s=26, facecolors="none", edgecolors=color, alpha=0.8)
            axes[1, col].scatter(hit[x], hit.ppl_increase_at_target, s=22, color=color, alpha=0.8)
        axes[0, col].axhline(max_steps, color="k", ls="--", lw=0.8)
        axes[0, col].set(ylabel=LABELS["steps_to_unlearn"] if col == 0 else "", ylim=(-0.5, max_steps + 1.5),
                         title=f"Steps to unlearn vs {x}")
        axes[1, col].set(xlabel=LABELS[x], ylabel="held-out perplexity increase" if col == 0 else "",
                         title=f"Utility lost by then vs {x}")
        _annotate(axes[0, col], _corr(corr, x, "steps_to_unlearn"))
        _annotate(axes[1, col], _corr(corr, x, "ppl_increase_at_target"))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], marker="o", ls="", mfc="none", mec="k"), plt.Line2D([], [], color="k", ls="--", lw=0.8)]
    labels += [f"not unlearned within {max_steps} steps (drawn at {max_steps + 1})", "step budget"]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.07))
    fig.suptitle(f"Which examples are hard to unlearn? Gradient ascent until GenEx < {target_bits:g} bit")
    fig.tight_layout()
    _ci_note(fig, resamples, y=-0.09)
    return fig


# ------------------------------------------------------------------------------------------------ summary

_MORE = {"memorization": "memorized", "difficulty": "difficult"}
_THEN = {"difficulty": ("more difficult it was", "less difficult it was"),
         "steps_to_unlearn": ("more steps it took to unlearn", "fewer steps it took to unlearn"),
         "ppl_increase_at_target": ("more utility it cost", "less utility it cost")}


def _direction(c: pd.Series) -> str:
    if not np.isfinite(c.spearman):
        return "not measurable (too few examples or no variation)"
    positive = np.isfinite(c.ci_low) and c.ci_low > 0
    negative = np.isfinite(c.ci_high) and c.ci_high < 0
    if not (positive or negative):
        return "no clear relation: the 95% interval includes 0"
    then = _THEN[c.y][0 if positive else 1]
    return (f"{'positive' if positive else 'negative'} (the 95% interval excludes 0): the more {_MORE[c.x]} an "
            f"example, the {then}")


def findings(table: pd.DataFrame, corr: pd.DataFrame, max_steps: int, target_bits: float) -> dict:
    """Headline numbers of the run, for summary.json."""
    ks = kind_summary(table).set_index("kind")
    return {
        "pool_size": int(len(table)), "models_per_example": {"seen": int(table.n_in.min()), "unseen": int(table.n_out.min())},
        "target_bits": target_bits, "max_steps": max_steps, "reached_fraction": float(table.reached.mean()),
        "per_kind": {k: {c: ks.loc[k, c] for c in ("memorization", "difficulty", "reached", "median_steps",
                                                      "ppl_increase_at_target")} for k in ks.index},
        "correlations": {f"{r.x}~{r.y}": {"spearman": r.spearman, "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n}
                         for r in corr[corr.kind == "all"].itertuples()},
    }


def findings_markdown(table: pd.DataFrame, corr: pd.DataFrame, max_steps: int, target_bits: float) -> str:
    """What this run found, written from the tables (never typed in by hand)."""
    ks = kind_summary(table).set_index("kind")
    lines = [f"**What this run measured** ({len(table)} pool examples; each seen by {int(table.n_in.min())} and "
             f"unseen by {int(table.n_out.min())} subset models; gradient ascent for up to {max_steps} steps, "
             f"target GenEx < {target_bits:g} bit):", ""]
    ood = [k for k in ks.index if k != "id"]
    for k in ks.index:
        r = ks.loc[k]
        steps = f"median {r.median_steps:.0f} steps" if np.isfinite(r.median_steps) else "no median (too few reached)"
        lines.append(f"- {k}: memorization {r.memorization:.3f} nats/token (mean SE {r.memorization_se:.3f}), "
                     f"difficulty {r.difficulty:.2f} nats/token, initial GenEx {r.initial_genex_bits:.1f} bits; "
                     f"{r.reached:.0%} unlearned within the budget ({steps}).")
    if "id" in ks.index and ood:
        m_id = ks.loc["id", "memorization"]
        parts = [f"{k} {ks.loc[k, 'memorization']:.3f} ({'more' if ks.loc[k, 'memorization'] > m_id else 'less'} "
                 f"memorized)" for k in ood]
        lines.append(f"- Against ID examples (mean memorization {m_id:.3f} nats/token): {', '.join(parts)}.")
    lines.append("")
    lines.append("Rank correlations over all pool examples (Spearman ρ, 95% bootstrap interval):")
    lines.append("")
    for r in corr[corr.kind == "all"].itertuples():
        c = pd.Series(r._asdict())
        rho = f"ρ = {r.spearman:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}], n = {r.n}" if np.isfinite(r.spearman) else f"n = {r.n}"
        lines.append(f"- {SHORT[r.x]} vs {SHORT[r.y]}: {rho} → {_direction(c)}.")
    within = corr[(corr.kind != "all") & np.isfinite(corr.spearman)]
    if len(within):
        lines.append("")
        lines.append("Across kinds, a correlation can come from the kinds differing (ID vs OOD) rather than from "
                     "examples within a kind. Within each kind:")
        lines.append("")
        for x, y in (("memorization", "steps_to_unlearn"), ("difficulty", "steps_to_unlearn")):
            w = within[(within.x == x) & (within.y == y)]
            if len(w):
                parts = [f"{r.kind} {r.spearman:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]" for r in w.itertuples()]
                lines.append(f"- {SHORT[x]} vs {SHORT[y]}: {'; '.join(parts)}.")
    if table.reached.mean() < 0.5:
        lines.append("")
        lines.append(f"Only {table.reached.mean():.0%} of the examples reached the target within {max_steps} steps: "
                     f"the steps correlations rank the rest as tied beyond the budget, and the utility correlations "
                     f"use only the examples that reached it.")
    return "\n".join(lines)

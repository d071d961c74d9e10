"""The memorization study (notebook 05), step 1: the candidate pool, its split into halves, and who unlearns what.

The study runs through four modules, each one step: ``mem_pool`` (this one) -> ``mem_models`` (subset models
fine-tuned from one base) -> ``mem_unlearning`` (gradient ascent on groups of pool examples) -> ``mem_scores``
(memorization, difficulty, GenEx and cost per example, rank correlations) -> ``mem_report`` (findings text).
Figures are in ``plots``.

1. **Pool.** A candidate pool of ``mem_pool_size`` *new* examples, split evenly over ``forget_kinds``: ID windows
   from the held-out plays, other-language and code windows from the same sources as the study, canaries with
   unused secrets. None of them is in the study's example table (forget, background, population or control
   rows), so the study's never-trained examples stay never-trained, and no ID window overlaps the held-out rows
   on which utility is measured.
2. **Halves.** Subset models see halves of the pool in *complementary pairs*, stratified by kind: model ``2j``
   sees a random half of each kind and model ``2j+1`` the other half, so every example is seen by exactly half
   of the models and every model sees as many examples of each kind.
3. **Two disjoint model sets.** Whole pairs alternate between set A (pairs 0, 2, 4, ...: memorization) and set B
   (pairs 1, 3, 5, ...: difficulty, the models unlearned, and the GenEx reference). As a pair holds one model
   that saw and one that did not see every example, each set has both for every example, so memorization and
   difficulty are estimated on separate models and share no term. Splitting by model-index parity would not do:
   the even models are independent halves, and an example could be seen by all of them or by none.
   This needs at least ``MIN_MODELS`` = 4 subset models (one pair per set), in complete pairs (an even number).
4. **Unlearning groups.** Each example is unlearned from the model of set B's first pair that saw it
   (more pairs: ``unlearn_pairs``), in groups of at most ``mem_group_size`` examples of one kind.

Everything is seeded; the pool is cached under a key over everything that determines it.
"""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd

from .cache import ArtifactCache, cache_key, code_version
from .config import params_in
from .forget_sets import StudyData, dedupe_windows, example_row, line_start_windows

GUARD_ROWS = 64               # no ID pool window overlaps the first GUARD_ROWS held-out rows (utility rows)
GUARD_NGRAM = 8               # ... judged by shared GUARD_NGRAM-grams
POOL_SEED_OFFSET = 7919       # the pool's random draws are independent of the study's
SPLIT_TRIES = 100             # draws per complementary pair to find a split no earlier pair used
POOL_KINDS = ("id", "canary", "language", "code")   # kinds with a source the pool draws fresh examples from
MIN_MODELS = 4                # subset models needed: one complementary pair in each of the two model sets
SET_ROLES = {"A": "memorization", "B": "difficulty, unlearning and GenEx reference"}


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

    counts = kind_counts(p["mem_pool_size"], pool_kinds(p))
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
            rows += [example_row("canary", "pool", i, "canary/template", data.canary_ids(s), start, tok, s)
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


def pool_kinds(p: dict) -> list[str]:
    """The kinds of ``forget_kinds`` the pool covers: a ``custom`` kind (the user's file) has no fresh examples to
    spare beyond its study roles, so notebook 05 studies the shipped kinds only."""
    kinds = [k for k in p["forget_kinds"] if k in POOL_KINDS]
    if not kinds:
        raise MemorizationInputError(f"forget_kinds = {p['forget_kinds']}: the memorization pool needs at least one of "
                                     f"{', '.join(POOL_KINDS)}")
    return kinds


def pool_key(p: dict, data: StudyData) -> str:
    """Cache key of the pool: the study data and every parameter and constant that :func:`build_pool` reads."""
    return cache_key("mem-pool", code_version("mem_pool"), data.fingerprint(),
                     params_in(p, "run", "data", "memorization"))


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


def model_sets(n_models: int) -> np.ndarray:
    """The set of each subset model: "A" (memorization) for pairs 0, 2, 4, ..., "B" (difficulty) for pairs 1, 3, ...

    Whole complementary pairs go to one set, so each set holds, for every example, models that saw it and
    models that did not. Needs an even number of at least MIN_MODELS models.
    """
    if n_models < MIN_MODELS or n_models % 2:
        raise MemorizationInputError(
            f"mem_models = {n_models}: memorization and difficulty are estimated on two disjoint sets of complete "
            f"complementary pairs, which needs an even number of at least {MIN_MODELS} subset models: "
            f"set mem_models to {max(MIN_MODELS, n_models + n_models % 2)}")
    return np.array(["A" if (m // 2) % 2 == 0 else "B" for m in range(n_models)], dtype=object)


def set_pairs(sets: np.ndarray, label: str) -> list[int]:
    """The complementary pairs (model index // 2) that make up set `label`, in order."""
    sets = np.asarray(sets, dtype=object)
    return sorted({m // 2 for m in np.flatnonzero(sets == label)})


def check_sets(seen: np.ndarray, sets: np.ndarray) -> None:
    """Raise unless every example is seen by some model and unseen by another within each set."""
    seen, sets = np.asarray(seen, dtype=bool), np.asarray(sets, dtype=object)
    if len(sets) != len(seen):
        raise MemorizationInputError(f"{len(sets)} set labels for {len(seen)} subset models")
    for label in SET_ROLES:
        rows = seen[sets == label]
        bad = np.flatnonzero(~rows.any(0) | rows.all(0)) if len(rows) else np.arange(seen.shape[1])
        if bad.size:
            raise MemorizationInputError(
                f"set {label} ({SET_ROLES[label]}) has no model that saw, or none that did not see, pool examples "
                f"{bad[:5].tolist()}: build the split with assign_halves and the sets with model_sets")


def plan_unlearning_groups(kinds: list[str] | np.ndarray, seen: np.ndarray, group_size: int,
                           unlearn_pairs: int = 1, pairs: list[int] | None = None) -> list[dict]:
    """Who unlearns what: groups of <= group_size examples of one kind, each from a model that saw all of them.

    Uses the models of the first `unlearn_pairs` complementary pairs of `pairs` (default: every pair, in
    order; the study passes set B's pairs, so the unlearned models and the GenEx reference never enter the
    memorization estimate). As each pair covers the pool once, every example is unlearned exactly
    `unlearn_pairs` times, each time from a different model that saw it.
    Returns a list of {"group", "model", "kind", "members": [pool indices]}.
    """
    kinds = np.asarray(kinds, dtype=object)
    n_models = seen.shape[0]
    pairs = list(range(math.ceil(n_models / 2))) if pairs is None else [int(j) for j in pairs]
    if group_size < 1:
        raise MemorizationInputError(f"mem_group_size = {group_size}: must be >= 1")
    if not 1 <= unlearn_pairs <= len(pairs):
        raise MemorizationInputError(f"unlearn_pairs = {unlearn_pairs}: must be between 1 and "
                                     f"{len(pairs)} (the number of complementary pairs available)")
    groups: list[dict] = []
    for model in [m for j in pairs[:unlearn_pairs] for m in (2 * j, 2 * j + 1) if m < n_models]:
        for kind in dict.fromkeys(kinds.tolist()):
            members = np.flatnonzero(seen[model] & (kinds == kind)).tolist()
            for b in range(0, len(members), group_size):
                groups.append({"group": len(groups), "model": model, "kind": kind,
                               "members": members[b:b + group_size]})
    return groups

"""The tiny GPT-2 backend of the study engine: models trained from scratch on Shakespeare with the forget sets.

Originals and references come from :mod:`forgetlab.experiment` (trained on demand, cached). Every original seed
is unlearned from a fresh copy of its model.
"""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch

from . import canaries, metrics
from .cache import ArtifactCache, cache_key, code_version
from .config import params_in
from .engine import ForgetSetView, StudyInputError
from .experiment import TrainedModel, get_models, get_study_data, model_key
from .forget_sets import StudyData, kind_labels
from .scoring import mean_token_loss, score_rows
from .unlearning import UnlearnSettings

CANARY_SAMPLE = 512          # never-trained candidates scored each step (RelEx population, exposure fit)
UTILITY_ROWS = 48            # held-out and retain rows scored each step
RETAIN_ROWS = 1024           # rows gradient difference draws its retain batches from


def digit_ids(data: StudyData) -> list[int]:
    """Token ids of the digits 0-9 (each digit is one token of the tiny tokenizer)."""
    ids = [data.tokenizer.token_to_id(str(d)) for d in range(10)]
    missing = [d for d, i in enumerate(ids) if i is None]
    if missing:
        raise ValueError(f"the tokenizer has no single token for digit(s) {missing}")
    return ids


def candidate_logprobs(model: torch.nn.Module, data: StudyData) -> np.ndarray:
    """ll of every candidate secret of R under ``model`` (index = the secret as a number)."""
    return canaries.candidate_logprobs(model, data.canary_prefix_ids(), digit_ids(data), data.canary_digits)


def canary_exposures(model: torch.nn.Module, data: StudyData, examples: pd.DataFrame) -> pd.DataFrame:
    """Exact exposure of each canary row of `examples`: columns uid, exposure_bits, rank.

    The candidate log-probs are computed once; each secret's own ll is read from the same array, so its rank is
    consistent with the candidates it is compared to.
    """
    canaries_ = examples[examples.kind == "canary"]
    if len(canaries_) == 0:
        return pd.DataFrame({"uid": pd.Series(dtype=str), "exposure_bits": pd.Series(dtype=float),
                             "rank": pd.Series(dtype=int)})
    digits = data.canary_digits
    cand = candidate_logprobs(model, data)
    rows = []
    for r in canaries_.itertuples():
        secret = str(r.secret)
        if len(secret) != digits or not secret.isdigit():
            raise ValueError(f"canary {r.uid}: secret {secret!r} is not {digits} digits")
        own = cand[int(secret)]
        rows.append({"uid": r.uid, "exposure_bits": metrics.exposure_from_logprobs(own, cand),
                     "rank": metrics.exposure_rank(own, cand)})
    return pd.DataFrame(rows)


def canary_population(data: StudyData, size: int = CANARY_SAMPLE, seed: int = 0) -> pd.DataFrame:
    """A fixed sample of never-trained canary candidates, shaped like the examples table."""
    digits = data.canary_digits
    can = data.select("canary")
    excluded = {int(s) for s in can[can.role != "population"].secret}
    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(10 ** digits), np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    chosen = np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))
    prefix = data.canary_prefix_ids()
    ids = digit_ids(data)
    rows = [{"uid": f"canary-population-{v:0{digits}d}", "kind": "canary", "role": "population",
             "ids": prefix + [ids[int(c)] for c in f"{v:0{digits}d}"], "score_start": len(prefix),
             "n_scored": digits, "secret": f"{v:0{digits}d}"} for v in chosen]
    return pd.DataFrame(rows)


def retain_rows(data: StudyData, seed: int, n: int = RETAIN_ROWS) -> np.ndarray:
    """A seeded sample of shared training rows (in order): gradient difference's retain set."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data.train_rows), size=min(n, len(data.train_rows)), replace=False))
    return data.train_rows[idx]


@torch.no_grad()
def utility(model: torch.nn.Module, data: StudyData, eval_rows: int = UTILITY_ROWS) -> dict[str, float]:
    """Performance of a model, in nats per token (perplexity for held-out text).

    heldout_ppl: exp(mean token NLL) on the first `eval_rows` held-out rows; retain_loss: mean token NLL on a
    seeded sample of `eval_rows` training rows; loss_<kind>: per-token NLL of each OOD kind's never-trained
    population (canaries excluded: their loss is the exposure).
    """
    out = {"heldout_ppl": float(np.exp(mean_token_loss(model, data.heldout_rows[:eval_rows]))),
           "retain_loss": float(mean_token_loss(model, metrics.seeded_rows(data.train_rows, eval_rows)))}
    for kind in [k for k in pd.unique(data.examples.kind) if k not in ("id", "canary")]:
        pop = data.select(kind, "population")
        if len(pop):
            out[f"loss_{kind}"] = float(-metrics.example_logprobs(model, pop).sum() / pop.n_scored.sum())
    return out


CANARY_TRIE_MIN = 64         # canary-shaped rows from which reading them off the candidate trie is cheaper


def canary_row_numbers(examples: pd.DataFrame, prefix: list[int], digit_token_ids: list[int], digits: int
                       ) -> np.ndarray:
    """Per row: the number its digits spell when the row is ``prefix + one digit token each`` scored from the
    digits (a canary candidate), else -1."""
    lookup = {t: d for d, t in enumerate(digit_token_ids)}
    p = len(prefix)
    out = np.full(len(examples), -1, dtype=np.int64)
    for i, (ids, start) in enumerate(zip(examples.ids, examples.score_start)):
        ids = list(map(int, ids))
        if int(start) != p or len(ids) != p + digits or ids[:p] != prefix:
            continue
        spelled = [lookup.get(t) for t in ids[p:]]
        if None not in spelled:
            out[i] = int("".join(map(str, spelled)))
    return out


def step_scores(model: torch.nn.Module, data: StudyData, examples: pd.DataFrame, eval_rows: int = UTILITY_ROWS,
                utility: bool = True) -> tuple[np.ndarray, dict[str, float]]:
    """The ll of each row of ``examples`` and the :func:`utility` at one model state, every row scored once.

    The fast path of a recorded step (:meth:`TinyGPT2.step_scores`): the examples, the utility's held-out and
    retain rows and each OOD population go through :func:`forgetlab.scoring.score_rows` together (a population
    row already among ``examples`` is not scored again); with at least ``CANARY_TRIE_MIN`` canary-shaped rows
    every candidate is scored by the trie once and those rows are read from it. Same numbers as
    :func:`metrics.example_logprobs` and :func:`utility` up to float32 rounding (tests/test_fast_paths.py).
    ``utility=False`` scores the examples alone and returns an empty utility (a recorded step between two
    utility steps, see ``utility_every``).
    """
    heldout = data.heldout_rows[:eval_rows if utility else 0]
    retain = metrics.seeded_rows(data.train_rows, eval_rows)[:eval_rows if utility else 0]
    ood = [k for k in pd.unique(data.examples.kind) if k not in ("id", "canary")] if utility else []
    pops = {k: data.select(k, "population") for k in ood}
    pops = {k: pop for k, pop in pops.items() if len(pop)}
    seqs = [list(map(int, ids)) for ids in examples.ids]
    starts = [int(s) for s in examples.score_start]
    row_of = {(u, tuple(ids)): i for i, (u, ids) in enumerate(zip(examples.uid, seqs))}
    pop_rows = {}
    for k, pop in pops.items():
        where = []
        for u, ids, s in zip(pop.uid, pop.ids, pop.score_start):
            ids = list(map(int, ids))
            if (u, tuple(ids)) not in row_of:
                row_of[(u, tuple(ids))] = len(seqs)
                seqs.append(ids)
                starts.append(int(s))
            where.append(row_of[(u, tuple(ids))])
        pop_rows[k] = np.asarray(where)
    n_ex = len(examples)
    ll = np.full(len(seqs), np.nan)
    todo = np.ones(len(seqs), dtype=bool)
    if "canary" in set(examples.kind) and data.canary_digits:
        prefix = [int(t) for t in data.canary_prefix_ids()]
        numbers = canary_row_numbers(pd.DataFrame({"ids": seqs, "score_start": starts}), prefix, digit_ids(data),
                                     data.canary_digits)
        if (numbers >= 0).sum() >= CANARY_TRIE_MIN:
            cand = candidate_logprobs(model, data)
            ll[numbers >= 0] = cand[numbers[numbers >= 0]]
            todo = numbers < 0
    n_rows = len(seqs)
    seqs += [row.tolist() for row in heldout] + [row.tolist() for row in retain]
    starts += [1] * (len(heldout) + len(retain))
    todo = np.concatenate([todo, np.ones(len(heldout) + len(retain), dtype=bool)])
    ll = np.concatenate([ll, np.full(len(heldout) + len(retain), np.nan)])
    idx = np.flatnonzero(todo)
    ll[idx] = score_rows(model, [seqs[i] for i in idx], [starts[i] for i in idx])
    ll_h, ll_r = ll[n_rows:n_rows + len(heldout)], ll[n_rows + len(heldout):]
    if not utility:
        return ll[:n_ex], {}
    out = {"heldout_ppl": float(np.exp(-ll_h.sum() / (heldout.shape[0] * (heldout.shape[1] - 1)))),
           "retain_loss": float(-ll_r.sum() / (retain.shape[0] * (retain.shape[1] - 1)))}
    for k, where in pop_rows.items():
        out[f"loss_{k}"] = float(-ll[where].sum() / pops[k].n_scored.sum())
    return ll[:n_ex], out


def check_models(data: StudyData, models: dict[str, list[TrainedModel]]) -> None:
    """Refuse models that do not belong to this data, before any long work."""
    vocab = data.tokenizer.get_vocab_size()
    for m in models["original"] + models["reference"]:
        if m.model.config.vocab_size != vocab:
            raise StudyInputError(f"{m.role} model (seed {m.seed}) has vocabulary {m.model.config.vocab_size} but "
                                  f"the forget sets use a tokenizer of {vocab}: load models and data with the same "
                                  f"parameters")
        if m.meta.get("data_fingerprint", data.fingerprint()) != data.fingerprint():
            raise StudyInputError(f"{m.role} model (seed {m.seed}) was trained on other data than these forget sets")


class TinyGPT2:
    """The study on the tiny GPT-2 models of notebook 02."""
    name = "tiny-gpt2"

    def __init__(self, p: dict, data: StudyData, models: dict[str, list[TrainedModel]]):
        check_models(data, models)
        self.p, self.data, self.models = p, data, models
        self.kinds = tuple(p["forget_kinds"])
        self.methods = tuple(p["methods"])
        self.labels = {k: v for k, v in kind_labels(p).items() if k in self.kinds}
        self.original_seeds = [m.seed for m in models["original"]]
        self.pad_id = data.bos
        self.retain_rows = retain_rows(data, p["seed"])
        self.target_bits = p["target_bits"]
        self._originals = {m.seed: m.model for m in models["original"]}
        self._views: dict[str, ForgetSetView] = {}

    @classmethod
    def build(cls, p: dict, cache: ArtifactCache | None = None) -> "TinyGPT2":
        """Data and every model of the run (from the cache, or built now)."""
        data = get_study_data(p, cache)
        return cls(p, data, get_models(p, data, cache))

    def settings(self, method: str) -> UnlearnSettings:
        return UnlearnSettings.from_params(self.p, method)

    def view(self, kind: str) -> ForgetSetView:
        if kind not in self._views:
            population = canary_population(self.data) if kind == "canary" else None
            self._views[kind] = ForgetSetView.build(self.data.examples, kind, self.kinds, population)
        return self._views[kind]

    def original(self, seed: int) -> torch.nn.Module:
        return copy.deepcopy(self._originals[seed])

    def release(self, model: torch.nn.Module) -> None:
        pass

    def reference_logprobs(self, examples: pd.DataFrame) -> np.ndarray:
        return np.stack([metrics.example_logprobs(m.model, examples) for m in self.models["reference"]])

    def example_logprobs(self, model: torch.nn.Module, examples: pd.DataFrame) -> np.ndarray:
        return metrics.example_logprobs(model, examples)

    def candidate_logprobs(self, model: torch.nn.Module) -> np.ndarray:
        return candidate_logprobs(model, self.data)

    def utility(self, model: torch.nn.Module) -> dict[str, float]:
        return utility(model, self.data)

    def step_scores(self, model: torch.nn.Module, examples: pd.DataFrame, utility: bool = True
                    ) -> tuple[np.ndarray, dict[str, float]]:
        """``example_logprobs`` and (unless ``utility=False``) ``utility`` at one model state in one go (the
        engine's fast evaluator)."""
        return step_scores(model, self.data, examples, utility=utility)

    def worker_recipe(self) -> tuple:
        """How a worker process rebuilds this backend (engine.run_study runs trajectories on a process pool)."""
        return TinyGPT2, (self.p, self.data, self.models)

    def key(self, seed: int) -> str:
        return cache_key(self.name, code_version("backend_tiny"), model_key(self.p, self.data, "original", seed),
                         params_in(self.p, "run", "unlearning"), CANARY_SAMPLE, UTILITY_ROWS, RETAIN_ROWS)

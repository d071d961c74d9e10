"""Matched memorization (notebook 07), part 1: the dose-response models and their unlearning runs.

To tell "OOD needs more steps because it is OOD" from "because it is more memorized", every kind is inserted at
several counts (``dose_insertions``) so that initial GenEx overlaps across kinds; :mod:`forgetlab.dose_matching`
then compares kinds at matched initial GenEx.

1. **Fresh examples** (:func:`get_dose_examples`): per kind ``dose_forget_size`` forget examples, as many twins and
   controls, and a never-trained population, none of them in the study's example table. ID windows come from the
   held-out plays (never seen by the base model; clear of the rows utility is measured on), other-language and code
   windows from the study's sources, canaries with unused secrets. Text kinds all have ``example_tokens`` tokens.
2. **Models** (:func:`get_dose_models`): per count c, the run's base model (``mem_models.get_base_model``) fine-tuned on
   a shared sample of training rows plus every kind's forget examples c times (the original at count c); the
   reference is the same fine-tuning with each forget example's twin in its place, as often. The twins are drawn
   fresh with the forget examples, so they exist whatever ``reference_data`` says: original and reference take the
   same steps and see each kind equally often, and GenEx measures the examples, not their kind. Same seed, so both
   see their rows in the same order.
3. **Unlearning** (:func:`run_dose_study`): a :class:`DoseBackend` per count, run through the study engine (gradient
   ascent, every step recorded, each trajectory cached on its own).

Fine-tuning and unlearning run at one torch thread (CPU kernels can round differently at other thread counts), so a
count computed here, in a sweep worker (:mod:`forgetlab.dose_grid`, notebook 07's grid) or on Ray gives the same
numbers bit for bit. Nothing here reads ``dose_insertions`` into a cache key: a unit holding one count shares its
examples, models and trajectories with a run holding them all.
"""
from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import engine, metrics
from .backend_tiny import candidate_logprobs, retain_rows
from .cache import ArtifactCache, cache_key, code_version
from .config import params_in
from .engine import ForgetSetView, StudyInputError
from .engine_pool import torch_threads
from .experiment import TrainedModel, config_for, model_key
from .forget_sets import StudyData, dedupe_windows, example_row, line_start_windows
from .mem_models import FINETUNE_LR_SCALE, finetune_copy
from .mem_pool import GUARD_NGRAM, GUARD_ROWS
from .models import model_from_tensors, pick_device
from .roles import pad_rows
from .scoring import mean_token_loss
from .unlearning import UnlearnSettings

# code that builds an entry: examples (data, forget_sets, tokenizer, mem_pool's guard), models (mem_models, roles,
# training, models, experiment's config_for) and trajectories (backend_tiny, canaries, metrics, scoring, unlearning)
DOSE_CODE = ("dose_response", "data", "forget_sets", "tokenizer", "mem_pool", "mem_models", "roles", "models",
             "training", "experiment", "backend_tiny", "canaries", "metrics", "scoring", "unlearning")
DOSE_KINDS = ("id", "canary", "language", "code")
SEED_OFFSET = 104729          # the dose draws are independent of the study's and of notebook 05's pool
POPULATION = 16               # never-trained peers per kind: RelEx population, membership non-members, exposure fit
SHARED_PER_EXAMPLE = 10       # shared training rows per forget example in every fine-tuning (c-independent)
UTILITY_ROWS = 8               # held-out rows scored at every step (perplexity)


class DoseInputError(ValueError):
    """The dose-response study cannot run with these parameters or inputs; the message says how to fix it."""


def dose_kinds(p: dict) -> list[str]:
    """The kinds of ``forget_kinds`` the dose-response covers: ID and at least one OOD kind are needed."""
    kinds = [k for k in p["forget_kinds"] if k in DOSE_KINDS]
    if "id" not in kinds or len(kinds) < 2:
        raise DoseInputError(f"forget_kinds = {p['forget_kinds']}: the matched comparison needs id and at least one "
                             f"of canary, language, code (a custom kind is not part of notebook 07)")
    return kinds


def role_sizes(p: dict) -> dict[str, int]:
    """Examples per role and kind: forget, twin and control (``dose_forget_size`` each), population."""
    n = p["dose_forget_size"]
    return {"forget": n, "twin": n, "control": n, "population": POPULATION}


# ------------------------------------------------------------------------------------------ examples

def _ngrams(seq: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


def _text_windows(p: dict, data: StudyData, kind: str, src: dict) -> list[list[int]]:
    tok, L = data.tokenizer, p["example_tokens"]
    split = "heldout" if kind == "id" else kind
    windows = [[data.bos] + w for t in src[split]["text"] for w in line_start_windows(tok, t, L)]
    used = {tuple(int(t) for t in ids) for ids in data.examples.ids}
    windows = [w for w in dedupe_windows(windows) if tuple(w) not in used]
    if kind == "id":        # keep clear of the held-out rows on which perplexity is measured
        guard = _ngrams(data.heldout_rows[:GUARD_ROWS].reshape(-1).tolist(), GUARD_NGRAM)
        windows = [w for w in windows if not (_ngrams(w, GUARD_NGRAM) & guard)]
    return windows


def build_dose_examples(p: dict, data: StudyData) -> pd.DataFrame:
    """Fresh examples of every dose kind in the roles of :func:`role_sizes`, shaped like the study's table.

    uids are ``<kind>-dose-<role>-NNN``; deterministic for given parameters.
    """
    from .data import language_parts, load_sources

    kinds, sizes = dose_kinds(p), role_sizes(p)
    need = sum(sizes.values())
    rng = random.Random(p["seed"] + SEED_OFFSET)
    text = [k for k in kinds if k != "canary"]
    src = load_sources(p["heldout_plays"], p["seed"], tuple(language_parts(p["language"]))) if text else {}
    names = {"id": "shakespeare/heldout", "language": "other-language/chatterbot", "code": "python/stdlib",
             "canary": "canary/template"}
    rows: list[dict] = []
    for kind in kinds:
        if kind == "canary":
            digits = data.canary_digits
            taken = {int(s) for s in data.examples[data.examples.kind == "canary"].secret}
            if need > 10 ** digits // 2 - len(taken):
                raise DoseInputError(f"{need} dose canaries per role set need more unused secrets than 10**{digits} "
                                     f"leaves: raise canary_digits or lower dose_forget_size")
            values: list[int] = []
            while len(values) < need:
                v = rng.randrange(10 ** digits)
                if v not in taken:
                    taken.add(v)
                    values.append(v)
            seqs = [(data.canary_ids(f"{v:0{digits}d}"), f"{v:0{digits}d}") for v in values]
            start = len(data.canary_prefix_ids())
        else:
            windows = _text_windows(p, data, kind, src)
            if len(windows) < need:
                raise DoseInputError(f"{names[kind]} has {len(windows)} unused windows of {p['example_tokens']} "
                                     f"tokens but the dose study needs {need} {kind} examples: lower "
                                     f"dose_forget_size or example_tokens")
            rng.shuffle(windows)
            seqs, start = [(w, "") for w in windows[:need]], 1
        pos = 0
        for role, n in sizes.items():
            for i, (ids, secret) in enumerate(seqs[pos:pos + n]):
                row = example_row(kind, role, i, names[kind], ids, start, data.tokenizer, secret)
                rows.append({**row, "uid": f"{kind}-dose-{role}-{i:03d}"})
            pos += n
    out = pd.DataFrame(rows)
    too_long = out[out.ids.map(len) > data.block_size]
    if len(too_long):
        raise DoseInputError(f"{len(too_long)} dose examples are longer than block_size = {data.block_size}")
    return out


def examples_key(p: dict, data: StudyData) -> str:
    """Cache key of the dose examples: the run and data parameters, the data and the draw's constants."""
    return cache_key("dose-examples", code_version(*DOSE_CODE), params_in(p, "run", "data"), p["dose_forget_size"],
                     data.fingerprint(), POPULATION, SEED_OFFSET, GUARD_ROWS, GUARD_NGRAM)


def get_dose_examples(p: dict, data: StudyData, cache: ArtifactCache | None = None) -> pd.DataFrame:
    """:func:`build_dose_examples`, cached (always returned as read back, so a fresh and a cached run agree)."""
    cache = cache or ArtifactCache()

    def build():
        ex = build_dose_examples(p, data)
        return {"examples": len(ex)}, None, {"examples.json": ex.to_json(orient="records")}

    _, _, files = cache.get_or_build("dose-examples", examples_key(p, data), build)
    return pd.DataFrame(json.loads(files["examples.json"]))


def examples_summary(examples: pd.DataFrame) -> pd.DataFrame:
    """Per kind and role: examples, source, tokens and scored tokens per example."""
    return (examples.groupby(["kind", "role"], sort=False)
                    .agg(examples=("uid", "size"), source=("source", "first"), tokens=("n_tokens", "mean"),
                         scored_tokens=("n_scored", "mean")).reset_index())


# -------------------------------------------------------------------------------------------- models

def finetune_rows(examples: pd.DataFrame, role: str | None, count: int, shared: np.ndarray, block: int,
                  pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tuning rows: the shared rows, then every example of ``role`` (in table order) ``count`` times each
    (``role=None``: the shared rows alone)."""
    shared = np.asarray(shared, dtype=np.int64).reshape(-1, block)
    seqs = [] if role is None else [list(map(int, ids)) for ids in examples[examples.role == role].ids
                                    for _ in range(count)]
    if not seqs:
        return shared.copy(), shared.copy()
    ids, labels = pad_rows(seqs, block, pad)
    return np.concatenate([shared, ids]), np.concatenate([shared, labels])


def shared_rows(p: dict, data: StudyData, n_kinds: int) -> np.ndarray:
    """The seeded sample of shared training rows every dose fine-tuning starts from (the same for every count)."""
    n = SHARED_PER_EXAMPLE * p["dose_forget_size"] * n_kinds
    rng = np.random.default_rng([p["seed"], SEED_OFFSET])
    idx = np.sort(rng.choice(len(data.train_rows), size=min(n, len(data.train_rows)), replace=False))
    return data.train_rows[idx]


def finetune_params(p: dict) -> dict:
    """Every parameter a dose model depends on: the run, data, model, training and dose sections, and the fine-tuning
    epochs it shares with notebook 05's subset models."""
    return {**params_in(p, "run", "data", "model", "training", "dose"), "mem_finetune_epochs": p["mem_finetune_epochs"]}


INSERTED = {"original": "forget", "reference": "twin"}     # which role each model's fine-tuning inserts


def dose_model_key(p: dict, data: StudyData, base_key: str, examples: pd.DataFrame, role: str, count: int) -> str:
    """Cache key of one dose model: role 'original' or 'reference', count c, and everything it is built from."""
    inserted = examples[examples.role == INSERTED[role]]
    return cache_key("dose-model", code_version(*DOSE_CODE), finetune_params(p), data.fingerprint(), base_key,
                     role, count, [list(map(int, i)) for i in inserted.ids], SHARED_PER_EXAMPLE, FINETUNE_LR_SCALE,
                     SEED_OFFSET)


@dataclass
class DoseModels:
    """The models of one insertion count: the original, its twin reference(s), their cache keys and records."""
    count: int
    original: torch.nn.Module
    references: list[torch.nn.Module]
    keys: list[str]
    meta: list[dict]


def _finetuned(p: dict, data: StudyData, base: TrainedModel, ids: np.ndarray, labels: np.ndarray, key: str,
               desc: str, cache: ArtifactCache) -> tuple[torch.nn.Module, dict]:
    device = pick_device(p["device"])
    built: list[torch.nn.Module] = []

    def build():
        with torch_threads(1):
            model, curve = finetune_copy(base.model, ids, labels, epochs=p["mem_finetune_epochs"],
                                         batch_size=p["batch_size"],
                                         learning_rate=p["learning_rate"] * FINETUNE_LR_SCALE, seed=p["seed"],
                                         device=device, desc=desc)
        built.append(model)
        return {"rows": len(ids), "final_train_loss": float(curve.loss.iloc[-1]), "model": desc}, model.state_dict(), None

    meta, tensors, _ = cache.get_or_build("dose-models", key, build)
    if built:
        return built[0], meta
    return model_from_tensors(config_for(p, data), tensors, device), meta


def get_dose_models(p: dict, data: StudyData, examples: pd.DataFrame, base: TrainedModel,
                    cache: ArtifactCache | None = None) -> dict[int, DoseModels]:
    """Per insertion count: the original and reference models, fine-tuned from ``base`` (cached, with progress)."""
    cache = cache or ArtifactCache()
    base_key = model_key(p, data, base.role, base.seed)
    shared = shared_rows(p, data, examples.kind.nunique())
    out: dict[int, DoseModels] = {}
    for c in tqdm(sorted(p["dose_insertions"]), desc="dose models", mininterval=1.0):
        models, keys, metas = [], [], []
        for role, inserted in INSERTED.items():
            key = dose_model_key(p, data, base_key, examples, role, c)
            ids, labels = finetune_rows(examples, inserted, c, shared, data.block_size, data.bos)
            model, meta = _finetuned(p, data, base, ids, labels, key, f"{role} x{c}", cache)
            models.append(model)
            keys.append(key)
            metas.append({**meta, "role": role, "count": c})
        out[c] = DoseModels(c, models[0], models[1:], keys, metas)
    return out


def model_table(models: dict[int, DoseModels]) -> pd.DataFrame:
    """One row per dose model: count, role, fine-tuning rows and final training loss."""
    return pd.DataFrame([{"count": m["count"], "role": m["role"], "rows": m["rows"],
                          "final_train_loss": m["final_train_loss"]} for d in models.values() for m in d.meta])


def reference_note(p: dict) -> str:
    """Which references the GenEx of this notebook uses, in words (twins, whatever ``reference_data`` says)."""
    other = ("" if p["reference_data"] == "twins" else " (This run's main study uses reference_data: plain, the "
             "paper's retrain; the dose study draws its own twins, so it uses twin references all the same.)")
    return ("References: at each count, the base fine-tuned identically with each forget example's twin (same kind, "
            "source and length, never used elsewhere) in its place, as often: original and reference take the same "
            "steps and see each kind equally often, so GenEx measures the examples, not their kind." + other)


# ------------------------------------------------------------------------------------------ backend

class DoseBackend:
    """The study engine's backend for the models of one insertion count (gradient ascent, every step recorded)."""

    def __init__(self, p: dict, data: StudyData, examples: pd.DataFrame, models: DoseModels,
                 labels: dict[str, str] | None = None):
        self.p, self.data, self.examples, self.models = p, data, examples, models
        self.kinds = tuple(k for k in dose_kinds(p) if k in set(examples.kind))
        self.labels = {k: (labels or {}).get(k, k) for k in self.kinds}
        self.name = f"tiny-dose-x{models.count}"
        self.methods = ("ga",)
        self.original_seeds = [p["seed"]]
        self.pad_id = data.bos
        self.retain_rows = retain_rows(data, p["seed"])
        self.target_bits = p["target_bits"]
        self._views: dict[str, ForgetSetView] = {}

    def settings(self, method: str) -> UnlearnSettings:
        return replace(UnlearnSettings.from_params(self.p, method), steps=self.p["dose_unlearn_steps"], record_every=1)

    def view(self, kind: str) -> ForgetSetView:
        if kind not in self._views:
            self._views[kind] = ForgetSetView.build(self.examples, kind, self.kinds)
        return self._views[kind]

    def original(self, seed: int) -> torch.nn.Module:
        if seed != self.p["seed"]:
            raise StudyInputError(f"the dose models are fine-tuned with seed {self.p['seed']}, not {seed}")
        return copy.deepcopy(self.models.original)

    def release(self, model: torch.nn.Module) -> None:
        pass

    def reference_logprobs(self, examples: pd.DataFrame) -> np.ndarray:
        return np.stack([metrics.example_logprobs(m, examples) for m in self.models.references])

    def example_logprobs(self, model: torch.nn.Module, examples: pd.DataFrame) -> np.ndarray:
        return metrics.example_logprobs(model, examples)

    def candidate_logprobs(self, model: torch.nn.Module) -> np.ndarray:
        return candidate_logprobs(model, self.data)

    def utility(self, model: torch.nn.Module) -> dict[str, float]:
        return {"heldout_ppl": float(math.exp(mean_token_loss(model, self.data.heldout_rows[:UTILITY_ROWS])))}

    def key(self, seed: int) -> str:
        return cache_key("tiny-dose", code_version(*DOSE_CODE), self.models.keys[0], seed, UTILITY_ROWS,
                         params_in(self.p, "run", "unlearning"), [list(map(int, i)) for i in self.examples.ids],
                         self.examples.uid.tolist())


def run_dose_study(p: dict, data: StudyData, examples: pd.DataFrame, models: dict[int, DoseModels],
                   cache: ArtifactCache | None = None, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Gradient ascent on every kind's forget set at every count, through the engine: its tidy table plus a
    ``count`` column (trajectories cached one by one; everything at one torch thread, like a sweep worker)."""
    cache = cache or ArtifactCache()
    with torch_threads(1):
        frames = [engine.run_study(DoseBackend(p, data, examples, models[c], labels), cache, methods=["ga"])
                  .assign(count=c) for c in sorted(models)]
    return pd.concat(frames, ignore_index=True)

"""The "forget my sentence" lab: a user's sentence (or canary secret), fine-tuned into a copy of a cached model,
then unlearned through the study engine.

1. A :class:`LabRequest` (text, kind, insertions) is checked by :func:`lab_example` against the run's tokenizer
   and model: every bad input raises :class:`LabInputError` with a message that names the fix.
2. :func:`build_lab` fine-tunes two copies of the run's pretrained base model (it never saw the forget sets):
   the *original* on a seeded sample of shared training rows plus the user's example ``insertions`` times, the
   *reference* on the same rows plus, in its place, a never-used **twin** of the same kind and token length (a
   held-out window, or a canary with another secret), as often: both take the same steps with the same seed and
   see the kind equally often, so GenEx measures the user's example, not its kind (without the twin, a canary
   inserted 20 times lifted every secret of its template: the controls' GenEx rose to ~7 bits). Both models are
   cached. ``insert=False`` inserts nothing: the cached model is unlearned as it is; its retrain-without-the-
   sentence is that same model, so GenEx starts at 0 and :func:`forgetlab.study.never_trained_flags` flags it.
3. The result is a :class:`LabBackend`: its one forget example is the user's, with never-trained controls and a
   population of the same kind and token length (held-out Shakespeare windows for a sentence, other unused
   secrets for a canary), so :func:`forgetlab.engine.run_study` gives GenEx, RelEx, exposure (canaries: exact,
   over every candidate) and utility per step, and :class:`forgetlab.trajectories.StepRunner` runs more steps.
"""
from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from . import backend_tiny, metrics, study
from .cache import ArtifactCache, cache_key, code_version
from .config import params_in
from .engine import ForgetSetView, StudyInputError
from .experiment import config_for, model_key
from .forget_sets import StudyData, example_row, unused_values
from .intervals import noise_floor_target
from .mem_models import finetune_copy, get_base_model
from .models import model_from_tensors, pick_device
from .roles import pad_rows
from .tokenizer import encode
from .unlearning import UnlearnSettings

LAB_CODE = ("lab", "mem_models", "models", "training")   # the code that builds a lab model
KINDS = ("sentence", "canary")
LABELS = {"sentence": "your sentence", "canary": "your canary"}
MAX_INSERTIONS = 200          # each insertion is one more fine-tuning row: beyond this the minute is gone
SHARED_ROWS = 256             # shared training rows in both fine-tunings (the model keeps its footing)
EPOCHS = 2.0                  # fine-tuning epochs over shared rows + insertions
LR_SCALE = 0.3                # fine-tuning learning rate = this x learning_rate
CONTROLS = 16                 # never-trained controls (the GenEx noise floor)
POPULATION = 64               # never-trained sentence peers (RelEx population, membership non-members)
CANARY_POPULATION = backend_tiny.CANARY_SAMPLE   # never-trained secrets scored each step (exposure fit, RelEx)
FLAG_MIN_BITS = 0.01          # the narrowest noise band: below a hundredth of a bit, GenEx is float rounding
SEED_OFFSET = 60013           # the lab's draws are independent of the study's, notebook 05's and 07's
Progress = Callable[[int, int, str], None]


class LabInputError(ValueError):
    """The lab cannot run on this input; the message says what to change."""


@dataclass(frozen=True)
class LabRequest:
    """What the user asks for: their text (a sentence, or a canary's secret digits), how often to insert it, and
    whether to insert it at all (``insert=False``: unlearn it from the cached model as it is)."""
    text: str
    kind: str = "sentence"
    insertions: int = 20
    insert: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LabInputError(f"kind = {self.kind!r} is unknown: choose 'sentence' or 'canary'")
        if not isinstance(self.text, str) or not self.text.strip():
            what = "a sentence" if self.kind == "sentence" else "the secret digits of your canary"
            raise LabInputError(f"the text is empty: type {what}")
        if self.insert:
            n = self.insertions
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
                raise LabInputError(f"insertions = {n!r} is not a whole number: type a count from 1 to "
                                    f"{MAX_INSERTIONS}")
            if n < 1:
                raise LabInputError(f"insertions = {n}: the sentence must be inserted at least once (type 1 to "
                                    f"{MAX_INSERTIONS}); to unlearn a sentence the model never saw, untick "
                                    f"'insert' instead")
            if n > MAX_INSERTIONS:
                raise LabInputError(f"insertions = {n} is above {MAX_INSERTIONS} (the fine-tuning would take far "
                                    f"more than a minute): type a count from 1 to {MAX_INSERTIONS}")


@dataclass(frozen=True)
class LabExample:
    """The user's example, tokenized: its display text, token ids (BOS first), first scored position, secret."""
    kind: str
    text: str
    ids: tuple[int, ...]
    score_start: int
    secret: str = ""

    @property
    def n_tokens(self) -> int:
        return len(self.ids) - 1


def lab_example(p: dict, data: StudyData, request: LabRequest) -> LabExample:
    """Tokenize the request with the run's tokenizer and check it fits the model; raises :class:`LabInputError`."""
    context = data.block_size - 1
    if request.kind == "canary":
        secret, digits = request.text.strip(), data.canary_digits
        if len(secret) != digits or not all(c in "0123456789" for c in secret):
            raise LabInputError(f"the secret {secret!r} is not {digits} digits: type exactly {digits} digits "
                                f"(0-9), e.g. {'0123456789'[:digits]}")
        used = set(data.select("canary").secret.astype(str))
        if secret in used:
            raise LabInputError(f"the secret {secret} is one of this run's own canaries: type other {digits} digits")
        ids = data.canary_ids(secret)
        text = p["canary_template"].replace("{secret}", secret)
        if len(ids) - 1 > context:
            raise LabInputError(f"the canary is {len(ids) - 1} tokens but the model's context holds {context}: "
                                f"use a shorter canary_template")
        return LabExample("canary", text, tuple(ids), len(data.canary_prefix_ids()), secret)
    text = request.text.strip()
    ids = [data.bos] + encode(data.tokenizer, text)
    if len(ids) - 1 > context:
        keep = len(data.tokenizer.decode(ids[1:context + 1]))
        raise LabInputError(f"the sentence is {len(ids) - 1} tokens but the model's context holds {context} "
                            f"(block_size - 1): shorten it to about {keep} characters")
    return LabExample("sentence", text, tuple(ids), 1)


# ------------------------------------------------------------------------------------------- peers

def sentence_windows(data: StudyData, length: int, skip_rows: int = backend_tiny.UTILITY_ROWS) -> list[list[int]]:
    """Distinct, non-overlapping windows of exactly `length` tokens of the held-out plays (never trained by any
    model), each starting at the start of a line, BOS first; the rows utility is measured on are skipped."""
    stream = data.heldout_rows[skip_rows:].reshape(-1).tolist()
    newline = data.tokenizer.token_to_id("Ċ")
    out, seen, end = [], set(), 0
    for i in range(1, len(stream) - length + 1):
        if i < end or stream[i - 1] != newline or stream[i] == newline:
            continue
        w = stream[i:i + length]
        if data.bos in w or tuple(w) in seen:
            continue
        seen.add(tuple(w))
        out.append([data.bos] + w)
        end = i + length
    return out


def peer_examples(p: dict, data: StudyData, ex: LabExample) -> pd.DataFrame:
    """The lab's examples table: the user's example (role forget), never-trained controls, a population and the
    reference's twin, all of the same kind and token length, drawn with a seed of the run."""
    rows = [{**example_row(ex.kind, "forget", 0, "you", list(ex.ids), ex.score_start, data.tokenizer, ex.secret),
             "uid": f"{ex.kind}-yours", "text": ex.text}]
    if ex.kind == "canary":
        digits = data.canary_digits
        used = {int(s) for s in data.select("canary").secret} | {int(ex.secret)}
        free = 10 ** digits - len(used)
        if free < CONTROLS + 3:
            raise LabInputError(f"only {free} unused secrets of {digits} digits are left for the lab's controls "
                                f"and population: raise canary_digits")
        n = CONTROLS + 1 + min(CANARY_POPULATION, free - CONTROLS - 1)
        values = unused_values(random.Random(p["seed"] + SEED_OFFSET), 10 ** digits, used, n)
        peers = [(data.canary_ids(f"{v:0{digits}d}"), f"{v:0{digits}d}") for v in values]
        source = "canary/template"
    else:
        windows = [w for w in sentence_windows(data, ex.n_tokens) if tuple(w) != ex.ids]
        if len(windows) < CONTROLS + 3:
            raise LabInputError(f"the held-out plays have only {len(windows)} line-start windows of {ex.n_tokens} "
                                f"tokens, too few for the controls and population: shorten the sentence")
        rng = np.random.default_rng([p["seed"], SEED_OFFSET, ex.n_tokens])
        pick = rng.choice(len(windows), size=min(len(windows), CONTROLS + 1 + POPULATION), replace=False)
        peers, source = [(windows[i], "") for i in pick], "shakespeare/heldout"
    for j, (ids, secret) in enumerate(peers):
        role, i = (("twin", 0) if j == 0 else ("control", j - 1) if j <= CONTROLS else
                   ("population", j - 1 - CONTROLS))
        rows.append(example_row(ex.kind, role, i, source, ids, ex.score_start, data.tokenizer, secret))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ models

def shared_rows(p: dict, data: StudyData) -> np.ndarray:
    """The seeded sample of shared training rows of both fine-tunings."""
    rng = np.random.default_rng([p["seed"], SEED_OFFSET])
    idx = np.sort(rng.choice(len(data.train_rows), size=min(SHARED_ROWS, len(data.train_rows)), replace=False))
    return data.train_rows[idx]


def finetune_rows(shared: np.ndarray, inserted: list[int], insertions: int, block: int, pad: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tuning rows: the shared rows, then the `inserted` token ids `insertions` times."""
    ids, labels = pad_rows([list(map(int, inserted))] * insertions, block, pad)
    return np.concatenate([shared, ids]), np.concatenate([shared, labels])


def lab_model_key(p: dict, data: StudyData, base_key: str, inserted: list[int], insertions: int) -> str:
    """Cache key of a lab model: the run's model and training parameters, the data, the base, the inserted
    text's token ids (the user's, or the twin's for the reference) and the count."""
    return cache_key("lab-model", code_version(*LAB_CODE), params_in(p, "run", "data", "model", "training"),
                     data.fingerprint(), base_key, list(map(int, inserted)), insertions, SHARED_ROWS, EPOCHS,
                     LR_SCALE, SEED_OFFSET)


def finetuned(p: dict, data: StudyData, base: torch.nn.Module, ids: np.ndarray, labels: np.ndarray, key: str,
              desc: str, cache: ArtifactCache) -> tuple[torch.nn.Module, dict]:
    """A copy of `base` fine-tuned on the rows (cached under `key`) and its record (rows, seconds, final loss)."""
    import time

    device = pick_device(p["device"])
    built: list[torch.nn.Module] = []

    def build():
        t0 = time.perf_counter()
        model, curve = finetune_copy(base, ids, labels, epochs=EPOCHS, batch_size=p["batch_size"],
                                     learning_rate=p["learning_rate"] * LR_SCALE, seed=p["seed"], device=device,
                                     desc=desc)
        built.append(model)
        return ({"rows": len(ids), "seconds": time.perf_counter() - t0, "final_train_loss": float(curve.loss.iloc[-1]),
                 "model": desc}, model.state_dict(), None)

    meta, tensors, _ = cache.get_or_build("lab-models", key, build)
    if built:
        return built[0], meta
    return model_from_tensors(config_for(p, data), tensors, device), meta


# ----------------------------------------------------------------------------------------- backend

class LabBackend:
    """The study engine's backend of one lab: the user's example against its never-trained peers."""
    name = "tiny-lab"

    def __init__(self, p: dict, data: StudyData, examples: pd.DataFrame, original: torch.nn.Module,
                 references: list[torch.nn.Module], keys: list[str], methods: tuple[str, ...] = ("ga",),
                 steps: int | None = None, models_meta: list[dict] | None = None):
        self.p, self.data, self.examples = p, data, examples
        kind = str(examples.kind.iloc[0])
        self.kinds, self.labels = (kind,), {kind: LABELS[kind]}
        self.methods = tuple(methods)
        self.steps = int(steps or p["unlearn_steps"])
        self.original_seeds = [p["seed"]]
        self.pad_id = data.bos
        self.retain_rows = backend_tiny.retain_rows(data, p["seed"])
        self.target_bits = p["target_bits"]
        self.models_meta = models_meta or []
        self._original, self._references, self._keys = original, references, keys
        self._view = ForgetSetView.build(examples, kind, self.kinds, examples[examples.role == "population"]
                                         .reset_index(drop=True))

    @property
    def example(self) -> pd.Series:
        """The user's example (its row of the examples table)."""
        return self.examples[self.examples.role == "forget"].iloc[0]

    def settings(self, method: str) -> UnlearnSettings:
        return replace(UnlearnSettings.from_params(self.p, method), steps=self.steps)

    def view(self, kind: str) -> ForgetSetView:
        if kind not in self.kinds:
            raise StudyInputError(f"the lab unlearns {self.kinds[0]!r}, not {kind!r}")
        return self._view

    def original(self, seed: int) -> torch.nn.Module:
        if seed not in self.original_seeds:
            raise StudyInputError(f"the lab's original is fine-tuned with seed {self.p['seed']}, not {seed}")
        return copy.deepcopy(self._original)

    def release(self, model: torch.nn.Module) -> None:
        pass

    def reference_logprobs(self, examples: pd.DataFrame) -> np.ndarray:
        return np.stack([metrics.example_logprobs(m, examples) for m in self._references])

    def example_logprobs(self, model: torch.nn.Module, examples: pd.DataFrame) -> np.ndarray:
        return metrics.example_logprobs(model, examples)

    def candidate_logprobs(self, model: torch.nn.Module) -> np.ndarray:
        return backend_tiny.candidate_logprobs(model, self.data)

    def utility(self, model: torch.nn.Module) -> dict[str, float]:
        return backend_tiny.utility(model, self.data)

    def step_scores(self, model: torch.nn.Module, examples: pd.DataFrame, utility: bool = True
                    ) -> tuple[np.ndarray, dict[str, float]]:
        return backend_tiny.step_scores(model, self.data, examples, utility=utility)

    def key(self, seed: int) -> str:
        return cache_key(self.name, code_version("lab", "backend_tiny"), self._keys, seed, self.steps,
                         params_in(self.p, "run", "unlearning"), [list(map(int, i)) for i in self.examples.ids],
                         self.examples.uid.tolist(), backend_tiny.UTILITY_ROWS, backend_tiny.RETAIN_ROWS)


def build_lab(p: dict, request: LabRequest, cache: ArtifactCache | None = None, *, data: StudyData | None = None,
              methods: tuple[str, ...] = ("ga",), steps: int | None = None,
              progress: Progress | None = None) -> LabBackend:
    """The lab of `request`: its example checked, its peers drawn, its original and reference fine-tuned (or read
    from the cache), as a backend for :func:`forgetlab.engine.run_study`. `progress(done, total, what)` is told
    each stage."""
    from .experiment import get_study_data

    cache = cache or ArtifactCache()
    say = progress or (lambda done, total, what: None)
    say(0, 4, "reading the study data")
    data = data or get_study_data(p, cache)
    if data.canary_template != p["canary_template"]:   # read from a cache entry that did not store it
        data = replace(data, canary_template=p["canary_template"])
    ex = lab_example(p, data, request)
    examples = peer_examples(p, data, ex)
    say(1, 4, "loading the cached base model (notebook 02)")
    base = get_base_model(p, data, cache)
    base_key = model_key(p, data, base.role, base.seed)
    if not request.insert:
        say(4, 4, "not inserted: the base model is unlearned as it is")
        return LabBackend(p, data, examples, base.model, [base.model], [base_key, "as-is"], methods, steps,
                          [{"role": "original = reference: the base model, as it is",
                                                         "rows": 0}])
    shared, k = shared_rows(p, data), request.insertions
    models, keys, metas = [], [], []
    for stage, (role, row) in enumerate((("reference", examples[examples.role == "twin"].iloc[0]),
                                         ("original", examples[examples.role == "forget"].iloc[0])), start=2):
        what = f"your {ex.kind}" if role == "original" else f"its twin {row.uid}"
        say(stage, 4, f"fine-tuning the {role} copy: {len(shared)} shared rows plus {what} x{k}")
        key = lab_model_key(p, data, base_key, row.ids, k)
        ids, labels = finetune_rows(shared, row.ids, k, data.block_size, data.bos)
        model, meta = finetuned(p, data, base.model, ids, labels, key, f"lab {role}", cache)
        models.append(model)
        keys.append(key)
        metas.append({**meta, "role": role, "inserted": f"{row.uid} x{k}"})
    say(4, 4, "fine-tuned")
    return LabBackend(p, data, examples, models[1], [models[0]], keys[::-1], methods, steps, metas[::-1])


# ----------------------------------------------------------------------------------------- reading

def genex_before_after(results: pd.DataFrame) -> pd.DataFrame:
    """GenEx (bits) before unlearning and at the last recorded step, per method: the user's example, the mean of
    the controls and their noise band (95th percentile of |GenEx| at step 0)."""
    g = results[(results.metric == "genex_bits") & (results.seed == -1)]
    rows = []
    for method, gm in g.groupby("method", sort=False):
        first, last = gm.step.min(), gm.step.max()
        at = {s: gm[gm.step == s] for s in (first, last)}
        floor = noise_floor_target(at[first][at[first].role == "control"].value, 0.95, FLAG_MIN_BITS)
        for role, name in (("forget", "your example"), ("control", "never-trained controls (mean)")):
            rows.append({"method": method, "example": name, "genex_before_bits": at[first][at[first].role == role]
                         .value.mean(), "genex_after_bits": at[last][at[last].role == role].value.mean(),
                         "after_step": int(last), "noise_band_bits": floor})
    return pd.DataFrame(rows)


def flags(results: pd.DataFrame) -> pd.DataFrame:
    """:func:`forgetlab.study.never_trained_flags` of the lab: is the user's example inside the controls' noise
    band? (At least ``FLAG_MIN_BITS`` wide: a model unlearned as it is has GenEx 0 up to float rounding.)"""
    return study.never_trained_flags(results, minimum=FLAG_MIN_BITS)


def models_table(backend: LabBackend) -> pd.DataFrame:
    """The lab's models: role, what was inserted how often, fine-tuning rows and final training loss."""
    return pd.DataFrame([{"model": m.get("role", m.get("model")), "inserted": m.get("inserted", "nothing"),
                          "rows": m.get("rows", 0), "final_train_loss": m.get("final_train_loss", np.nan)}
                         for m in backend.models_meta])


def flag_sentence(flag_table: pd.DataFrame, backend: LabBackend) -> str:
    """In words: does the user's example start inside the controls' noise band (never trained, in effect)?"""
    r = flag_table.iloc[0]
    what = f"your {backend.kinds[0]}"
    if r.flagged:
        return (f"Flagged: {what} starts inside the never-trained controls' noise band (GenEx {r.genex_bits:.2f} "
                f"bits, band ±{r.noise_floor_bits:.2f} bits): the model behaves as if it never trained on it, so "
                f"\"unlearning\" it means nothing; what ascent does here only pushes it below what a model that "
                f"never saw it would give.")
    return (f"Not flagged: {what} starts at GenEx {r.genex_bits:.2f} bits, above the never-trained controls' noise "
            f"band (±{r.noise_floor_bits:.2f} bits): the model did learn it, and unlearning has something to remove.")


def genex_figure(results: pd.DataFrame, label: str, target_bits: float | None = None) -> plt.Figure:
    """GenEx of the user's example against the step, with the controls' range (min to max) and mean."""
    g = results[(results.metric == "genex_bits") & (results.seed == -1)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, gm in g.groupby("method", sort=False):
        mine = gm[gm.role == "forget"].sort_values("step")
        ctl = gm[gm.role == "control"].groupby("step").value.agg(["min", "max", "mean"])
        ax.fill_between(ctl.index, ctl["min"], ctl["max"], alpha=0.2, color="grey",
                        label=f"never-trained controls, range ({method})")
        ax.plot(ctl.index, ctl["mean"], color="grey", lw=1, ls=":")
        ax.plot(mine.step, mine.value, marker="o", lw=2, label=f"{label} ({method})")
    if target_bits is not None:
        unit = "bit" if target_bits == 1 else "bits"
        ax.axhline(target_bits, color="k", ls="--", lw=1, label=f"target ({target_bits:g} {unit})")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="unlearning step", ylabel="GenEx (bits)", title=f"GenEx of {label} under unlearning")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    return fig

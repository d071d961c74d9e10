"""The study on a real pretrained LLM (notebook 06): SmolLM2-135M fine-tuned with ID and OOD forget sets.

The tiny-model study (:mod:`forgetlab.study`) trains its models from scratch. A real LLM comes pretrained, so here
the *original* model is the pretrained model fine-tuned on a small training set that holds the forget sets, and the
*reference* model is the same fine-tuning without them (same seed, same order of the shared rows). Then each forget
set is unlearned (gradient ascent, gradient difference, NPO: :class:`forgetlab.unlearning.Unlearner`) and every
recorded step is scored into the tidy table of :mod:`forgetlab.study` (same columns, same metric names), so
``study.curves``, ``study.steps_to_unlearn``, ``study.relex_genex_agreement``, ``study.claims`` and the figures of
:mod:`forgetlab.plots` apply unchanged.

Forget sets, one per kind (every one inserted ``llm_insertions`` times into the original's data):

- ``id``: windows of English text (the kind of text SmolLM2 was trained on), cut from the training documents;
- ``canary``: ``My secret number is 4821``: the template is tokenized by the model's tokenizer, every digit is its
  own token, and a canary's scored tokens are its secret given the prefix;
- ``language``: windows of Persian, a language SmolLM2 has barely seen.

Per kind there are also never-trained *population* examples of the same source and token length (the RelEx
population and the membership test's non-members; for canaries a sample of never-trained secrets) and
never-trained *controls* (their GenEx is the metric's noise floor). Canaries and Persian also get *background*
examples in both models' data, so that GenEx measures the example and not the novelty of its kind.

Utility is the perplexity of held-out English (whole documents kept out of fine-tuning), and the loss on a sample
of the shared training windows (``retain_loss``).

Only the last ``llm_train_layers`` transformer blocks (and the final norm) are fine-tuned and unlearned; the
embeddings (tied to the output layer) and the first blocks stay as pretrained. That keeps a CPU run within minutes,
and the cache stores only the tensors that fine-tuning changed.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics, study
from .cache import ArtifactCache, cache_key
from .llm_data import (KIND_LABELS, KINDS, LLMStudyData, LLMStudyError, build_llm_data, canary_tokens,  # noqa: F401
                       check_llm_params, start_token_id, summary_table)
from .llm_finetune import (EVAL_BATCH, LLM_STUDY_VERSION, FrozenPrefixCache, LLMModels, finetune_order,  # noqa: F401
                           finetune_rows, freeze_except, get_llm_models, trainable_names)
from .scoring import mean_token_loss
from .unlearning import UnlearnSettings, Unlearner

UNLEARN_KEYS = ("llm_methods", "llm_unlearn_lr", "llm_unlearn_steps", "llm_batch_size", "llm_record_every",
                "unlearn_optimizer", "grad_clip", "retain_weight", "npo_beta", "seed")

# Same parameters, same numbers on CUDA too: cuBLAS needs this before its first use (as in forgetlab.experiment).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@torch.no_grad()
def canary_candidate_logprobs(model: torch.nn.Module, prefix_ids: list[int], digit_ids: list[int], digits: int,
                              batch_size: int = 256) -> np.ndarray:
    """ll (nats) of every candidate secret's digits given the prefix: array [10**digits], index = the number.

    Works with any causal LM taking ``input_ids``. Candidates that differ only in their last digit share every
    earlier position, so each (digits - 1)-digit path is scored once and its last position gives all ten last
    digits: ``10**(digits-1) * (len(prefix) + digits - 1)`` token evaluations instead of
    ``10**digits * (len(prefix) + digits)``. Agrees with :func:`forgetlab.metrics.canary_candidate_logprobs`.
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    if len(digit_ids) != 10:
        raise ValueError(f"need the token ids of the 10 digits, got {len(digit_ids)}")
    p = len(prefix_ids)
    if p < 1:
        raise ValueError("the canary prefix must hold at least one token (the start token)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    paths = (metrics._candidate_digit_matrix(digit_ids, digits - 1) if digits > 1
             else np.zeros((1, 0), dtype=np.int64))                          # [10**(digits-1), digits-1]
    index_of = {int(t): i for i, t in enumerate(digit_ids)}
    path_digits = np.vectorize(index_of.__getitem__, otypes=[np.int64])(paths) if paths.size else paths
    digit_t = torch.as_tensor(digit_ids, dtype=torch.long, device=device)
    prefix = torch.as_tensor([int(t) for t in prefix_ids], dtype=torch.long)
    out = np.zeros((len(paths), 10), dtype=np.float64)
    for b in range(0, len(paths), batch_size):
        block = torch.as_tensor(paths[b:b + batch_size])
        ids = torch.cat([prefix.expand(len(block), p), block], dim=1).to(device)
        logits = model(input_ids=ids).logits[:, p - 1:].float()              # predicts digit positions 1..digits
        logp = torch.log_softmax(logits, dim=-1)[..., digit_t].double().cpu().numpy()   # [n, digits, 10]
        walked = np.zeros(len(block))
        for j in range(digits - 1):                                          # the path's own digits
            walked += np.take_along_axis(logp[:, j], path_digits[b:b + batch_size, j:j + 1], axis=1)[:, 0]
        out[b:b + len(block)] = walked[:, None] + logp[:, digits - 1]
    model.train(was_training)
    return out.reshape(-1)



# -------------------------------------------------------------------------------------- unlearning

@dataclass
class LLMForgetSetView:
    """What one unlearning run scores: the forget and control examples of a kind and its never-trained peers."""
    kind: str
    targets: pd.DataFrame
    population: pd.DataFrame

    @classmethod
    def build(cls, data: LLMStudyData, kind: str) -> "LLMForgetSetView":
        if kind not in KINDS:
            raise LLMStudyError(f"unknown forget set {kind!r}: use one of {', '.join(KINDS)}")
        ex = data.select(kind)
        targets = ex[ex.role.isin(["forget", "control"])].reset_index(drop=True)
        return cls(kind, targets, ex[ex.role == "population"].reset_index(drop=True))


def unlearn_settings(p: dict, method: str) -> UnlearnSettings:
    return UnlearnSettings(method=method, lr=p["llm_unlearn_lr"], steps=p["llm_unlearn_steps"],
                           batch=p["llm_batch_size"], optimizer=p["unlearn_optimizer"], grad_clip=p["grad_clip"],
                           record_every=p["llm_record_every"], retain_weight=p["retain_weight"],
                           npo_beta=p["npo_beta"], seed=p["seed"])


def utility(model: torch.nn.Module, data: LLMStudyData) -> dict[str, float]:
    """heldout_ppl: perplexity of the held-out English rows; retain_loss: nats/token on shared training rows."""
    return {"heldout_ppl": math.exp(mean_token_loss(model, data.heldout_rows, batch_size=EVAL_BATCH)),
            "retain_loss": mean_token_loss(model, data.retain_sample(len(data.heldout_rows)), batch_size=EVAL_BATCH)}


def make_evaluator(data: LLMStudyData, view: LLMForgetSetView, final_step: int, start: dict | None = None):
    """The function the unlearner calls at each recorded step; returns tidy records (as ``study.make_evaluator``).

    Per forget and control example: ``ll``, ``relex_bits`` (against the never-trained population) and, for
    canaries, ``exposure_bits`` (skew-normal extrapolation from the population sample) and at the first and last
    step ``exposure_exact_bits`` (over all 10**digits candidates). Per model: ``membership_auc``, ``heldout_ppl``,
    ``retain_loss``. ``start``, a dict shared by the evaluators of one forget set, keeps the step-0 records: every
    method starts from the same fine-tuned model, so step 0 is scored once.
    """
    scored = pd.concat([view.targets, view.population], ignore_index=True)
    n_t = len(view.targets)
    n_scored = scored.n_scored.to_numpy()
    is_forget = (view.targets.role == "forget").to_numpy()

    def evaluate(model, step: int) -> list[dict]:
        if step == 0 and start is not None and view.kind in start:
            return start[view.kind]
        ll = metrics.example_logprobs(model, scored, batch_size=EVAL_BATCH)
        ll_t, ll_pop = ll[:n_t], ll[n_t:]
        recs = study.target_records(view.targets, ll_t, ll_pop, extrapolate=view.kind == "canary")
        if view.kind == "canary" and step in (0, final_step):
            all_ll = canary_candidate_logprobs(model, data.canary_prefix, data.digit_ids, data.canary_digits)
            for r in view.targets.itertuples():
                recs.append({"uid": r.uid, "role": r.role, "metric": "exposure_exact_bits",
                             "value": metrics.exposure_from_logprobs(all_ll[int(r.secret)], all_ll)})
        per_token = ll / n_scored
        recs += study.model_records(per_token[:n_t][is_forget], per_token[n_t:], utility(model, data))
        if step == 0 and start is not None:
            start[view.kind] = recs
        return recs

    return evaluate


def reference_logprobs(models: LLMModels, examples: pd.DataFrame) -> np.ndarray:
    """ll of each example under each reference model: [n_reference, n_examples]; leaves the original in place."""
    out = []
    for seed in sorted(models.references):
        models.use(models.references[seed])
        out.append(metrics.example_logprobs(models.model, examples, batch_size=EVAL_BATCH))
    models.use(models.original)
    return np.stack(out)


def unlearn_forget_set(p: dict, data: LLMStudyData, models: LLMModels, kind: str, method: str,
                       ref_ll: np.ndarray | None = None, start: dict | None = None,
                       steps: int | None = None) -> pd.DataFrame:
    """Unlearn one forget set from the fine-tuned original with one method; return the tidy table (with GenEx).

    The working copy is reset to the original before and after, so runs never leak into each other.
    """
    settings = unlearn_settings(p, method)
    steps = steps or settings.steps
    view = LLMForgetSetView.build(data, kind)
    if ref_ll is None:
        ref_ll = reference_logprobs(models, view.targets)
    forget = view.targets[view.targets.role == "forget"]
    model = models.use(models.original)
    evaluate = make_evaluator(data, view, steps, start)
    try:
        u = Unlearner(model, [list(i) for i in forget.ids], forget.score_start.tolist(), settings, data.start_id,
                      retain_rows=data.retain_rows)
        table = pd.DataFrame(u.run(steps, evaluate)).assign(seed=models.seed, kind=kind, method=method)
        del u
    finally:
        models.use(models.original)
        model.zero_grad(set_to_none=True)
        model.eval()
    return study.add_genex(table, view.targets, ref_ll)


def study_key(p: dict, data: LLMStudyData, models: LLMModels) -> str:
    return cache_key("llm-study", LLM_STUDY_VERSION, {k: p[k] for k in UNLEARN_KEYS}, models.keys(),
                     data.fingerprint(), EVAL_BATCH)


def read_table(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""],
                       dtype={"uid": str}).fillna({"uid": ""})


def run_llm_study(p: dict, data: LLMStudyData, models: LLMModels, cache: ArtifactCache | None = None,
                  kinds: tuple[str, ...] = KINDS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every forget set x every method in ``llm_methods``: (per-step tidy table, seconds per run); cached."""
    cache = cache or ArtifactCache()
    key = study_key(p, data, models)
    tag = cache_key(list(kinds))
    if cache.has("llm-study", f"{key}-{tag}"):
        _, _, files = cache.load("llm-study", f"{key}-{tag}")
        return read_table(files["results.csv"]), pd.read_csv(io.StringIO(files["timings.csv"]))
    targets = data.examples[data.examples.role.isin(["forget", "control"])].reset_index(drop=True)
    ref_all = reference_logprobs(models, targets)
    frames, timings, start = [], [], {}
    jobs = [(k, m) for k in kinds for m in p["llm_methods"]]
    pos = {u: i for i, u in enumerate(targets.uid)}
    for kind, method in tqdm(jobs, desc="unlearning", mininterval=1.0):
        view = LLMForgetSetView.build(data, kind)
        ref_ll = ref_all[:, [pos[u] for u in view.targets.uid]]
        t0 = time.perf_counter()
        frames.append(unlearn_forget_set(p, data, models, kind, method, ref_ll=ref_ll, start=start))
        timings.append({"kind": kind, "method": method, "seconds": time.perf_counter() - t0})
    table = pd.concat(frames, ignore_index=True)
    timings = pd.DataFrame(timings)
    cache.save("llm-study", f"{key}-{tag}", {"rows": len(table)},
               files={"results.csv": table.to_csv(index=False), "timings.csv": timings.to_csv(index=False)})
    return table, timings


# ------------------------------------------------------------------------------------------ summaries

def pretrained_losses(model: torch.nn.Module, data: LLMStudyData) -> pd.DataFrame:
    """How familiar each kind is to a model: loss of its never-trained population, per token and per character.

    Per-character loss is the fair comparison across kinds: the tokenizer cuts Persian into many more tokens per
    character than English.
    """
    rows = []
    for kind in KINDS:
        pop = data.select(kind, "population")
        ll = metrics.example_logprobs(model, pop, batch_size=EVAL_BATCH)
        chars = pop.text.str.len().to_numpy() if kind != "canary" else pop.secret.str.len().to_numpy()
        rows.append({"kind": kind, "examples": len(pop), "scored_tokens": float(pop.n_scored.mean()),
                     "loss_per_token": float(-ll.sum() / pop.n_scored.sum()),
                     "loss_per_char": float(-ll.sum() / chars.sum())})
    return pd.DataFrame(rows)


def start_table(table: pd.DataFrame) -> pd.DataFrame:
    """Before unlearning (step 0): mean GenEx and RelEx of forget and control examples, exact canary exposure."""
    t = table[(table.step == 0) & table.role.isin(["forget", "control"])]
    t = t[t.metric.isin(["genex_bits", "relex_bits", "exposure_exact_bits"])]
    t = t.drop_duplicates(["kind", "uid", "metric"])       # step 0 is the same model for every method
    return t.groupby(["kind", "role", "metric"]).value.mean().unstack("metric").reset_index()


def agreement_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """RelEx and GenEx side by side per method, kind, step and example (for ``plots.relex_vs_genex``)."""
    return (table[table.metric.isin(["relex_bits", "genex_bits"])]
            .groupby(["method", "kind", "step", "uid", "metric"]).value.mean().unstack("metric")
            .rename(columns={"relex_bits": "relex", "genex_bits": "genex"}).dropna().reset_index())


def tiny_agreement(summary_path) -> dict[str, float | None]:
    """RelEx/GenEx Spearman correlations of the tiny-model study (notebook 04's section of ``summary.json``),
    keyed ``kind/method``; empty when that notebook has not run into the same output folder."""
    import json
    from pathlib import Path

    path = Path(summary_path)
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return dict(summary.get("tradeoffs", {}).get("relex_genex_spearman", {}))


@contextlib.contextmanager
def kind_labels():
    """Inside this block the suite's figures name the LLM's kinds (ID is English here, not Shakespeare)."""
    from . import plots

    saved = dict(plots.KIND_LABELS)
    plots.KIND_LABELS.update(KIND_LABELS)
    try:
        yield
    finally:
        plots.KIND_LABELS.clear()
        plots.KIND_LABELS.update(saved)

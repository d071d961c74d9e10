"""The SmolLM2-135M backend of the study engine (notebook 06): a pretrained LLM fine-tuned with the forget sets.

A real LLM comes pretrained, so each *original* (one per ``llm_original_seeds``) is the pretrained model fine-tuned
on a small training set that holds the forget sets, and each *reference* the same fine-tuning with their twins
instead (:mod:`forgetlab.llm_finetune`). The models differ only in their last blocks, so one working copy is kept
and each model's tensors are swapped in. Exact canary exposure scores the candidates as a digit trie
(:mod:`forgetlab.llm_trie`); ``fast=False`` keeps the paths of before (shared-last-digit candidates, full-logits
reference scoring) for benchmarks/bench_llm.py.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import canaries, llm_pool, metrics
from .cache import ArtifactCache, cache_key, code_version
from .config import params_in
from .config import METHODS
from .engine import ForgetSetView
from .llm_data import KINDS, LLMStudyData, build_llm_data, llm_kind_labels
from .llm_finetune import EVAL_BATCH, LLMModels, get_llm_models
from .llm_trie import LlamaCandidateTrie
from .scoring import mean_token_loss, score_rows
from .unlearning import UnlearnSettings


def unlearn_settings(p: dict, method: str) -> UnlearnSettings:
    """The LLM's unlearning settings: its own learning rate, steps, batch and recording schedule."""
    return UnlearnSettings(method=method, lr=p["llm_unlearn_lr"], steps=p["llm_unlearn_steps"],
                           batch=p["llm_batch_size"], optimizer=p["unlearn_optimizer"], grad_clip=p["grad_clip"],
                           record_every=p["llm_record_every"], utility_every=p["llm_utility_every"],
                           retain_weight=p["retain_weight"],
                           npo_beta=p["npo_beta"], seed=p["seed"])


def utility(model: torch.nn.Module, data: LLMStudyData) -> dict[str, float]:
    """heldout_ppl: perplexity of the held-out English rows; retain_loss: nats/token on shared training rows."""
    return {"heldout_ppl": math.exp(mean_token_loss(model, data.heldout_rows, batch_size=EVAL_BATCH)),
            "retain_loss": mean_token_loss(model, data.retain_sample(len(data.heldout_rows)), batch_size=EVAL_BATCH)}


def step_scores(model: torch.nn.Module, data: LLMStudyData, examples: pd.DataFrame, utility: bool = True
                ) -> tuple[np.ndarray, dict[str, float]]:
    """The ll of each row of ``examples`` and the :func:`utility` at one model state, in one
    :func:`forgetlab.scoring.score_rows` call (the vocabulary head only at scored positions; the frozen blocks'
    output still comes from the model's FrozenPrefixCache). Same numbers up to float32 rounding.
    ``utility=False`` scores the examples alone and returns an empty utility."""
    if not utility:
        return score_rows(model, [list(map(int, ids)) for ids in examples.ids],
                          [int(s) for s in examples.score_start]), {}
    heldout = data.heldout_rows
    retain = data.retain_sample(len(heldout))
    seqs = [list(map(int, ids)) for ids in examples.ids] + [r.tolist() for r in heldout] + [r.tolist() for r in retain]
    starts = [int(s) for s in examples.score_start] + [1] * (len(heldout) + len(retain))
    ll = score_rows(model, seqs, starts)
    n = len(examples)
    ll_h, ll_r = ll[n:n + len(heldout)], ll[n + len(heldout):]
    util = {"heldout_ppl": math.exp(-ll_h.sum() / (heldout.shape[0] * (heldout.shape[1] - 1))),
            "retain_loss": float(-ll_r.sum() / (retain.shape[0] * (retain.shape[1] - 1)))}
    return ll[:n], util


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


class SmolLM2:
    """The study on SmolLM2-135M-Instruct, through the same engine as the tiny model."""
    name = "smollm2-135m"
    kinds = KINDS

    def __init__(self, p: dict, data: LLMStudyData, models: LLMModels, tokenizer=None, fast: bool = True):
        unknown = [m for m in p["llm_methods"] if m not in METHODS]
        if unknown:
            raise ValueError(f"llm_methods has unknown methods {unknown}: use {', '.join(METHODS)}")
        self.p, self.data, self.models, self.tokenizer, self.fast = p, data, models, tokenizer, fast
        self.labels = llm_kind_labels(p)
        self.methods = tuple(p["llm_methods"])
        self.original_seeds = models.seeds
        self.pad_id = data.start_id
        self.retain_rows = data.retain_rows
        self.target_bits = p["llm_target_bits"]
        self._trie: LlamaCandidateTrie | None = None
        self._working_copy: tempfile.TemporaryDirectory | None = None     # see worker_recipe

    @classmethod
    def build(cls, p: dict, device: str | torch.device = "cpu", cache: ArtifactCache | None = None,
              fast: bool = True) -> "SmolLM2":
        """Load SmolLM2 (converted once from its GGUF), build the forget sets, fine-tune (or load) the models."""
        from . import llm
        model, tokenizer = llm.load_smollm(cache, device=device)
        data = build_llm_data(p, tokenizer)
        models = get_llm_models(p, data, model, llm.llm_key(llm.gguf_path()), cache)
        return cls(p, data, models, tokenizer, fast)

    def settings(self, method: str) -> UnlearnSettings:
        return unlearn_settings(self.p, method)

    def view(self, kind: str) -> ForgetSetView:
        return ForgetSetView.build(self.data.examples, kind, self.kinds)

    def original(self, seed: int) -> torch.nn.Module:
        if seed not in self.models.originals:
            raise ValueError(f"no fine-tuned original with seed {seed}: the seeds are {self.models.seeds} "
                             f"(llm_original_seeds)")
        return self.models.use(self.models.originals[seed])

    def release(self, model: torch.nn.Module) -> None:
        self.models.use(self.models.original)
        model.zero_grad(set_to_none=True)
        model.eval()

    def reference_logprobs(self, examples: pd.DataFrame) -> np.ndarray:
        out = []
        for seed in sorted(self.models.references):
            self.models.use(self.models.references[seed])
            out.append(self.example_logprobs(self.models.model, examples))
        self.models.use(self.models.original)
        return np.stack(out)

    def example_logprobs(self, model: torch.nn.Module, examples: pd.DataFrame) -> np.ndarray:
        """ll of each example's scored tokens: :func:`forgetlab.scoring.score_rows` (``fast``: the head only at
        scored positions, as ``step_scores`` scores the unlearned models), else padded batches of full logits."""
        if not self.fast:
            return metrics.example_logprobs(model, examples, batch_size=EVAL_BATCH)
        return score_rows(model, [list(map(int, i)) for i in examples.ids], [int(s) for s in examples.score_start])

    def candidate_logprobs(self, model: torch.nn.Module) -> np.ndarray:
        """ll of every canary candidate: the digit trie over the trained blocks (``fast``), else every
        (digits-1)-digit path through the whole model."""
        d = self.data
        if not self.fast or type(model).__name__ != "LlamaForCausalLM":
            return canaries.candidate_logprobs(model, d.canary_prefix, d.digit_ids, d.canary_digits)
        if self._trie is None:
            n_frozen = len(model.model.layers) - self.p["llm_train_layers"]
            self._trie = LlamaCandidateTrie(model, d.canary_prefix, d.digit_ids, d.canary_digits, n_frozen)
        return self._trie(model)

    def utility(self, model: torch.nn.Module) -> dict[str, float]:
        return utility(model, self.data)

    def step_scores(self, model: torch.nn.Module, examples: pd.DataFrame, utility: bool = True
                    ) -> tuple[np.ndarray, dict[str, float]]:
        """``example_logprobs`` and (unless ``utility=False``) ``utility`` at one model state in one go (the
        engine's fast evaluator)."""
        return step_scores(model, self.data, examples, utility=utility)

    @property
    def poolable(self) -> bool:
        """Whether run_study may run the trajectories on worker processes (the fast paths on a CPU)."""
        return self.fast and next(self.models.model.parameters()).device.type == "cpu"

    def worker_recipe(self) -> tuple:
        """How a worker process rebuilds this backend: from the working copy, written once to a temporary file
        (removed with this backend) that each worker maps (:func:`forgetlab.llm_pool.load_working_copy`)."""
        if self._working_copy is None:
            self._working_copy = tempfile.TemporaryDirectory(prefix="forgetlab-smollm2-")
        path = Path(self._working_copy.name) / "working-copy.pt"
        if not path.exists():
            llm_pool.save_working_copy(self.models, path)
        return from_working_copy, (str(path), self.p, self.data, self.fast)

    def key(self, seed: int) -> str:
        original = self.models.meta[f"original (seed {seed})"]["key"]
        return cache_key(self.name, code_version("backend_smollm", "llm_trie"), original, self.data.fingerprint(),
                         params_in(self.p, "run", "unlearning", "llm_unlearning"), EVAL_BATCH,
                         *(() if getattr(self, "fast", True) else ("paths before the trie",)))


def from_working_copy(path: str, p: dict, data: LLMStudyData, fast: bool = True) -> SmolLM2:
    """The backend in a worker process: the models mapped from the file ``SmolLM2.worker_recipe`` wrote."""
    return SmolLM2(p, data, llm_pool.load_working_copy(path), None, fast)


def canary_exposure_table(results: pd.DataFrame) -> pd.DataFrame:
    """Exact exposure (bits) of the forget canaries before unlearning, per original seed: mean, min and max over the
    canaries (at most log2(10**digits) bits: the secret ranks first among every candidate)."""
    t = results[(results.step == 0) & (results.metric == "exposure_exact_bits") & (results.role == "forget")]
    t = t.drop_duplicates(["uid", "seed"])               # step 0 is the same model for every method
    return (t.groupby("seed").value.agg(["mean", "min", "max"]).rename(columns=lambda c: f"{c}_exposure_bits")
            .reset_index().rename(columns={"seed": "original_seed"}))

"""A minimal backend for engine tests: random tiny GPT-2 models on random token rows (seconds, no data build)."""
from __future__ import annotations

import copy
import math
import os
import time

import numpy as np
import pandas as pd
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from forgetlab import metrics
from forgetlab.engine import ForgetSetView
from forgetlab.scoring import mean_token_loss
from forgetlab.unlearning import UnlearnSettings

VOCAB, LENGTH = 32, 7


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def examples(kinds=("a", "b"), seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for kind in kinds:
        for role, n in (("forget", 2), ("control", 1), ("population", 3)):
            for i in range(n):
                ids = [0] + rng.integers(1, VOCAB, size=LENGTH - 1).tolist()
                rows.append({"uid": f"{kind}-{role}-{i}", "kind": kind, "role": role, "ids": ids,
                             "score_start": 1, "n_scored": LENGTH - 1, "secret": ""})
    return pd.DataFrame(rows)


class FakeBackend:
    """Two kinds, two methods, two original seeds, two references; steps and lr chosen to move GenEx visibly."""
    name = "fake"
    kinds = ("a", "b")
    labels = {"a": "kind A", "b": "kind B"}
    methods = ("ga", "npo")
    pad_id = 0
    target_bits = 1.0

    def __init__(self, original_seeds=(0, 1), steps: int = 4):
        self.examples = examples()
        self.original_seeds = list(original_seeds)
        self.steps = steps
        self.retain_rows = np.random.default_rng(5).integers(0, VOCAB, size=(8, LENGTH))
        self._originals = {s: tiny_gpt2(s) for s in self.original_seeds}
        self._references = [tiny_gpt2(100 + s) for s in (0, 1)]
        self.released = 0

    def settings(self, method: str) -> UnlearnSettings:
        return UnlearnSettings(method=method, lr=0.01, steps=self.steps, batch=2, record_every=2, seed=0)

    def view(self, kind: str) -> ForgetSetView:
        return ForgetSetView.build(self.examples, kind, self.kinds)

    def original(self, seed: int) -> torch.nn.Module:
        return copy.deepcopy(self._originals[seed])

    def release(self, model: torch.nn.Module) -> None:
        self.released += 1
        time.sleep(float(os.environ.get("FAKE_BACKEND_SLEEP", "0")))   # lets a test kill a run mid-way

    def reference_logprobs(self, ex: pd.DataFrame) -> np.ndarray:
        return np.stack([metrics.example_logprobs(m, ex) for m in self._references])

    def example_logprobs(self, model, ex: pd.DataFrame) -> np.ndarray:
        return metrics.example_logprobs(model, ex)

    def candidate_logprobs(self, model) -> np.ndarray:
        raise AssertionError("no canaries in the fake study")

    def utility(self, model) -> dict[str, float]:
        return {"heldout_ppl": math.exp(mean_token_loss(model, self.retain_rows))}

    def key(self, seed: int) -> str:
        return f"fake-{seed}-{self.steps}"

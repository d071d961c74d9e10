"""Pretrain once, fine-tune per seed: how the tiny study's original and reference models are built.

``models_from: base`` (closer to Baluta et al., who fine-tune pretrained LMs on data that holds the forget sets):
one *base* model per run is trained on the Shakespeare training stream only (``data.train_rows``: no forget, twin
or background rows), from the run's ``seed``. Every original and every reference model is a copy of that base
fine-tuned on

- its inserted rows, exactly as :func:`forgetlab.roles.training_rows` builds them (the original: each forget
  example ``insertions`` times; the reference: the twins in their place under ``reference_data: twins``; both: the
  background ``background_insertions`` times), and
- a replay sample of ``finetune_replay_rows`` training-stream rows, the same rows for every model (seeded by the
  run's ``seed``), so fine-tuning does not drift away from Shakespeare.

The batch order of fine-tuning is set by the model's seed. With twins an original and a reference therefore see the
same number of rows and take the same number of steps. ``models_from: scratch`` keeps the older design (every
model trained from scratch on the whole stream plus its rows, see :mod:`forgetlab.experiment`).

This module holds what determines the weights (rows, seeds, training calls); caching lives in ``experiment``.
"""
from __future__ import annotations

import copy
import hashlib

import numpy as np
import pandas as pd
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .forget_sets import StudyData
from .models import build_model, seed_everything
from .roles import training_rows
from .training import train_lm

# Parameters of the 'training' section that only the fine-tuning reads: the base model's key leaves them out, so
# trying another fine-tuning setting reuses the cached base, and so does models_from: scratch's key (it keeps the
# key it had before these parameters existed, so old cached models are found again).
FINETUNE_PARAMS = ("models_from", "finetune_epochs", "finetune_lr", "finetune_replay_rows")
REPLAY_STREAM = 2_417              # separates the replay draw from every other draw seeded by the run's seed


def replay_indices(n_stream: int, n_replay: int, seed: int) -> np.ndarray:
    """Sorted indices of the replay sample: `n_replay` distinct rows of a stream of `n_stream` (all of them when the
    stream is shorter), drawn from the run's `seed` only, so every model of a run replays the same rows."""
    if n_replay >= n_stream:
        return np.arange(n_stream)
    rng = np.random.default_rng([seed, REPLAY_STREAM])
    return np.sort(rng.choice(n_stream, size=n_replay, replace=False))


def finetune_rows(data: StudyData, role: str, replay: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine-tuning rows of one original or reference: the replay rows (stream order), then its inserted rows as
    :func:`forgetlab.roles.training_rows` builds them. Returns (ids, labels, row_uid), row_uid '' on replay rows."""
    ids, labels, row_uid = training_rows(data, role)
    n = len(data.train_rows)
    replay = np.asarray(replay, dtype=np.int64)
    return (np.concatenate([data.train_rows[replay], ids[n:]]), np.concatenate([data.train_rows[replay], labels[n:]]),
            np.concatenate([np.array([""] * len(replay), dtype=object), row_uid[n:]]))


def rows_digest(rows: np.ndarray) -> str:
    """A short hash of token rows (the model records which replay rows it saw)."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def pretrain(p: dict, data: StudyData, config: GPT2Config, device: torch.device, eval_rows: np.ndarray,
             desc: str = "base model") -> tuple[GPT2LMHeadModel, pd.DataFrame]:
    """The base model: trained like a reference model of ``models_from: scratch`` (same epochs, batch, learning
    rate and warmup) but on the training stream alone, from the run's ``seed``. Returns (model, loss curve)."""
    model = build_model(config, p["seed"])
    curve = train_lm(model, data.train_rows, data.train_rows, epochs=p["epochs"], batch_size=p["batch_size"],
                     learning_rate=p["learning_rate"], warmup_steps=p["warmup_steps"], seed=p["seed"], device=device,
                     eval_rows=eval_rows, desc=desc)
    return model, curve


def finetune(p: dict, base: torch.nn.Module, ids: np.ndarray, labels: np.ndarray, seed: int, device: torch.device,
             eval_rows: np.ndarray, desc: str = "fine-tuning") -> tuple[torch.nn.Module, pd.DataFrame]:
    """A copy of `base` fine-tuned on the rows (``finetune_epochs`` passes, peak ``finetune_lr`` with no warmup:
    the base is already trained, then cosine decay), batch order from `seed`; the base is left untouched.
    With no rows at all the copy is returned as it is (its curve: the held-out loss at step 0)."""
    seed_everything(seed)
    model = copy.deepcopy(base)
    if len(ids) == 0:
        from .scoring import mean_token_loss
        held = mean_token_loss(model.to(device).eval(), eval_rows, device=device)
        return model, pd.DataFrame([{"step": 0, "split": "held-out", "loss": held}])
    curve = train_lm(model, ids, labels, epochs=p["finetune_epochs"], batch_size=p["batch_size"],
                     learning_rate=p["finetune_lr"], warmup_steps=0, seed=seed, device=device, eval_rows=eval_rows,
                     desc=desc)
    return model, curve


def steps_of(curve: pd.DataFrame) -> int:
    """Optimizer steps a loss curve records (0 when it holds no training step)."""
    train = curve[curve.split == "train"]
    return int(train.step.max()) + 1 if len(train) else 0

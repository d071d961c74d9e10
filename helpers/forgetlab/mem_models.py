"""The memorization study, step 2: subset models, each fine-tuned from one base on its half of the pool.

One base model trained without the pool (notebook 02's pretrained base) is fine-tuned ``mem_models``
times, each time on one half of the pool (every example ``insertions`` times, as in the main study) mixed with
the same sample of shared training rows, so the models do not drift. All subset models use the same
fine-tuning seed (same batch order): they differ only in which half they saw. Each model is cached under a
key over its base, its settings and the examples it saw.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .cache import ArtifactCache, cache_key, code_version
from .config import params_in
from .experiment import TrainedModel, config_for, get_base, get_model, model_key
from .forget_sets import StudyData, pad_rows
from .mem_pool import POOL_SEED_OFFSET, MemorizationInputError
from .models import model_from_tensors, pick_device, seed_everything
from .training import train_lm

MEM_MODEL_CODE = ("mem_models", "mem_pool", "models", "training")   # the code that builds a subset model

FINETUNE_LR_SCALE = 0.1       # fine-tuning peak learning rate = this x learning_rate (the base's final rate)
SHARED_RATIO = 1.0            # shared training rows per pool row in each subset model's fine-tuning data


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


def finetune_copy(base: torch.nn.Module, ids: np.ndarray, labels: np.ndarray, *, epochs: float, batch_size: int,
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
    """One fine-tuned subset model: its index in the split, the model, the uids it saw, its cache key and record."""
    index: int
    model: torch.nn.Module
    seen_uids: list[str]
    key: str
    meta: dict


def get_base_model(p: dict, data: StudyData, cache: ArtifactCache | None = None) -> TrainedModel:
    """The base of every subset, dose and lab model: the run's pretrained base (notebook 02; it never saw a pool,
    forget, twin or background example), or under ``models_from: scratch`` the first reference model."""
    if p["models_from"] == "base":
        return get_base(p, data, cache)
    return get_model(p, data, "reference", p["reference_seeds"][0], cache)


def finetune_settings(p: dict) -> dict:
    """What determines each subset model's fine-tuning (part of its cache key)."""
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
        key = cache_key("mem-model", code_version(*MEM_MODEL_CODE), base_key,
                        params_in(p, "run", "data", "training", "memorization"), n_shared,
                        [list(map(int, i)) for i in pool.ids[seen[m]]], uids)

        def build(m=m, uids=uids):
            ids, labels, _ = subset_rows(pool, seen[m], p["insertions"], shared, data.block_size, data.bos)
            model, curve = finetune_copy(base.model, ids, labels, epochs=fs["epochs"], batch_size=fs["batch_size"],
                                         learning_rate=fs["learning_rate"], seed=fs["seed"], device=device,
                                         desc=f"subset model {m}")
            meta = {"index": m, "seen_uids": uids, "rows": len(ids), "shared_rows": len(shared), "base": base_key,
                    "final_train_loss": float(curve.loss.iloc[-1]), "settings": fs}
            return meta, model.state_dict(), None

        meta, tensors, _ = cache.get_or_build("mem-models", key, build)
        model = model_from_tensors(config, tensors, device)
        out.append(SubsetModel(m, model, uids, key, meta))
    return out


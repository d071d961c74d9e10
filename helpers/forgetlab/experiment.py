"""Cached building blocks that every notebook shares: study data and trained models.

A notebook asks for what it needs; if an earlier notebook (or run) already built it with the
same parameters, it comes from the cache, otherwise it is built now and cached.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd
import torch
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from .cache import ArtifactCache, cache_key, code_version
from .config import params_in
from .forget_sets import StudyData, build_study_data, training_rows
from .models import build_model, count_parameters, model_config, model_from_tensors, pick_device
from .training import train_lm
from .user_sources import source_digest

EVAL_ROWS = 64
DATA_CODE = ("data", "forget_sets", "roles", "tokenizer", "user_sources")   # modules that build the study data
MODEL_CODE = ("models", "training")                                          # ... and the models


@dataclass
class TrainedModel:
    role: str                 # "original" or "reference"
    seed: int
    model: GPT2LMHeadModel
    curve: pd.DataFrame
    meta: dict


def data_key(p: dict) -> str:
    """Key of the study data: the run and data sections, the custom source's content, the code that builds it."""
    return cache_key("study-data", code_version(*DATA_CODE), params_in(p, "run", "data"),
                     source_digest(p["custom_source"]))


def get_study_data(p: dict, cache: ArtifactCache | None = None) -> StudyData:
    """Tokenizer, forget sets and training rows for parameters `p` (deterministic; cached)."""
    cache = cache or ArtifactCache()
    key = data_key(p)
    built: list[StudyData] = []

    def build() -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
        data = build_study_data(p)
        built.append(data)
        return ({"sources": data.sources, "params": params_in(p, "run", "data")},
                {"train_rows": torch.from_numpy(data.train_rows), "heldout_rows": torch.from_numpy(data.heldout_rows)},
                {"tokenizer.json": data.tokenizer.to_str(), "examples.json": data.examples.to_json(orient="records")})

    meta, tensors, files = cache.get_or_build("data", key, build)
    if built:
        return built[0]
    examples = pd.DataFrame(json.loads(files["examples.json"]))
    return StudyData(Tokenizer.from_str(files["tokenizer.json"]), examples,
                     tensors["train_rows"].numpy(), tensors["heldout_rows"].numpy(), p["block_size"],
                     p["canary_digits"], p["insertions"], p["background_insertions"], meta["sources"])


def model_key(p: dict, data: StudyData | str, role: str, seed: int) -> str:
    """Key of one tiny model: the model and training sections, the data's fingerprint, its role and seed."""
    fingerprint = data if isinstance(data, str) else data.fingerprint()
    return cache_key("tiny-lm", code_version(*MODEL_CODE), params_in(p, "model", "training"), fingerprint, role,
                     seed)


def config_for(p: dict, data: StudyData) -> GPT2Config:
    return model_config(data.tokenizer.get_vocab_size(), p["n_layer"], p["n_head"], p["d_model"],
                        p["block_size"], data.bos)


def get_model(p: dict, data: StudyData, role: str, seed: int, cache: ArtifactCache | None = None) -> TrainedModel:
    """The original (with forget sets) or reference (without) model for one seed; trained if not cached."""
    if role not in ("original", "reference"):
        raise ValueError(f"role must be 'original' or 'reference', not {role!r}")
    cache = cache or ArtifactCache()
    device = pick_device(p["device"])
    key = model_key(p, data, role, seed)
    config = config_for(p, data)
    built: list[TrainedModel] = []

    def build() -> tuple[dict, dict[str, torch.Tensor], None]:
        ids, labels, _ = training_rows(data, include_forget=(role == "original"))
        model = build_model(config, seed)
        curve = train_lm(model, ids, labels, epochs=p["epochs"], batch_size=p["batch_size"],
                         learning_rate=p["learning_rate"], warmup_steps=p["warmup_steps"], seed=seed, device=device,
                         eval_rows=data.heldout_rows[:EVAL_ROWS], desc=f"{role} seed {seed}")
        meta = {"role": role, "seed": seed, "data_fingerprint": data.fingerprint(),
                "parameters": count_parameters(model), "train_rows": len(ids),
                "train_tokens": int((labels != -100).sum()), "curve": curve.to_dict(orient="list")}
        built.append(TrainedModel(role, seed, model.eval(), curve, meta))
        return meta, model.state_dict(), None

    meta, tensors, _ = cache.get_or_build("models", key, build)
    if built:
        return built[0]
    return TrainedModel(role, seed, model_from_tensors(config, tensors, device), pd.DataFrame(meta["curve"]), meta)


def get_models(p: dict, data: StudyData, cache: ArtifactCache | None = None) -> dict[str, list[TrainedModel]]:
    """All original and reference models of the run."""
    return {"original": [get_model(p, data, "original", s, cache) for s in p["original_seeds"]],
            "reference": [get_model(p, data, "reference", s, cache) for s in p["reference_seeds"]]}


def model_label(m: TrainedModel) -> str:
    return f"{m.role} (seed {m.seed})"


def model_table(models: dict[str, list[TrainedModel]]) -> pd.DataFrame:
    """One row per trained model: size, data, final held-out loss and perplexity."""
    rows = []
    for m in models["original"] + models["reference"]:
        held = m.curve[m.curve.split == "held-out"]
        final = float(held.loss.iloc[-1])
        rows.append({"model": model_label(m), "role": m.role, "seed": m.seed, "parameters": m.meta["parameters"],
                     "train_rows": m.meta["train_rows"], "train_tokens": m.meta["train_tokens"],
                     "heldout_loss": final, "heldout_ppl": math.exp(final)})
    return pd.DataFrame(rows)


def loss_curve_table(models: dict[str, list[TrainedModel]]) -> pd.DataFrame:
    return pd.concat([m.curve.assign(model=model_label(m)) for m in models["original"] + models["reference"]],
                     ignore_index=True)


def example_loss_table(models: dict[str, list[TrainedModel]], examples: pd.DataFrame) -> pd.DataFrame:
    """Per-token loss (nats) of every example under every model: uid, kind, role, model_role, seed, loss."""
    from .metrics import example_logprobs
    frames = []
    for m in models["original"] + models["reference"]:
        ll = example_logprobs(m.model, examples)
        frames.append(examples[["uid", "kind", "role"]].assign(model_role=m.role, seed=m.seed,
                                                               loss=-ll / examples.n_scored.to_numpy()))
    return pd.concat(frames, ignore_index=True)


def canary_exposure_table(models: dict[str, list[TrainedModel]], data: StudyData) -> pd.DataFrame:
    """Exact exposure of every forget canary under every model: uid, secret, model, role, exposure_bits, rank."""
    from .backend_tiny import canary_exposures
    canaries = data.select("canary", "forget")
    frames = []
    for m in models["original"] + models["reference"]:
        table = canary_exposures(m.model, data, canaries)
        frames.append(table.assign(model=model_label(m), role=m.role, secret=canaries.secret.to_numpy()))
    return pd.concat(frames, ignore_index=True)

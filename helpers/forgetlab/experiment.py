"""Cached building blocks that every notebook shares: study data and trained models.

A notebook asks for what it needs; if an earlier notebook (or run) already built it with the
same parameters, it comes from the cache, otherwise it is built now and cached.

Models (``models_from``, see :mod:`forgetlab.base_models`): ``base`` pretrains one base model per run on the
training stream and fine-tunes a copy of it for every original and reference seed; ``scratch`` trains every model
from scratch on the whole stream plus its inserted rows (the older design, reproduced bit for bit).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from . import base_models
from .cache import ArtifactCache, cache_key, code_version
from .config import params_in
from .forget_sets import StudyData, build_study_data, training_rows
from .models import build_model, count_parameters, model_config, model_from_tensors, pick_device
from .training import train_lm
from .user_sources import source_digest

EVAL_ROWS = 64
DATA_CODE = ("data", "forget_sets", "roles", "tokenizer", "user_sources")   # modules that build the study data
MODEL_CODE = ("models", "training")                                          # ... and the models from scratch
BASE_CODE = ("base_models", "models", "training")                             # ... the base model
FINETUNED_CODE = BASE_CODE + ("roles",)                                       # ... the models fine-tuned from it
MODEL_ROLES = ("original", "reference")


@dataclass
class TrainedModel:
    role: str                 # "original", "reference" or "base"
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


def stream_fingerprint(data: StudyData | str) -> str:
    """Hash of what the base model depends on: the tokenizer, the training stream and the held-out rows its curve
    is measured on (not the forget sets: changing them, or how often they are inserted, keeps the base)."""
    if isinstance(data, str):
        return data
    h = hashlib.sha256(data.tokenizer.to_str().encode())
    h.update(np.ascontiguousarray(data.train_rows).tobytes())
    h.update(np.ascontiguousarray(data.heldout_rows[:EVAL_ROWS]).tobytes())
    return h.hexdigest()[:16]


def training_params(p: dict, *, finetuning: bool) -> dict:
    """The model and training sections, with or without the parameters only fine-tuning reads."""
    out = params_in(p, "model", "training")
    return out if finetuning else {k: v for k, v in out.items() if k not in base_models.FINETUNE_PARAMS}


def base_key(p: dict, data: StudyData | str) -> str:
    """Key of the run's base model: the model and training sections (not fine-tuning's), the run's seed, the
    training stream."""
    return cache_key("tiny-lm-base", code_version(*BASE_CODE), training_params(p, finetuning=False),
                     stream_fingerprint(data), p["seed"])


def model_key(p: dict, data: StudyData | str, role: str, seed: int) -> str:
    """Key of one tiny model: the model and training sections, the data's fingerprint, its role and seed; a model
    fine-tuned from the base also has the base's key (``role='base'`` gives the base's own key).

    Under ``models_from: scratch`` the key is the one every model had before the fine-tuning parameters existed.
    """
    if role == "base":
        return base_key(p, data)
    fingerprint = data if isinstance(data, str) else data.fingerprint()
    if p["models_from"] == "scratch":
        return cache_key("tiny-lm", code_version(*MODEL_CODE), training_params(p, finetuning=False), fingerprint,
                         role, seed)
    return cache_key("tiny-lm-finetuned", code_version(*FINETUNED_CODE), training_params(p, finetuning=True),
                     base_key(p, data), fingerprint, role, seed)


def config_for(p: dict, data: StudyData) -> GPT2Config:
    return model_config(data.tokenizer.get_vocab_size(), p["n_layer"], p["n_head"], p["d_model"],
                        p["block_size"], data.bos)


def _loaded(role: str, seed: int, config: GPT2Config, built: list[TrainedModel], entry: tuple,
            device: torch.device) -> TrainedModel:
    """The model just built, or the one the cache returned."""
    if built:
        return built[0]
    meta, tensors, _ = entry
    return TrainedModel(role, seed, model_from_tensors(config, tensors, device), pd.DataFrame(meta["curve"]), meta)


def get_base(p: dict, data: StudyData, cache: ArtifactCache | None = None) -> TrainedModel:
    """The run's base model: trained like a reference model but on the training stream alone (no forget, twin or
    background rows), from the run's ``seed``; trained if not cached. Role 'base', seed ``p['seed']``."""
    cache = cache or ArtifactCache()
    device = pick_device(p["device"])
    config = config_for(p, data)
    built: list[TrainedModel] = []

    def build() -> tuple[dict, dict[str, torch.Tensor], None]:
        start, cpu = time.perf_counter(), time.process_time()
        model, curve = base_models.pretrain(p, data, config, device, data.heldout_rows[:EVAL_ROWS],
                                            desc=f"base model (seed {p['seed']})")
        meta = {"role": "base", "seed": p["seed"], "stream_fingerprint": stream_fingerprint(data),
                "parameters": count_parameters(model), "train_rows": len(data.train_rows),
                "train_tokens": int(data.train_rows.size), "steps": base_models.steps_of(curve),
                "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                "curve": curve.to_dict(orient="list")}
        built.append(TrainedModel("base", p["seed"], model.eval(), curve, meta))
        return meta, model.state_dict(), None

    entry = cache.get_or_build("models", base_key(p, data), build)
    return _loaded("base", p["seed"], config, built, entry, device)


def finetune_from_base(p: dict, data: StudyData, role: str, seed: int, source: TrainedModel, device,
                       desc: str) -> tuple[torch.nn.Module, pd.DataFrame, dict]:
    """A copy of the base `source` fine-tuned on `role`'s rows of `data` (shared replay sample, inserted examples)
    from `seed`: the model, its loss curve and its meta (what the cache stores beside the weights)."""
    start, cpu = time.perf_counter(), time.process_time()
    replay = base_models.replay_indices(len(data.train_rows), p["finetune_replay_rows"], p["seed"])
    ids, labels, row_uid = base_models.finetune_rows(data, role, replay)
    model, curve = base_models.finetune(p, source.model, ids, labels, seed, device, data.heldout_rows[:EVAL_ROWS],
                                        desc=desc)
    tokens = int((labels != -100).sum())
    meta = {"role": role, "seed": seed, "data_fingerprint": data.fingerprint(), "models_from": "base",
            "base": base_key(p, data), "parameters": count_parameters(model),
            "train_rows": source.meta["train_rows"] + len(ids),
            "train_tokens": source.meta["train_tokens"] + tokens,
            "finetune_rows": len(ids), "replay_rows": len(replay), "inserted_rows": int((row_uid != "").sum()),
            "finetune_tokens": tokens, "finetune_steps": base_models.steps_of(curve),
            "replay_digest": base_models.rows_digest(data.train_rows[replay]),
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "curve": curve.to_dict(orient="list")}
    return model, curve, meta


def get_model(p: dict, data: StudyData, role: str, seed: int, cache: ArtifactCache | None = None,
              base: TrainedModel | None = None) -> TrainedModel:
    """The original (with forget sets) or reference (twins or nothing in their place) model for one seed; built if
    not cached: fine-tuned from the run's base (``models_from: base``; `base` saves loading it again) or trained
    from scratch (``models_from: scratch``)."""
    if role not in MODEL_ROLES:
        raise ValueError(f"role must be 'original' or 'reference', not {role!r}")
    cache = cache or ArtifactCache()
    device = pick_device(p["device"])
    config = config_for(p, data)
    eval_rows = data.heldout_rows[:EVAL_ROWS]
    built: list[TrainedModel] = []

    def from_scratch() -> tuple[dict, dict[str, torch.Tensor], None]:
        start, cpu = time.perf_counter(), time.process_time()
        ids, labels, _ = training_rows(data, include_forget=(role == "original"))
        model = build_model(config, seed)
        curve = train_lm(model, ids, labels, epochs=p["epochs"], batch_size=p["batch_size"],
                         learning_rate=p["learning_rate"], warmup_steps=p["warmup_steps"], seed=seed, device=device,
                         eval_rows=eval_rows, desc=f"{role} seed {seed}")
        meta = {"role": role, "seed": seed, "data_fingerprint": data.fingerprint(), "models_from": "scratch",
                "parameters": count_parameters(model), "train_rows": len(ids),
                "train_tokens": int((labels != -100).sum()), "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu,
                "curve": curve.to_dict(orient="list")}
        built.append(TrainedModel(role, seed, model.eval(), curve, meta))
        return meta, model.state_dict(), None

    def from_base() -> tuple[dict, dict[str, torch.Tensor], None]:
        model, curve, meta = finetune_from_base(p, data, role, seed, base or get_base(p, data, cache), device,
                                                desc=f"fine-tuning {role} seed {seed}")
        built.append(TrainedModel(role, seed, model.eval(), curve, meta))
        return meta, model.state_dict(), None

    build = from_scratch if p["models_from"] == "scratch" else from_base
    entry = cache.get_or_build("models", model_key(p, data, role, seed), build)
    return _loaded(role, seed, config, built, entry, device)


def get_models(p: dict, data: StudyData, cache: ArtifactCache | None = None) -> dict[str, list[TrainedModel]]:
    """All original and reference models of the run; under ``models_from: base`` also ``"base"``: [the base]."""
    base = [get_base(p, data, cache)] if p["models_from"] == "base" else []
    built = {"original": [get_model(p, data, "original", s, cache, *base) for s in p["original_seeds"]],
             "reference": [get_model(p, data, "reference", s, cache, *base) for s in p["reference_seeds"]]}
    return {"base": base, **built} if base else built


def model_label(m: TrainedModel) -> str:
    return f"{m.role} (seed {m.seed})"


def _stage(m: TrainedModel) -> str:
    if m.role == "base":
        return "pretraining"
    return "fine-tuning" if m.meta.get("models_from") == "base" else "from scratch"


def model_table(models: dict[str, list[TrainedModel]]) -> pd.DataFrame:
    """One row per model (the base first, if any): size, data, fine-tuning rows and steps, final held-out loss and
    perplexity. ``train_rows``/``train_tokens`` count every row a model learned from (a fine-tuned model: its
    base's stream plus its fine-tuning rows); ``finetune_rows``/``finetune_steps`` are 0 for the base and for
    models trained from scratch."""
    rows = []
    for m in models.get("base", []) + models["original"] + models["reference"]:
        held = m.curve[m.curve.split == "held-out"]
        final = float(held.loss.iloc[-1])
        rows.append({"model": model_label(m), "role": m.role, "seed": m.seed, "built": _stage(m),
                     "parameters": m.meta["parameters"], "train_rows": m.meta["train_rows"],
                     "train_tokens": m.meta["train_tokens"], "finetune_rows": m.meta.get("finetune_rows", 0),
                     "finetune_steps": m.meta.get("finetune_steps", 0), "heldout_loss": final,
                     "heldout_ppl": math.exp(final)})
    return pd.DataFrame(rows)


def build_seconds(models: dict[str, list[TrainedModel]]) -> pd.Series:
    """Seconds each model took to build, as recorded when it was built (not when it was loaded from the cache)."""
    every = models.get("base", []) + models["original"] + models["reference"]
    return pd.Series({model_label(m): m.meta.get("seconds", float("nan")) for m in every}, name="seconds to build")


def loss_curve_table(models: dict[str, list[TrainedModel]]) -> pd.DataFrame:
    """Every model's loss curve (model, stage, step, split, loss): the base's pretraining ('pretraining'), each
    fine-tuned model's own steps from its base ('fine-tuning'), or a model trained 'from scratch'."""
    every = models.get("base", []) + models["original"] + models["reference"]
    return pd.concat([m.curve.assign(model=model_label(m), stage=_stage(m)) for m in every], ignore_index=True)


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

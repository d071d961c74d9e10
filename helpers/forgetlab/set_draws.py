"""Set-draw models: how much the controls' GenEx moves with the random draw of the forget and twin sets.

The forget set F and its twin set T are one random draw each, shared by every original (fine-tuned on F) and every
reference (fine-tuned on T). Never-trained controls may happen to resemble F or T more, which gives every original
seed the same offset against the reference ensemble: a *set-level* offset that no interval over seeds and controls
can contain. To measure it, ``sanity_set_models`` extra models are built, draw j = 0, 1, ...:

- a fresh set of every kind, of the forget set's size and token length, from the same source and rules as the twins
  (ID: line-start windows of the training plays found once in them; canaries: fresh secrets; language, code,
  custom: their pools), never used by any role of the study nor by an earlier draw; ID windows are taken, when
  there are enough, among those the base model did not pretrain on (no half of them inside a kept training row:
  the forget and twin windows were cut out of its stream; the draws cannot be, without changing the base), else
  among all (``in_base_stream`` says which);
- one model per draw: a copy of the run's base fine-tuned exactly like an original (same replay rows, background
  rows, insertions, fine-tuning epochs and learning rate) with the draw's set in place of the forget set, from seed
  ``DRAW_SEED + j``.

The draws use their own random generators (seeded by the run's seed, j and the kind), so every role, example and
cache key of the study stays as it is. Only ``models_from: base`` is supported: under ``scratch``
:func:`get_set_draw_models` refuses (each draw would be a whole training run from scratch).
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cache import ArtifactCache, cache_key, code_version
from .experiment import (DATA_CODE, FINETUNED_CODE, TrainedModel, _loaded, base_key, config_for, data_key,
                         finetune_from_base, get_base, training_params)
from .forget_sets import (LEGACY, StudyData, dedupe_windows, example_row, language_parts, line_start_windows,
                          load_sources, record_windows, unused_values)
from .models import pick_device
from .user_sources import read_records

DRAW_SEED = 1000          # draw j's model is fine-tuned from seed DRAW_SEED + j (the study's seeds are small)
ROLE = "set_draw"         # role of the drawn examples and model_role of the draw models' scores
DRAW_COLUMNS = ["uid", "kind", "role", "draw", "source", "text", "ids", "n_tokens", "score_start", "n_scored",
                "secret", "in_base_stream"]


def draw_seed(j: int) -> int:
    """The fine-tuning seed of draw j's model."""
    return DRAW_SEED + j


def draw_pools(p: dict, tok) -> dict[str, tuple[str, list[list[int]]]]:
    """Per text kind of ``forget_kinds`` (id, language, code, custom): (source name, every candidate window of
    ``example_tokens`` tokens, without BOS) from the same sources and rules its roles are dealt from: ID, the
    line-start windows of the training plays whose content is found once in them (as the twins); language, code and
    custom, their deduplicated pools (as :func:`forgetlab.forget_sets.build_study_data` cuts them). The caller
    removes the windows any role uses. `tok` is the study data's tokenizer."""
    kinds, L = p["forget_kinds"], p["example_tokens"]
    src = load_sources(p["heldout_plays"], p["seed"], tuple(language_parts(p["language"])))
    out: dict[str, tuple[str, list[list[int]]]] = {}
    if "id" in kinds:
        texts = list(src["train"]["text"])
        windows = [w for t, e in zip(texts, tok.encode_batch(texts)) for w in line_start_windows(tok, t, L, e)]
        count: dict[tuple, int] = {}
        for w in windows:
            count[tuple(w)] = count.get(tuple(w), 0) + 1
        out["id"] = ("shakespeare/train", [w for w in windows if count[tuple(w)] == 1])
    language = "other-language/chatterbot" if p["language"] == LEGACY["language"] else f"chatterbot/{p['language']}"
    for kind, name in (("language", language), ("code", "python/stdlib")):
        if kind in kinds:
            texts = list(src[kind]["text"])
            out[kind] = (name, dedupe_windows([w for t, e in zip(texts, tok.encode_batch(texts))
                                               for w in line_start_windows(tok, t, L, e)]))
    if "custom" in kinds:
        records = read_records(p["custom_source"], p["custom_format"], p["custom_text_field"])
        out["custom"] = (f"custom/{Path(p['custom_source']).name}", dedupe_windows(record_windows(records, tok, L)[0]))
    return out


def _hashes(windows: np.ndarray) -> np.ndarray:
    """A 64-bit polynomial hash of each window (last axis), wrapping in uint64 arithmetic."""
    powers = np.full(windows.shape[-1], 1_000_003, dtype=np.uint64) ** np.arange(windows.shape[-1], dtype=np.uint64)
    return (windows.astype(np.uint64) * powers).sum(axis=-1, dtype=np.uint64)


def in_rows(windows: list[list[int]], rows: np.ndarray) -> np.ndarray:
    """Per window (all of one length): is it inside one of the token rows (what the base model trained on whole)?
    Compared by 64-bit hashes, one row offset at a time, so memory stays at one hash per row position."""
    if not windows:
        return np.zeros(0, dtype=bool)
    length, rows = len(windows[0]), np.asarray(rows, dtype=np.int64)
    if rows.shape[1] < length:
        return np.zeros(len(windows), dtype=bool)
    inside = np.concatenate([_hashes(rows[:, i:i + length]) for i in range(rows.shape[1] - length + 1)])
    return np.isin(_hashes(np.asarray(windows, dtype=np.int64)), inside)


def trained_on(windows: list[list[int]], rows: np.ndarray) -> np.ndarray:
    """Per window: did the base model train on at least half of it? True when its first or its last ceil(L/2)
    tokens lie inside one row (a window that a row boundary splits has one of these halves inside a row)."""
    if not windows:
        return np.zeros(0, dtype=bool)
    h = -(-len(windows[0]) // 2)
    return in_rows([w[:h] for w in windows], rows) | in_rows([w[-h:] for w in windows], rows)


def build_draws(p: dict, data: StudyData, n_draws: int) -> pd.DataFrame:
    """The examples of draws 0..n_draws-1 (columns :data:`DRAW_COLUMNS`): per draw and kind, as many examples as the
    forget set has, of its token length, disjoint from every role of `data` and from each other. Draw j is the
    same whatever ``n_draws`` is, and each kind's draw whatever the other kinds are (draws are made in order, each
    draw and kind from its own generator)."""
    tok = data.tokenizer
    forget = data.examples[data.examples.role == "forget"]
    sizes = forget.groupby("kind", sort=False).size().to_dict()
    used = {tuple(list(ids)[1:]) for ids in data.examples.ids}
    pools = draw_pools(p, tok) if set(sizes) - {"canary"} else {}
    secrets = {int(s) for s in data.examples.secret if isinstance(s, str) and s}
    rows = []
    for j in range(n_draws):
        for kind, n in sizes.items():
            rng = random.Random(f"forgetlab-set-draws/{p['seed']}/{j}/{kind}")    # one generator per draw and kind
            if kind == "canary":
                values = unused_values(rng, 10 ** data.canary_digits, secrets, n)
                secrets.update(values)
                for i, v in enumerate(values):
                    s = f"{v:0{data.canary_digits}d}"
                    ids = data.canary_ids(s)
                    rows.append({**example_row(kind, ROLE, i, "canary/template", ids, len(ids) - len(s), tok, s),
                                 "uid": f"{kind}-draw{j}-{i:03d}", "draw": j, "in_base_stream": False})
                continue
            source, pool = pools[kind]
            free = [w for w in pool if tuple(w) not in used]
            seen = {tuple(w) for w, s in zip(free, trained_on(free, data.train_rows)) if s} if kind == "id" else set()
            unseen = [w for w in free if tuple(w) not in seen]
            pick_from = unseen if len(unseen) >= n else free
            if len(pick_from) < n:
                raise ValueError(f"{kind}: {len(free)} unused windows left but draw {j} needs {n}: lower "
                                 f"sanity_set_models or forget_size")
            for i, w in enumerate(rng.sample(pick_from, n)):
                used.add(tuple(w))
                rows.append({**example_row(kind, ROLE, i, source, [data.bos] + w, 1, tok),
                             "uid": f"{kind}-draw{j}-{i:03d}", "draw": j, "in_base_stream": tuple(w) in seen})
    return pd.DataFrame(rows, columns=DRAW_COLUMNS)


def draws_key(p: dict, n_draws: int) -> str:
    """Key of the draws' examples: the study data's key, the number of draws, the code that draws them."""
    return cache_key("set-draws", code_version(*DATA_CODE, "set_draws"), data_key(p), n_draws)


def get_draws(p: dict, data: StudyData, cache: ArtifactCache | None = None) -> pd.DataFrame:
    """The examples of the run's ``sanity_set_models`` draws (cached: drawing reads and encodes the sources)."""
    cache = cache or ArtifactCache()
    n = p["sanity_set_models"]
    built: list[pd.DataFrame] = []

    def build() -> tuple[dict, None, dict[str, str]]:
        built.append(build_draws(p, data, n))
        return {"draws": n}, None, {"draws.json": built[0].to_json(orient="records")}

    _, _, files = cache.get_or_build("data", draws_key(p, n), build)
    if built:
        return built[0]
    return pd.DataFrame(json.loads(files["draws.json"]), columns=DRAW_COLUMNS)


def draw_data(data: StudyData, draws: pd.DataFrame, j: int) -> StudyData:
    """The study data with draw j's examples in place of the forget set (same uids, order and role), so that
    :func:`forgetlab.base_models.finetune_rows` builds draw j's rows exactly as an original's."""
    ex = data.examples.copy()
    mine = draws[draws.draw == j]
    for kind, g in ex[ex.role == "forget"].groupby("kind", sort=False):
        d = mine[mine.kind == kind]
        if len(d) != len(g):
            raise ValueError(f"draw {j} has {len(d)} {kind} examples but the forget set has {len(g)}")
        for idx, ids in zip(g.index, d.ids):
            ex.at[idx, "ids"] = [int(i) for i in ids]
    return dataclasses.replace(data, examples=ex)


def draw_model_key(p: dict, data: StudyData, draws: pd.DataFrame, j: int) -> str:
    """Key of draw j's model: fine-tuning parameters, the base's key, the study data and draw j's token ids."""
    ids = [list(map(int, i)) for i in draws[draws.draw == j].ids]
    return cache_key("tiny-lm-set-draw", code_version(*FINETUNED_CODE, "set_draws"),
                     training_params(p, finetuning=True), base_key(p, data), data.fingerprint(), ids, j, draw_seed(j))


def get_set_draw_model(p: dict, data: StudyData, draws: pd.DataFrame, j: int, cache: ArtifactCache | None = None,
                       base: TrainedModel | None = None) -> TrainedModel:
    """Draw j's model (role ``set_draw``, seed ``draw_seed(j)``): the base fine-tuned like an original with draw j's
    set in place of the forget set; built if not cached."""
    cache = cache or ArtifactCache()
    device = pick_device(p["device"])
    config = config_for(p, data)
    built: list[TrainedModel] = []
    seed = draw_seed(j)

    def build() -> tuple[dict, dict[str, torch.Tensor], None]:
        # fine-tuned exactly like an original, with draw j's set in place of the forget set
        model, curve, meta = finetune_from_base(p, draw_data(data, draws, j), "original", seed,
                                                base or get_base(p, data, cache), device,
                                                desc=f"set draw {j} (seed {seed})")
        meta.update(role=ROLE, draw=j, data_fingerprint=data.fingerprint(), base=base_key(p, data))
        built.append(TrainedModel(ROLE, seed, model.eval(), curve, meta))
        return meta, model.state_dict(), None

    entry = cache.get_or_build("models", draw_model_key(p, data, draws, j), build)
    return _loaded(ROLE, seed, config, built, entry, device)


def get_set_draw_models(p: dict, data: StudyData, cache: ArtifactCache | None = None,
                        base: TrainedModel | None = None) -> list[TrainedModel]:
    """The run's ``sanity_set_models`` draw models, in draw order ([] when it is 0)."""
    n = p["sanity_set_models"]
    if n == 0:
        return []
    if p["models_from"] != "base":
        raise ValueError("sanity_set_models needs models_from: base (each draw model is fine-tuned from the base); "
                         "with models_from: scratch set sanity_set_models: 0")
    cache = cache or ArtifactCache()
    draws = get_draws(p, data, cache)
    base = base or get_base(p, data, cache)
    return [get_set_draw_model(p, data, draws, j, cache, base) for j in range(n)]


def set_draw_scores(backend, draw_models: list[TrainedModel], kinds=None) -> pd.DataFrame:
    """ll of every control of each kind under every draw model, rows like :func:`forgetlab.sanity.start_scores`
    with model_role ``set_draw`` and seed = the draw's index (concatenate the two for the controls check)."""
    from .sanity import SCORE_COLUMNS
    kinds = list(kinds or backend.kinds)
    ex = pd.concat([backend.view(k).targets for k in kinds], ignore_index=True)
    ex = ex[ex.role == "control"].reset_index(drop=True)
    base = ex[["kind", "uid", "role", "n_scored"]]
    frames = [base.assign(model_role=ROLE, seed=m.meta.get("draw", i), ll=backend.example_logprobs(m.model, ex))
              for i, m in enumerate(draw_models)]
    return pd.concat(frames, ignore_index=True)[SCORE_COLUMNS] if frames else pd.DataFrame(columns=SCORE_COLUMNS)

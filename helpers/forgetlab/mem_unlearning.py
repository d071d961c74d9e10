"""The memorization study, step 3: gradient ascent on groups of pool examples, recorded at every step.

Each group (planned by :func:`forgetlab.mem_pool.plan_unlearning_groups`) is unlearned from a copy of the
subset model that saw all its members; each step records the members' ll and the held-out perplexity.
The whole table is cached under a key over the models, the settings and the groups.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import metrics
from .cache import ArtifactCache, cache_key, code_version
from .config import params_in
from .forget_sets import StudyData
from .mem_models import SubsetModel
from .scoring import mean_token_loss
from .tables import read_tidy_csv
from .unlearning import UnlearnSettings, Unlearner

UTILITY_ROWS = 16             # held-out rows scored at every unlearning step (perplexity)


def pool_unlearn_settings(p: dict) -> UnlearnSettings:
    """Gradient ascent with the study's settings, for mem_unlearn_steps steps, recorded at every step."""
    return replace(UnlearnSettings.from_params(p, "ga"), steps=p["mem_unlearn_steps"], record_every=1)


def run_group_unlearning(models: list[SubsetModel], pool: pd.DataFrame, groups: list[dict],
                         settings: UnlearnSettings, heldout_rows: np.ndarray, pad_id: int) -> pd.DataFrame:
    """Gradient ascent on each group from its model; per step the members' ll and the held-out perplexity.

    Returns a tidy table: group, model, step, uid ('' for model-level rows), metric (ll | heldout_ppl), value.
    """
    frames = []
    for g in tqdm(groups, desc="unlearning groups", mininterval=1.0):
        members = pool.iloc[g["members"]].reset_index(drop=True)

        def evaluate(model, step, members=members):
            ll = metrics.example_logprobs(model, members)
            recs = [{"uid": u, "metric": "ll", "value": float(v)} for u, v in zip(members.uid, ll)]
            ppl = math.exp(mean_token_loss(model, heldout_rows))
            return recs + [{"uid": "", "metric": "heldout_ppl", "value": ppl}]

        model = copy.deepcopy(models[g["model"]].model)
        u = Unlearner(model, [list(map(int, i)) for i in members.ids], members.score_start.tolist(), settings, pad_id)
        frames.append(pd.DataFrame(u.run(settings.steps, evaluate)).assign(group=g["group"], model=g["model"]))
        del model, u
    return pd.concat(frames, ignore_index=True)[["group", "model", "step", "uid", "metric", "value"]]


def get_group_unlearning(p: dict, data: StudyData, models: list[SubsetModel], pool: pd.DataFrame,
                         groups: list[dict], cache: ArtifactCache | None = None) -> pd.DataFrame:
    """:func:`run_group_unlearning` with the run's settings, cached (always returned as read back from CSV)."""
    cache = cache or ArtifactCache()
    settings = pool_unlearn_settings(p)
    key = cache_key("mem-unlearn", code_version("mem_unlearning", "unlearning", "scoring", "metrics"),
                    [m.key for m in models], params_in(p, "run", "unlearning", "memorization"),
                    [{**g, "uids": pool.uid.iloc[g["members"]].tolist()} for g in groups], UTILITY_ROWS,
                    data.fingerprint())

    def build():
        table = run_group_unlearning(models, pool, groups, settings, data.heldout_rows[:UTILITY_ROWS], data.bos)
        return {"rows": len(table)}, None, {"results.csv": table.to_csv(index=False)}

    _, _, files = cache.get_or_build("mem-unlearn", key, build)
    return read_tidy_csv(files["results.csv"])


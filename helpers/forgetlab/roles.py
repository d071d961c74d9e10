"""Roles in training: which examples go into which model's data, how often, and tables that say so.

Both studies (the tiny model's :class:`forgetlab.forget_sets.StudyData` and the LLM's ``LLMStudyData``) share
:func:`inserted_examples`: the original gets each forget example ``insertions`` times; the reference gets, at the
same place, the twin of the same kind and number (``reference_data: twins``) or nothing (plain retrain); background
examples are in both. With twins both models therefore take the same number of steps and see each kind equally
often.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .forget_sets import ExampleTable, StudyData

MODEL_ROLES = ("original", "reference")
IGNORE = -100


def pad_rows(sequences: list[list[int]], block: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad sequences to `block`; labels are IGNORE on padding."""
    ids = np.full((len(sequences), block), pad, dtype=np.int64)
    labels = np.full((len(sequences), block), IGNORE, dtype=np.int64)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = s
        labels[r, : len(s)] = s
    return ids, labels


def inserted_examples(examples: pd.DataFrame, model_role: str, insertions: int,
                      background_insertions: int) -> list[tuple[str, int]]:
    """(uid, times) of the examples inserted into one model's data, in table order (both studies).

    The original gets each forget example ``insertions`` times; the reference gets, at the same place, the twin of
    the same kind and number instead (none under plain retrain). Background examples are in both.
    """
    if model_role not in MODEL_ROLES:
        raise ValueError(f"model_role must be one of {', '.join(MODEL_ROLES)}, not {model_role!r}")
    twin_uid = {(r.kind, r.uid.rsplit("-", 1)[1]): r.uid for r in examples[examples.role == "twin"].itertuples()}
    out = []
    for r in examples.itertuples():
        if r.role == "background":
            out.append((r.uid, background_insertions))
        elif r.role == "forget" and model_role == "original":
            out.append((r.uid, insertions))
        elif r.role == "forget" and twin_uid:
            twin = twin_uid.get((r.kind, r.uid.rsplit("-", 1)[1]))
            if twin is None:
                raise ValueError(f"forget example {r.uid} has no twin: rebuild the data with reference_data: twins")
            out.append((twin, insertions))
    return out


def training_rows(data: StudyData, model_role: str | None = None, exclude_uids: set[str] | None = None, *,
                  include_forget: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token rows, labels and a per-row source tag for one model's training data.

    ``model_role`` is 'original' (forget examples ``insertions`` times each) or 'reference' (their twins at the
    same rows under ``reference_data: twins``; nothing under plain retrain). Background examples are in both.
    ``include_forget=True/False`` is the older spelling of 'original'/'reference'. Returns (ids, labels, row_uid)
    where row_uid is '' for the shared Shakespeare stream.
    """
    if include_forget is not None:
        model_role = "original" if include_forget else "reference"
    exclude_uids = exclude_uids or set()
    ids_of = dict(zip(data.examples.uid, data.examples.ids))
    seqs, uids = [], []
    for uid, times in inserted_examples(data.examples, model_role or "original", data.insertions,
                                        data.background_insertions):
        if uid not in exclude_uids:
            seqs += [list(ids_of[uid])] * times
            uids += [uid] * times
    ins_ids, ins_labels = pad_rows(seqs, data.block_size, data.bos)
    ids = np.concatenate([data.train_rows, ins_ids]) if len(seqs) else data.train_rows.copy()
    labels = np.concatenate([data.train_rows, ins_labels]) if len(seqs) else data.train_rows.copy()
    row_uid = np.array([""] * len(data.train_rows) + uids, dtype=object)
    return ids, labels, row_uid


def insertion_counts(row_uid: np.ndarray) -> pd.Series:
    """How many training rows each inserted example occupies."""
    s = pd.Series(row_uid[row_uid != ""])
    return s.value_counts().sort_index()


# ------------------------------------------------------------------------------------------- tables

def sources_table(data: StudyData) -> pd.DataFrame:
    """One row per source document (Shakespeare train / held-out are whole plays), with its size."""
    names = {"train": "Shakespeare (train)", "heldout": "Shakespeare (held-out)", "language": "other language",
             "code": "Python code"}
    df = pd.DataFrame(data.sources)
    return df.assign(source=df.source.map(names).fillna(df.source))


def role_insertions(examples: pd.DataFrame, insertions: int, background_insertions: int) -> pd.DataFrame:
    """Per example: how often it is in the original's and in the reference's data (``in_original``,
    ``in_reference``), read from :func:`inserted_examples`."""
    times = {m: dict(inserted_examples(examples, m, insertions, background_insertions)) for m in MODEL_ROLES}
    return examples.assign(in_original=examples.uid.map(times["original"]).fillna(0).astype(int),
                           in_reference=examples.uid.map(times["reference"]).fillna(0).astype(int))


def summary_table(data: StudyData) -> pd.DataFrame:
    """Per kind and role: how many examples, token lengths, and insertions in each model."""
    df = role_insertions(data.examples, data.insertions, data.background_insertions)
    return (df.groupby(["kind", "role"], sort=False)
              .agg(examples=("uid", "size"), tokens_mean=("n_tokens", "mean"), scored_tokens=("n_scored", "mean"),
                   in_original=("in_original", "first"), in_reference=("in_reference", "first"))
              .astype({"in_original": int, "in_reference": int}).reset_index())


def kind_token_table(data: ExampleTable, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Per kind: its script, tokens and characters per example, and tokens per character (all roles pooled)."""
    from .tokenizer import dominant_script

    df = data.examples.assign(chars=data.examples.text.str.len())
    rows = []
    for kind, g in df.groupby("kind", sort=False):
        rows.append({"kind": kind, "label": (labels or {}).get(kind, kind), "script": dominant_script("".join(g.text)),
                     "examples": len(g), "tokens_per_example": g.n_tokens.mean(), "chars_per_example": g.chars.mean(),
                     "tokens_per_char": g.n_tokens.sum() / max(1, g.chars.sum())})
    return pd.DataFrame(rows)

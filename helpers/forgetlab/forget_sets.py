"""Forget sets: which examples the original model sees, how often, and their never-trained peers.

Every example is a row of one table (``StudyData.examples``) with a *role*:

- ``forget``: inserted ``insertions`` times into the original model's data only;
- ``background``: same source, inserted into *both* models' data, so that GenEx measures the
  example itself and not the novelty of its kind (a template, a language);
- ``population``: never trained on; the comparison population of RelEx and the non-members of
  the membership test;
- ``control``: never trained on; their GenEx is the noise floor.

Token ids always start with the BOS marker; ``score_start`` is the first scored position (1 for
text, the first secret digit for a canary).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tokenizers import Tokenizer

from .config import FORGET_KINDS
from .data import load_sources
from .models import bos_id, decode, encode, train_tokenizer

CANARY_PREFIX = "My secret number is"
ROLES = ("forget", "background", "population", "control")
IGNORE = -100


class ExampleTable:
    """Row selection over an ``examples`` table with ``kind`` and ``role`` columns (tiny and LLM study data)."""
    examples: pd.DataFrame

    def select(self, kind: str | None = None, role: str | None = None) -> pd.DataFrame:
        df = self.examples
        if kind is not None:
            df = df[df.kind == kind]
        if role is not None:
            df = df[df.role == role]
        return df


@dataclass
class StudyData(ExampleTable):
    """Tokenizer, example table and token rows shared by every notebook."""
    tokenizer: Tokenizer
    examples: pd.DataFrame
    train_rows: np.ndarray            # [n, block_size] shared ID stream (both models)
    heldout_rows: np.ndarray          # [m, block_size] whole held-out plays
    block_size: int
    canary_digits: int
    insertions: int
    background_insertions: int
    sources: list[dict] = field(default_factory=list)   # one row per document: source, split, doc, group, chars

    @property
    def bos(self) -> int:
        return bos_id(self.tokenizer)

    def canary_prefix_ids(self) -> list[int]:
        return canary_prefix_ids(self.tokenizer)

    def fingerprint(self) -> str:
        """Hash of everything a model trained on this data depends on."""
        h = hashlib.sha256()
        h.update(self.tokenizer.to_str().encode())
        h.update(np.ascontiguousarray(self.train_rows).tobytes())
        for ids, role in zip(self.examples.ids, self.examples.role):
            h.update(f"{role}:{list(ids)}".encode())
        h.update(f"{self.insertions}/{self.background_insertions}/{self.block_size}".encode())
        return h.hexdigest()[:16]


def canary_prefix_ids(tok: Tokenizer) -> list[int]:
    """BOS, the template words, then a lone space token: the digits follow one token each."""
    return [bos_id(tok)] + encode(tok, CANARY_PREFIX) + [tok.token_to_id("Ġ")]


def canary_ids(tok: Tokenizer, secret: str) -> list[int]:
    """Token ids of a canary, ending with its secret; each digit is its own token so R is a digit trie.

    The sequence ends at the secret, so "the canary's scored tokens" and "the secret given its prefix"
    are the same thing everywhere (training, exposure, GenEx, RelEx).
    """
    return canary_prefix_ids(tok) + [tok.token_to_id(d) for d in secret]


def line_start_windows(tok: Tokenizer, text: str, length: int) -> list[list[int]]:
    """Non-overlapping windows of exactly `length` tokens, each starting at the start of a line."""
    enc = tok.encode(text)
    ids, offsets = enc.ids, enc.offsets
    starts = {0} | {i + 1 for i, ch in enumerate(text) if ch == "\n"}
    windows, end = [], 0
    for i, (a, _) in enumerate(offsets):
        if i >= end and a in starts and i + length <= len(ids) and ids[i] != tok.token_to_id("Ċ"):
            windows.append(ids[i:i + length])
            end = i + length
    return windows


def dedupe_windows(windows: list[list[int]]) -> list[list[int]]:
    """Drop repeated token windows (chatterbot repeats answers), keeping first occurrences in order."""
    seen, out = set(), []
    for w in windows:
        if tuple(w) not in seen:
            seen.add(tuple(w))
            out.append(w)
    return out


def example_record(kind: str, role: str, i: int, source: str, ids: list[int], score_start: int, text: str,
                   secret: str = "") -> dict:
    """One row of an examples table (token ids start with a start token; scored from `score_start`), whatever
    tokenizer made `ids` and `text`: the tiny study's and the LLM study's tables share these columns."""
    return {"uid": f"{kind}-{role}-{i:03d}", "kind": kind, "role": role, "source": source,
            "text": text, "ids": list(ids), "n_tokens": len(ids) - 1,
            "score_start": score_start, "n_scored": len(ids) - score_start, "secret": secret}


def example_row(kind: str, role: str, i: int, source: str, ids: list[int], score_start: int, tok: Tokenizer,
                secret: str = "") -> dict:
    """One row of the tiny study's examples table (token ids start with BOS)."""
    return example_record(kind, role, i, source, ids, score_start, decode(tok, ids), secret)


def _assign_text_roles(kind: str, source: str, windows: list[list[int]], counts: dict[str, int],
                       tok: Tokenizer, rng: random.Random) -> list[dict]:
    need = sum(counts.values())
    windows = dedupe_windows(windows)
    if len(windows) < need:
        raise ValueError(f"source {source!r} has {len(windows)} distinct windows but {kind} needs {need} "
                         f"({counts}): lower forget_size/background_size/population_size/example_tokens")
    rng.shuffle(windows)
    rows, pos = [], 0
    for role, n in counts.items():
        rows += [example_row(kind, role, i, source, [bos_id(tok)] + w, 1, tok) for i, w in enumerate(windows[pos:pos + n])]
        pos += n
    return rows


def _chunk(stream: list[int], block: int) -> np.ndarray:
    n = len(stream) // block
    return np.asarray(stream[: n * block], dtype=np.int64).reshape(n, block)


def build_study_data(p: dict) -> StudyData:
    """Build the tokenizer, the forget sets and their peers, and the shared training rows."""
    rng = random.Random(p["seed"])
    src = load_sources(p["heldout_plays"], p["seed"])
    tok = train_tokenizer(src["train"]["text"], p["vocab_size"])
    bos, L = bos_id(tok), p["example_tokens"]
    F, B, P, C = p["forget_size"], p["background_size"], p["population_size"], p["control_size"]
    rows: list[dict] = []

    # In-distribution: forget passages are cut out of the training plays (so the reference never
    # sees them) and inserted as rows; population and controls come from the held-out plays.
    play_ids = [encode(tok, t) for t in src["train"]["text"]]
    candidates = []
    for pi, text in enumerate(src["train"]["text"]):
        for w in line_start_windows(tok, text, L):
            candidates.append((pi, w))
    chosen = rng.sample(range(len(candidates)), F) if "id" in p["forget_kinds"] else []
    cut: dict[int, list[list[int]]] = {}
    for j, c in enumerate(sorted(chosen)):
        pi, w = candidates[c]
        cut.setdefault(pi, []).append(w)
        rows.append(example_row("id", "forget", j, "shakespeare/train", [bos] + w, 1, tok))
    stream: list[int] = []
    for pi, ids in enumerate(play_ids):
        for w in cut.get(pi, []):
            ids = _remove_span(ids, w)
        stream += [bos] + ids
    train_rows = _chunk(stream, p["block_size"])
    max_rows = max(1, p["max_train_tokens"] // p["block_size"])
    if len(train_rows) > max_rows:
        keep = sorted(random.Random(p["seed"] + 1).sample(range(len(train_rows)), max_rows))
        train_rows = train_rows[keep]
    held_windows = [w for t in src["heldout"]["text"] for w in line_start_windows(tok, t, L)]
    held_counts = {"population": P, "control": C}
    rows += _assign_text_roles("id", "shakespeare/heldout", held_windows, held_counts, tok, rng)
    heldout_stream = [t for text in src["heldout"]["text"] for t in [bos] + encode(tok, text)]
    heldout_rows = _chunk(heldout_stream, p["block_size"])

    counts = {"forget": F, "background": B, "population": P, "control": C}
    for kind, name in (("language", "other-language/chatterbot"), ("code", "python/stdlib")):
        if kind in p["forget_kinds"]:
            windows = [w for t in src[kind]["text"] for w in line_start_windows(tok, t, L)]
            rows += _assign_text_roles(kind, name, windows, counts, tok, rng)

    if "canary" in p["forget_kinds"]:
        digits = p["canary_digits"]
        need = F + B + C
        if need > 10 ** digits // 2:
            raise ValueError(f"{need} canaries need a larger candidate space than 10**{digits}: raise canary_digits")
        secrets = [f"{s:0{digits}d}" for s in rng.sample(range(10 ** digits), need)]
        start = len(canary_prefix_ids(tok))
        for role, group in (("forget", secrets[:F]), ("background", secrets[F:F + B]), ("control", secrets[F + B:])):
            rows += [example_row("canary", role, i, "canary/template", canary_ids(tok, s), start, tok, s)
                     for i, s in enumerate(group)]

    examples = pd.DataFrame(rows)
    examples["kind"] = pd.Categorical(examples.kind, categories=[k for k in FORGET_KINDS])
    examples = examples.sort_values(["kind", "role", "uid"], kind="stable").reset_index(drop=True)
    examples["kind"] = examples.kind.astype(str)
    too_long = examples[examples.ids.map(len) > p["block_size"]]
    if len(too_long):
        raise ValueError(f"{len(too_long)} examples are longer than block_size = {p['block_size']}: raise it")
    sources = [{"source": name, "doc": r["doc"], "group": r["group"], "chars": len(r["text"]),
                "tokens": len(tok.encode(r["text"]).ids)}
               for name, ds in src.items() for r in ds]
    return StudyData(tok, examples, train_rows, heldout_rows, p["block_size"], p["canary_digits"],
                     p["insertions"], p["background_insertions"], sources)


def _remove_span(ids: list[int], span: list[int]) -> list[int]:
    n = len(span)
    for i in range(len(ids) - n + 1):
        if ids[i:i + n] == span:
            return ids[:i] + ids[i + n:]
    return ids  # already removed (a duplicate window)


def pad_rows(sequences: list[list[int]], block: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad sequences to `block`; labels are IGNORE on padding."""
    ids = np.full((len(sequences), block), pad, dtype=np.int64)
    labels = np.full((len(sequences), block), IGNORE, dtype=np.int64)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = s
        labels[r, : len(s)] = s
    return ids, labels


def training_rows(data: StudyData, include_forget: bool, exclude_uids: set[str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token rows, labels and a per-row source tag for one model's training data.

    The original model gets forget examples ``insertions`` times each; the reference gets none.
    Background examples are in both. Returns (ids, labels, row_uid) where row_uid is '' for the
    shared Shakespeare stream.
    """
    exclude_uids = exclude_uids or set()
    seqs, uids = [], []
    for r in data.examples.itertuples():
        if r.uid in exclude_uids:
            continue
        times = {"forget": data.insertions if include_forget else 0,
                 "background": data.background_insertions}.get(r.role, 0)
        seqs += [list(r.ids)] * times
        uids += [r.uid] * times
    ins_ids, ins_labels = pad_rows(seqs, data.block_size, data.bos)
    ids = np.concatenate([data.train_rows, ins_ids]) if len(seqs) else data.train_rows.copy()
    labels = np.concatenate([data.train_rows, ins_labels]) if len(seqs) else data.train_rows.copy()
    row_uid = np.array([""] * len(data.train_rows) + uids, dtype=object)
    return ids, labels, row_uid


def insertion_counts(row_uid: np.ndarray) -> pd.Series:
    """How many training rows each inserted example occupies."""
    s = pd.Series(row_uid[row_uid != ""])
    return s.value_counts().sort_index()


def sources_table(data: StudyData) -> pd.DataFrame:
    """One row per source document (Shakespeare train / held-out are whole plays), with its size."""
    names = {"train": "Shakespeare (train)", "heldout": "Shakespeare (held-out)", "language": "other language",
             "code": "Python code"}
    df = pd.DataFrame(data.sources)
    return df.assign(source=df.source.map(names).fillna(df.source))


def summary_table(data: StudyData) -> pd.DataFrame:
    """Per kind and role: how many examples, token lengths, and insertions in each model."""
    df = data.examples.copy()
    df["in_original"] = df.role.map({"forget": data.insertions, "background": data.background_insertions}).fillna(0)
    df["in_reference"] = df.role.map({"background": data.background_insertions}).fillna(0)
    return (df.groupby(["kind", "role"], sort=False)
              .agg(examples=("uid", "size"), tokens_mean=("n_tokens", "mean"), scored_tokens=("n_scored", "mean"),
                   in_original=("in_original", "first"), in_reference=("in_reference", "first"))
              .astype({"in_original": int, "in_reference": int}).reset_index())

"""Forget sets: which examples each model sees, how often, and their never-trained peers.

Every example is a row of one table (``StudyData.examples``) with a *kind* (id, canary, language, code, custom)
and a *role* (see ``Roles of examples`` in DESIGN.md):

- ``forget``: inserted ``insertions`` times into the original models' data; what gets unlearned;
- ``twin`` (``reference_data: twins``): same kind, source, size and token length as the forget set, never used
  elsewhere; inserted into the *reference* models' data exactly where the forget set is in the originals', so both
  take the same number of steps and see each kind equally often. ``reference_data: plain`` (the paper's retrain,
  the legacy setting) has no twins: the reference data is the original's without the forget rows;
- ``background``: same source, inserted into *both* models' data (the kind is familiar to both);
- ``population``: never trained on; the comparison population of RelEx and the membership non-members;
- ``control``: never trained on; their GenEx is the noise floor.

ID population and controls come from held-out plays (``id_population: heldout-plays``, legacy) or are windows cut
out of the *training* plays and held back from every model, exactly like the ID forget windows
(``id_population: train-plays``). Draws the legacy setting never made use a second random generator, so the legacy
values give today's data bit for bit, and ``twins`` changes nothing but adding the twins.

Token ids always start with the BOS marker; ``score_start`` is the first scored position (1 for text, the first
secret digit for a canary).
"""
from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tokenizers import Tokenizer

from .config import FORGET_KINDS
from .data import (CANARY_PREFIX, CANARY_TEMPLATE, LANGUAGES, language_parts, load_sources,  # noqa: F401
                   template_prefix, template_problem)
from .roles import (IGNORE, MODEL_ROLES, insertion_counts, pad_rows,  # noqa: F401 (re-exported)
                    kind_token_table, sources_table, summary_table, training_rows)
from .tokenizer import bos_id, decode, encode, train_tokenizer
from .user_sources import CustomSourceError, read_records

ROLES = ("forget", "twin", "background", "population", "control")
# The values of the data-design parameters that reproduce the data built before they existed, bit for bit.
LEGACY = {"language": "+".join(LANGUAGES), "canary_template": CANARY_TEMPLATE, "custom_source": "",
          "custom_format": "auto", "custom_text_field": "text", "reference_data": "plain",
          "id_population": "heldout-plays", "llm_language": "persian"}
REFERENCE_DATA = ("plain", "twins")
ID_POPULATIONS = ("heldout-plays", "train-plays")
_LANGUAGE_NAMES = {"traditionalchinese": "Traditional Chinese", "hinglish": "Hinglish"}


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

    @property
    def reference_data(self) -> str:
        """'twins' if the table has twin examples (the references train on them), else 'plain'."""
        return "twins" if (self.examples.role == "twin").any() else "plain"


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
    canary_template: str = CANARY_TEMPLATE

    @property
    def bos(self) -> int:
        return bos_id(self.tokenizer)

    def canary_prefix_ids(self) -> list[int]:
        """The canaries' prefix ids: read from the canary examples when there are any (so data loaded from a
        cache that did not store the template is still right), else built from ``canary_template``."""
        can = self.examples[self.examples.kind == "canary"]
        if len(can):
            return [int(i) for i in can.ids.iloc[0][:int(can.score_start.iloc[0])]]
        return canary_prefix_ids(self.tokenizer, self.canary_template)

    def canary_ids(self, secret: str) -> list[int]:
        """Token ids of the canary with this secret (this data's template; one token per digit)."""
        return self.canary_prefix_ids() + [self.tokenizer.token_to_id(d) for d in secret]

    def fingerprint(self) -> str:
        """Hash of everything a model trained on this data depends on (every role's token ids, twins included)."""
        h = hashlib.sha256()
        h.update(self.tokenizer.to_str().encode())
        h.update(np.ascontiguousarray(self.train_rows).tobytes())
        for ids, role in zip(self.examples.ids, self.examples.role):
            h.update(f"{role}:{list(ids)}".encode())
        h.update(f"{self.insertions}/{self.background_insertions}/{self.block_size}".encode())
        return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- canaries

def canary_prefix_ids(tok: Tokenizer, template: str = CANARY_TEMPLATE) -> list[int]:
    """BOS, then the template's words; a space before the secret is a lone space token: the digits follow one
    token each."""
    prefix = template_prefix(template)
    if prefix.endswith(" "):
        return [bos_id(tok)] + encode(tok, prefix[:-1]) + [tok.token_to_id("Ġ")]
    return [bos_id(tok)] + encode(tok, prefix)


def canary_ids(tok: Tokenizer, secret: str, template: str = CANARY_TEMPLATE) -> list[int]:
    """Token ids of a canary, ending with its secret; each digit is its own token so R is a digit trie.

    The sequence ends at the secret, so "the canary's scored tokens" and "the secret given its prefix"
    are the same thing everywhere (training, exposure, GenEx, RelEx).
    """
    return canary_prefix_ids(tok, template) + [tok.token_to_id(d) for d in secret]


def unused_values(rng: random.Random, space: int, used: set[int], n: int) -> list[int]:
    """`n` distinct values of ``range(space)`` outside `used`, drawn by `rng` (rejection: `used` is small)."""
    if len(used) + n > space:
        raise ValueError(f"{n} more values do not fit in {space} candidates with {len(used)} used")
    out: list[int] = []
    taken = set(used)
    while len(out) < n:
        v = rng.randrange(space)
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


# ------------------------------------------------------------------------------------------- windows

def line_start_windows(tok: Tokenizer, text: str, length: int, enc=None) -> list[list[int]]:
    """Non-overlapping windows of exactly `length` tokens, each starting at the start of a line (`enc`: the text's
    encoding by `tok`, when the caller has it already)."""
    enc = tok.encode(text) if enc is None else enc
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


def role_counts(p: dict, prefix: str = "") -> dict[str, int]:
    """Examples per role of one text kind, in the order they are dealt from a shuffled pool (twins last, so that
    switching twins on leaves every other role as it was)."""
    F = p[f"{prefix}forget_size"]
    counts = {"forget": F, "background": p[f"{prefix}background_size"], "population": p[f"{prefix}population_size"],
              "control": p[f"{prefix}control_size"]}
    if p["reference_data"] == "twins":
        counts["twin"] = F
    return counts


def _assign_text_roles(kind: str, source: str, windows: list[list[int]], counts: dict[str, int],
                       tok: Tokenizer, rng: random.Random, fix: str = "") -> list[dict]:
    need = sum(counts.values())
    windows = dedupe_windows(windows)
    if len(windows) < need:
        raise ValueError(f"source {source!r} has {len(windows)} distinct windows but {kind} needs {need} "
                         f"({counts}): {fix or 'lower forget_size/background_size/population_size/example_tokens'}")
    rng.shuffle(windows)
    rows, pos = [], 0
    for role, n in counts.items():
        rows += [example_row(kind, role, i, source, [bos_id(tok)] + w, 1, tok) for i, w in enumerate(windows[pos:pos + n])]
        pos += n
    return rows


def _chunk(stream: list[int], block: int) -> np.ndarray:
    n = len(stream) // block
    return np.asarray(stream[: n * block], dtype=np.int64).reshape(n, block)


def _remove_span(ids: list[int], span: list[int]) -> list[int]:
    n = len(span)
    for i in range(len(ids) - n + 1):
        if ids[i:i + n] == span:
            return ids[:i] + ids[i + n:]
    return ids  # already removed (a duplicate window)


# ------------------------------------------------------------------------------------------- building

def _id_roles(p: dict, candidates: list[tuple[int, list[int]]], rng: random.Random,
              extra: random.Random) -> dict[str, list[int]]:
    """Which candidate windows of the training plays each ID role cuts out (candidate indices, sorted)."""
    F, P, C = p["forget_size"], p["population_size"], p["control_size"]
    has_id, twins = "id" in p["forget_kinds"], p["reference_data"] == "twins"
    T = F if twins and has_id else 0
    count: dict[tuple, int] = {}
    for _, w in candidates:
        count[tuple(w)] = count.get(tuple(w), 0) + 1
    unique = [i for i, (_, w) in enumerate(candidates) if count[tuple(w)] == 1]   # content found once in the plays
    if p["id_population"] == "heldout-plays":
        roles = {"forget": sorted(rng.sample(range(len(candidates)), F)) if has_id else []}
    else:   # train-plays: population and controls are held back from the training plays like the forget windows
        need = {"forget": F if has_id else 0, "population": P, "control": C}
        if len(unique) < sum(need.values()) + T:
            raise ValueError(f"the training plays have {len(unique)} distinct line-start windows of "
                             f"{p['example_tokens']} tokens but ID needs {sum(need.values()) + T} (forget + population "
                             f"+ control + twins): lower those sizes or example_tokens")
        chosen = rng.sample(unique, sum(need.values()))
        roles, pos = {}, 0
        for role, n in need.items():
            roles[role] = sorted(chosen[pos:pos + n])
            pos += n
    if T:   # twins: drawn by the second generator from windows no other role uses and found nowhere else
        used = {tuple(candidates[i][1]) for idx in roles.values() for i in idx}
        free = [i for i in unique if tuple(candidates[i][1]) not in used]
        if len(free) < T:
            raise ValueError(f"the training plays have {len(free)} unused windows but ID twins need {T}: lower "
                             f"forget_size or example_tokens")
        roles["twin"] = sorted(extra.sample(free, T))
    return roles


def record_windows(records: list[str], tok: Tokenizer, length: int) -> tuple[list[list[int]], str]:
    """Each record's first `length` tokens (records shorter than that are skipped), and a note of how many records
    were skipped or repeated (for error messages). Any script works: the byte-level BPE falls back to bytes."""
    windows = [ids[:length] for ids in (encode(tok, r) for r in records) if len(ids) >= length]
    distinct = len(dedupe_windows(windows))
    note = (f"{len(records)} records, {len(records) - len(windows)} shorter than example_tokens = {length} tokens "
            f"(skipped), {len(windows) - distinct} repeated")
    return windows, note


@functools.lru_cache(maxsize=2)
def _trained_tokenizer(texts: tuple[str, ...], vocab_size: int) -> str:
    return train_tokenizer(texts, vocab_size).to_str()


def _tokenizer(texts: tuple[str, ...], vocab_size: int) -> Tokenizer:
    """The BPE of these texts, trained once per process for the same texts and size (a fresh copy each call)."""
    return Tokenizer.from_str(_trained_tokenizer(texts, vocab_size))


def build_study_data(p: dict) -> StudyData:
    """Build the tokenizer, the forget sets and their peers, and the shared training rows."""
    rng = random.Random(p["seed"])
    extra = random.Random(f"forgetlab-roles/{p['seed']}")     # draws only the new-design values make
    kinds, twins = p["forget_kinds"], p["reference_data"] == "twins"
    F, B, P, C = p["forget_size"], p["background_size"], p["population_size"], p["control_size"]
    custom = read_records(p["custom_source"], p["custom_format"], p["custom_text_field"]) if "custom" in kinds else []
    if custom and len(custom) < sum(role_counts(p).values()):     # fail before the long work
        raise CustomSourceError(f"custom_source {p['custom_source']!r} has {len(custom)} records but the custom kind "
                                f"needs {sum(role_counts(p).values())} ({role_counts(p)}): add records (lines, "
                                f"paragraphs or rows) or lower forget_size/background_size/population_size/control_size")
    src = load_sources(p["heldout_plays"], p["seed"], tuple(language_parts(p["language"])))
    tok = _tokenizer(tuple(src["train"]["text"]), p["vocab_size"])
    texts = {name: list(ds["text"]) for name, ds in src.items()}
    encoded = {name: tok.encode_batch(t) for name, t in texts.items()}     # every document encoded once
    bos, L = bos_id(tok), p["example_tokens"]
    rows: list[dict] = []

    # In-distribution: forget passages (and twins; and population/controls with train-plays) are cut out of the
    # training plays, so no model sees them in the shared stream, and inserted as rows where a role says so.
    play_ids = [e.ids for e in encoded["train"]]
    candidates = [(pi, w) for pi, (text, enc) in enumerate(zip(texts["train"], encoded["train"]))
                  for w in line_start_windows(tok, text, L, enc)]
    cut: dict[int, list[list[int]]] = {}
    for role, chosen in _id_roles(p, candidates, rng, extra).items():
        for j, c in enumerate(chosen):
            pi, w = candidates[c]
            cut.setdefault(pi, []).append(w)
            rows.append(example_row("id", role, j, "shakespeare/train", [bos] + w, 1, tok))
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
    if p["id_population"] == "heldout-plays":
        held_windows = [w for t, e in zip(texts["heldout"], encoded["heldout"]) for w in line_start_windows(tok, t, L, e)]
        rows += _assign_text_roles("id", "shakespeare/heldout", held_windows, {"population": P, "control": C}, tok, rng)
    heldout_stream = [t for e in encoded["heldout"] for t in [bos] + e.ids]
    heldout_rows = _chunk(heldout_stream, p["block_size"])

    counts = role_counts(p)
    language = "other-language/chatterbot" if p["language"] == LEGACY["language"] else f"chatterbot/{p['language']}"
    for kind, name in (("language", language), ("code", "python/stdlib")):
        if kind in kinds:
            windows = [w for t, e in zip(texts[kind], encoded[kind]) for w in line_start_windows(tok, t, L, e)]
            rows += _assign_text_roles(kind, name, windows, counts, tok, rng)

    if "canary" in kinds:
        digits = p["canary_digits"]
        need = F + B + C
        if need + (F if twins else 0) > 10 ** digits // 2:
            raise ValueError(f"{need + (F if twins else 0)} canaries need a larger candidate space than "
                             f"10**{digits}: raise canary_digits")
        values = rng.sample(range(10 ** digits), need)
        if twins:
            values += unused_values(extra, 10 ** digits, set(values), F)
        secrets = [f"{s:0{digits}d}" for s in values]
        start = len(canary_prefix_ids(tok, p["canary_template"]))
        groups = {"forget": secrets[:F], "background": secrets[F:F + B], "control": secrets[F + B:need],
                  "twin": secrets[need:]}
        for role, group in groups.items():
            rows += [example_row("canary", role, i, "canary/template", canary_ids(tok, s, p["canary_template"]),
                                 start, tok, s) for i, s in enumerate(group)]

    if "custom" in kinds:
        windows, note = record_windows(custom, tok, L)
        rows += _assign_text_roles("custom", f"custom/{Path(p['custom_source']).name}", windows, counts, tok, rng,
                                   f"the file has {note}; add records of at least {L} tokens, lower example_tokens, "
                                   f"or lower forget_size/background_size/population_size/control_size")

    examples = pd.DataFrame(rows)
    examples["kind"] = pd.Categorical(examples.kind, categories=[k for k in FORGET_KINDS])
    examples = examples.sort_values(["kind", "role", "uid"], kind="stable").reset_index(drop=True)
    examples["kind"] = examples.kind.astype(str)
    too_long = examples[examples.ids.map(len) > p["block_size"]]
    if len(too_long):
        raise ValueError(f"{len(too_long)} examples are longer than block_size = {p['block_size']}: raise it")
    sources = [{"source": name, "doc": r["doc"], "group": r["group"], "chars": len(r["text"]), "tokens": len(e.ids)}
               for name, ds in src.items() for r, e in zip(ds, encoded[name])]
    return StudyData(tok, examples, train_rows, heldout_rows, p["block_size"], p["canary_digits"],
                     p["insertions"], p["background_insertions"], sources, p["canary_template"])


def kind_labels(p: dict) -> dict[str, str]:
    """Display label of every kind for these parameters, e.g. {'language': 'OOD: Japanese'} (for figures)."""
    if p["language"] == LEGACY["language"]:
        language = "other language"
    else:
        language = " + ".join(_LANGUAGE_NAMES.get(x, x.capitalize()) for x in language_parts(p["language"]))
    custom = Path(p["custom_source"]).stem if p["custom_source"] else "none"
    return {"id": "ID (Shakespeare)", "canary": "OOD: canaries", "language": f"OOD: {language}",
            "code": "OOD: Python code", "custom": f"custom: {custom}"}

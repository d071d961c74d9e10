"""Data of the LLM study (notebook 06): SmolLM2's forget sets, their peers and the token rows.

Forget sets, one per kind (inserted ``llm_insertions`` times into the original's data, canaries
``llm_canary_insertions`` times: four random digits need more repetitions than a text to be exposed):

- ``id``: windows of English text (the kind of text SmolLM2 was trained on), cut from the training documents;
- ``canary``: ``canary_template`` (by default ``My secret number is {secret}``), tokenized by the model's tokenizer,
  every digit its own token; a canary's scored tokens are its secret given the prefix;
- ``language``: windows of ``llm_language`` (by default Persian, a language SmolLM2 has barely seen).

Per kind there are also never-trained *population* examples of the same source and token length (the RelEx
population and the membership test's non-members; for canaries a sample of never-trained secrets) and
never-trained *controls* (their GenEx is the metric's noise floor). Canaries and the other language also get
*background* examples in both models' data, so that GenEx measures the example and not the novelty of its kind.

The two data-design parameters of :mod:`forgetlab.forget_sets` apply here too: ``reference_data: twins`` gives every
kind a *twin* set the reference models fine-tune on where the original has the forget set (see
:func:`forgetlab.llm_finetune.finetune_rows`), and ``id_population: train-plays`` draws the English population and
controls from the training documents (held back from every model), like the ID forget set, instead of from the
held-out documents (which then give the utility rows only).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import metrics
from .config import METHODS
from .data import language_parts, lowresource_texts, token_windows
from .forget_sets import (_LANGUAGE_NAMES, CANARY_TEMPLATE, ExampleTable, dedupe_windows, example_record,
                          role_counts, template_prefix, unused_values)
from .roles import MODEL_ROLES, inserted_examples

KINDS = ("id", "canary", "language")
KIND_LABELS = {"id": "ID (English)", "canary": "OOD: canaries", "language": "OOD: Persian"}   # the legacy labels
START_TOKEN = "<|endoftext|>"     # SmolLM2's document separator: the context every example is scored after


class LLMStudyError(ValueError):
    """The parameters, data or models of the LLM study cannot be used together; the message says why."""


# ------------------------------------------------------------------------------------------- tokens

def start_token_id(tokenizer) -> int:
    """The token every example starts with (its first token is context, never scored): ``<|endoftext|>`` when
    the vocabulary has it, else the tokenizer's BOS or EOS token."""
    tid = tokenizer.convert_tokens_to_ids(START_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk and START_TOKEN != getattr(tokenizer, "unk_token", None)):
        tid = getattr(tokenizer, "bos_token_id", None)
        if tid is None:
            tid = getattr(tokenizer, "eos_token_id", None)
    if tid is None:
        raise LLMStudyError(f"the tokenizer has no {START_TOKEN}, BOS or EOS token to start examples with")
    return int(tid)


def canary_tokens(tokenizer, template: str = CANARY_TEMPLATE) -> tuple[list[int], list[int]]:
    """(prefix ids, the ids of the digits 0..9) of canaries made from `template` (one ``{secret}``, at its end; a
    template without ``{secret}`` is read as the text before ``' ' + secret``, the older spelling).

    The prefix is the start token and the tokenizer's own tokens of the text before the secret; each digit is
    then one token of its own, so the candidate secrets form a digit trie and the secret's ll is the sum of one
    log-probability per digit. Raises if a digit is not a single token of the vocabulary.
    """
    digit_ids = []
    for d in "0123456789":
        ids = list(tokenizer.encode(d, add_special_tokens=False))
        if len(ids) != 1:
            raise LLMStudyError(f"the tokenizer splits the digit {d!r} into {len(ids)} tokens {ids}: canaries need "
                                f"one token per digit")
        digit_ids.append(int(ids[0]))
    if len(set(digit_ids)) != 10:
        raise LLMStudyError(f"the tokenizer maps different digits to the same token: {digit_ids}")
    text = template_prefix(template) if "{secret}" in template else template + " "
    prefix = [start_token_id(tokenizer)] + [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    return prefix, digit_ids



# --------------------------------------------------------------------------------------------- data

@dataclass
class LLMStudyData(ExampleTable):
    """Every example of the LLM study (one table, roles as in :mod:`forgetlab.forget_sets`) and the token rows."""
    examples: pd.DataFrame            # uid, kind, role, source, text, ids, n_tokens, score_start, n_scored, secret
    retain_rows: np.ndarray           # [n, L+1] shared English training windows (both models; graddiff's retain set)
    heldout_rows: np.ndarray          # [m, L+1] held-out English windows (utility: held-out perplexity)
    start_id: int
    canary_prefix: list[int]
    digit_ids: list[int]
    canary_digits: int
    insertions: int
    background_insertions: int
    sources: dict = field(default_factory=dict)
    canary_insertions: int | None = None      # times a canary forget example (or its twin) is inserted; None: insertions

    def fingerprint(self) -> str:
        """Hash of everything a model fine-tuned on this data depends on."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.retain_rows).tobytes())
        for ids, role, kind in zip(self.examples.ids, self.examples.role, self.examples.kind):
            h.update(f"{kind}:{role}:{list(ids)}".encode())
        h.update(f"{self.insertions}/{self.background_insertions}/{self.start_id}".encode())
        if self.canary_insertions not in (None, self.insertions):
            h.update(f"canaries {self.canary_insertions}".encode())
        return h.hexdigest()[:16]

    def inserted(self, model_role: str) -> list[tuple[str, int]]:
        """(uid, times) of the examples in ``model_role``'s fine-tuning data, in table order: those of
        :func:`forgetlab.roles.inserted_examples`, with canary forget examples and their twins ``canary_insertions``
        times."""
        canaries = self.canary_insertions if self.canary_insertions is not None else self.insertions
        ex = self.examples
        kind_of, role_of = dict(zip(ex.uid, ex.kind)), dict(zip(ex.uid, ex.role))
        return [(uid, canaries if kind_of[uid] == "canary" and role_of[uid] != "background" else times)
                for uid, times in inserted_examples(self.examples, model_role, self.insertions,
                                                    self.background_insertions)]

    def retain_sample(self, n: int) -> np.ndarray:
        """A fixed sample of ``n`` shared training windows (in order), for the retain loss."""
        return metrics.seeded_rows(self.retain_rows, n)


def _row(kind: str, role: str, i: int, source: str, ids: list[int], score_start: int, tokenizer,
         secret: str = "") -> dict:
    """One row of the examples table; its text is everything after the start token, in the LLM's tokenizer."""
    return example_record(kind, role, i, source, [int(t) for t in ids], score_start, tokenizer.decode(ids[1:]),
                          secret)


def check_llm_params(p: dict, n_layers: int | None = None) -> None:
    """Refuse parameter combinations that cannot work, before any long work."""
    problems = []
    if p["llm_population_size"] < p["llm_forget_size"]:
        problems.append(f"llm_population_size = {p['llm_population_size']} must be >= llm_forget_size = "
                        f"{p['llm_forget_size']} so membership tests have matched non-members")
    secrets = sum(role_counts(p, "llm_").values())
    if secrets > 10 ** p["llm_canary_digits"] // 2:
        problems.append(f"{secrets} canary secrets (forget + background + control + population + twins) need more than "
                        f"10**{p['llm_canary_digits']} candidates: raise llm_canary_digits or lower the sizes")
    unknown = [m for m in p["llm_methods"] if m not in METHODS]
    if unknown:
        problems.append(f"llm_methods has unknown methods {unknown}: use {', '.join(METHODS)}")
    if n_layers is not None and p["llm_train_layers"] > n_layers:
        problems.append(f"llm_train_layers = {p['llm_train_layers']} but the model has {n_layers} blocks")
    if problems:
        raise LLMStudyError("the LLM study cannot run with these parameters:\n  - " + "\n  - ".join(problems))


def build_llm_data(p: dict, tokenizer, english: list[str] | None = None,
                   lowresource: list[str] | None = None) -> LLMStudyData:
    """Forget sets, peers and token rows of the LLM study (deterministic given ``p['seed']``).

    ``english`` and ``lowresource`` default to ``data.english_texts(p['llm_english_source'])`` and
    ``data.lowresource_texts(p['llm_language'])``. English documents are split whole: held-out documents give the
    utility rows (and, with ``id_population: heldout-plays``, the population and controls); training documents give
    the shared training windows, the ID forget set (and its twins, and with ``train-plays`` the population and
    controls, held back from every model). Draws that the legacy values never make use a second generator, so the
    legacy values give the data of before bit for bit.
    """
    from .data import english_texts

    check_llm_params(p)
    rng = random.Random(p["seed"])
    extra = random.Random(f"forgetlab-roles/{p['seed']}")
    twins, matched = p["reference_data"] == "twins", p["id_population"] == "train-plays"
    L = p["llm_example_tokens"]
    F, B, C, P = p["llm_forget_size"], p["llm_background_size"], p["llm_control_size"], p["llm_population_size"]
    T, U = p["llm_train_size"], p["llm_utility_rows"]
    start = start_token_id(tokenizer)
    english = english_texts(p["llm_english_source"]) if english is None else english
    lowresource = lowresource_texts(tuple(language_parts(p["llm_language"]))) if lowresource is None else lowresource

    # English: whole documents go to held-out until it has enough windows; the rest are training documents.
    per_doc = [token_windows(tokenizer, [d], L) for d in english]
    order = list(range(len(english)))
    rng.shuffle(order)
    need_held = U if matched else P + C + U
    need_train = T + F + (P + C if matched else 0)
    held: list[list[int]] = []
    train: list[list[int]] = []
    held_docs = 0
    for i in order:
        if len(held) < need_held:
            held = dedupe_windows(held + per_doc[i])
            held_docs += 1
        else:
            train += per_doc[i]
    held_set = {tuple(h) for h in held}
    train = [w for w in dedupe_windows(train) if tuple(w) not in held_set]
    if len(held) < need_held or len(train) < need_train + (F if twins else 0):
        where = "utility rows" if matched else "population + control + utility rows"
        what = "llm_train_size + llm_forget_size" + (" + population + control" if matched else "")
        raise LLMStudyError(f"the English source {p['llm_english_source']!r} has {len(held) + len(train)} distinct "
                            f"windows of {L} tokens but the study needs {need_held} held-out ({where}) and "
                            f"{need_train + (F if twins else 0)} training windows ({what}"
                            f"{' + twins' if twins else ''}): lower those sizes or llm_example_tokens, or use a "
                            f"larger source")
    rng.shuffle(held)
    chosen = rng.sample(range(len(train)), need_train)
    forget_w = [train[i] for i in chosen[:F]]
    shared_w = [train[i] for i in sorted(chosen[F:F + T])]
    if matched:
        population_w, control_w = [train[i] for i in chosen[F + T:F + T + P]], [train[i] for i in chosen[F + T + P:]]
        utility_w, id_source = held[:U], "english/train"
    else:
        population_w, control_w, utility_w, id_source = held[:P], held[P:P + C], held[P + C:P + C + U], "english/heldout"
    rows: list[dict] = []
    rows += [_row("id", "forget", i, "english/train", [start] + w, 1, tokenizer) for i, w in enumerate(forget_w)]
    rows += [_row("id", "population", i, id_source, [start] + w, 1, tokenizer) for i, w in enumerate(population_w)]
    rows += [_row("id", "control", i, id_source, [start] + w, 1, tokenizer) for i, w in enumerate(control_w)]
    if twins:
        free = sorted(set(range(len(train))) - set(chosen))
        rows += [_row("id", "twin", i, "english/train", [start] + train[j], 1, tokenizer)
                 for i, j in enumerate(sorted(extra.sample(free, F)))]
    heldout_rows = np.asarray([[start] + w for w in utility_w], dtype=np.int64)
    retain_rows = np.asarray([[start] + w for w in shared_w], dtype=np.int64)

    # The other language: forget, background (both models), population, controls (and twins) from one pool.
    lang = dedupe_windows(token_windows(tokenizer, lowresource, L))
    counts = role_counts(p, "llm_")
    if len(lang) < sum(counts.values()):
        raise LLMStudyError(f"the low-resource source has {len(lang)} distinct windows of {L} tokens but the study "
                            f"needs {sum(counts.values())} ({counts}): lower the sizes or llm_example_tokens")
    rng.shuffle(lang)
    pos = 0
    for role, n in counts.items():
        rows += [_row("language", role, i, f"{p['llm_language']}/chatterbot", [start] + w, 1, tokenizer)
                 for i, w in enumerate(lang[pos:pos + n])]
        pos += n

    # Canaries: the template in the model's own tokens, then one token per digit.
    prefix, digit_ids = canary_tokens(tokenizer, p["canary_template"])
    digits = p["llm_canary_digits"]
    values = rng.sample(range(10 ** digits), F + B + C + P)
    groups = {"forget": values[:F], "background": values[F:F + B], "control": values[F + B:F + B + C],
              "population": sorted(values[F + B + C:])}
    if twins:
        groups["twin"] = unused_values(extra, 10 ** digits, set(values), F)
    for role, group in groups.items():
        for i, v in enumerate(group):
            secret = f"{v:0{digits}d}"
            rows.append(_row("canary", role, i, "canary/template", prefix + [digit_ids[int(c)] for c in secret],
                             len(prefix), tokenizer, secret))

    examples = pd.DataFrame(rows)
    examples["kind"] = pd.Categorical(examples.kind, categories=list(KINDS))
    examples = examples.sort_values(["kind", "role", "uid"], kind="stable").reset_index(drop=True)
    examples["kind"] = examples.kind.astype(str)
    sources = {"english_documents": len(english), "english_heldout_documents": held_docs,
               "english_windows": len(held) + len(train), "lowresource_documents": len(lowresource),
               "lowresource_windows": len(lang)}
    return LLMStudyData(examples, retain_rows, heldout_rows, start, prefix, digit_ids, digits, p["llm_insertions"],
                        p["llm_background_insertions"], sources, p["llm_canary_insertions"])


def llm_kind_labels(p: dict) -> dict[str, str]:
    """Display label of every LLM kind for these parameters, e.g. {'language': 'OOD: Japanese'}."""
    language = " + ".join(_LANGUAGE_NAMES.get(x, x.capitalize()) for x in language_parts(p["llm_language"]))
    return {**KIND_LABELS, "language": f"OOD: {language}"}


def summary_table(data: LLMStudyData) -> pd.DataFrame:
    """Per kind and role: examples, tokens, scored tokens, and how often each is in each model's data."""
    times = {m: dict(data.inserted(m)) for m in MODEL_ROLES}
    df = data.examples.assign(in_original=data.examples.uid.map(times["original"]).fillna(0).astype(int),
                              in_reference=data.examples.uid.map(times["reference"]).fillna(0).astype(int))
    table = (df.groupby(["kind", "role"], sort=False)
             .agg(examples=("uid", "size"), tokens=("n_tokens", "mean"), scored_tokens=("n_scored", "mean"),
                  in_original=("in_original", "first"), in_reference=("in_reference", "first"))
             .astype({"in_original": int, "in_reference": int}).reset_index())
    shared = pd.DataFrame([{"kind": "id", "role": "shared training", "examples": len(data.retain_rows),
                            "tokens": data.retain_rows.shape[1] - 1, "scored_tokens": data.retain_rows.shape[1] - 1,
                            "in_original": 1, "in_reference": 1},
                           {"kind": "id", "role": "held-out (utility)", "examples": len(data.heldout_rows),
                            "tokens": data.heldout_rows.shape[1] - 1, "scored_tokens": data.heldout_rows.shape[1] - 1,
                            "in_original": 0, "in_reference": 0}])
    return pd.concat([table, shared], ignore_index=True)

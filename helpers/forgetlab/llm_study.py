"""The study on a real pretrained LLM (notebook 06): SmolLM2-135M fine-tuned with ID and OOD forget sets.

The tiny-model study (:mod:`forgetlab.study`) trains its models from scratch. A real LLM comes pretrained, so here
the *original* model is the pretrained model fine-tuned on a small training set that holds the forget sets, and the
*reference* model is the same fine-tuning without them (same seed, same order of the shared rows). Then each forget
set is unlearned (gradient ascent, gradient difference, NPO: :class:`forgetlab.unlearning.Unlearner`) and every
recorded step is scored into the tidy table of :mod:`forgetlab.study` (same columns, same metric names), so
``study.curves``, ``study.steps_to_unlearn``, ``study.relex_genex_agreement``, ``study.claims`` and the figures of
:mod:`forgetlab.plots` apply unchanged.

Forget sets, one per kind (every one inserted ``llm_insertions`` times into the original's data):

- ``id``: windows of English text (the kind of text SmolLM2 was trained on), cut from the training documents;
- ``canary``: ``My secret number is 4821``: the template is tokenized by the model's tokenizer, every digit is its
  own token, and a canary's scored tokens are its secret given the prefix;
- ``language``: windows of Persian, a language SmolLM2 has barely seen.

Per kind there are also never-trained *population* examples of the same source and token length (the RelEx
population and the membership test's non-members; for canaries a sample of never-trained secrets) and
never-trained *controls* (their GenEx is the metric's noise floor). Canaries and Persian also get *background*
examples in both models' data, so that GenEx measures the example and not the novelty of its kind.

Utility is the perplexity of held-out English (whole documents kept out of fine-tuning), and the loss on a sample
of the shared training windows (``retain_loss``).

Only the last ``llm_train_layers`` transformer blocks (and the final norm) are fine-tuned and unlearned; the
embeddings (tied to the output layer) and the first blocks stay as pretrained. That keeps a CPU run within minutes,
and the cache stores only the tensors that fine-tuning changed.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics, study
from .cache import ArtifactCache, cache_key
from .config import METHODS
from .forget_sets import CANARY_PREFIX, ExampleTable, dedupe_windows, example_record, pad_rows
from .models import seed_everything
from .scoring import mean_token_loss
from .training import lr_at
from .unlearning import UnlearnSettings, Unlearner

LLM_STUDY_VERSION = 1
KINDS = ("id", "canary", "language")
KIND_LABELS = {"id": "ID (English)", "canary": "OOD: canaries", "language": "OOD: Persian"}
START_TOKEN = "<|endoftext|>"     # SmolLM2's document separator: the context every example is scored after
EVAL_BATCH = 32                   # sequences per forward pass when scoring (bounds the [batch, len, vocab] logits)
FINETUNE_KEYS = ("llm_train_layers", "llm_finetune_epochs", "llm_lr", "llm_batch_size")
UNLEARN_KEYS = ("llm_methods", "llm_unlearn_lr", "llm_unlearn_steps", "llm_batch_size", "llm_record_every",
                "unlearn_optimizer", "grad_clip", "retain_weight", "npo_beta", "seed")


# Same parameters, same numbers on CUDA too: cuBLAS needs this before its first use (as in forgetlab.experiment).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


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


def canary_tokens(tokenizer, template: str = CANARY_PREFIX) -> tuple[list[int], list[int]]:
    """(prefix ids, the ids of the digits 0..9) of canaries ``template + ' ' + secret``.

    The prefix is the start token and the tokenizer's own tokens of ``template + ' '``; each digit of the secret is
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
    prefix = [start_token_id(tokenizer)] + [int(t) for t in tokenizer.encode(template + " ", add_special_tokens=False)]
    return prefix, digit_ids


@torch.no_grad()
def canary_candidate_logprobs(model: torch.nn.Module, prefix_ids: list[int], digit_ids: list[int], digits: int,
                              batch_size: int = 256) -> np.ndarray:
    """ll (nats) of every candidate secret's digits given the prefix: array [10**digits], index = the number.

    Works with any causal LM taking ``input_ids``. Candidates that differ only in their last digit share every
    earlier position, so each (digits - 1)-digit path is scored once and its last position gives all ten last
    digits: ``10**(digits-1) * (len(prefix) + digits - 1)`` token evaluations instead of
    ``10**digits * (len(prefix) + digits)``. Agrees with :func:`forgetlab.metrics.canary_candidate_logprobs`.
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    if len(digit_ids) != 10:
        raise ValueError(f"need the token ids of the 10 digits, got {len(digit_ids)}")
    p = len(prefix_ids)
    if p < 1:
        raise ValueError("the canary prefix must hold at least one token (the start token)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    paths = (metrics._candidate_digit_matrix(digit_ids, digits - 1) if digits > 1
             else np.zeros((1, 0), dtype=np.int64))                          # [10**(digits-1), digits-1]
    index_of = {int(t): i for i, t in enumerate(digit_ids)}
    path_digits = np.vectorize(index_of.__getitem__, otypes=[np.int64])(paths) if paths.size else paths
    digit_t = torch.as_tensor(digit_ids, dtype=torch.long, device=device)
    prefix = torch.as_tensor([int(t) for t in prefix_ids], dtype=torch.long)
    out = np.zeros((len(paths), 10), dtype=np.float64)
    for b in range(0, len(paths), batch_size):
        block = torch.as_tensor(paths[b:b + batch_size])
        ids = torch.cat([prefix.expand(len(block), p), block], dim=1).to(device)
        logits = model(input_ids=ids).logits[:, p - 1:].float()              # predicts digit positions 1..digits
        logp = torch.log_softmax(logits, dim=-1)[..., digit_t].double().cpu().numpy()   # [n, digits, 10]
        walked = np.zeros(len(block))
        for j in range(digits - 1):                                          # the path's own digits
            walked += np.take_along_axis(logp[:, j], path_digits[b:b + batch_size, j:j + 1], axis=1)[:, 0]
        out[b:b + len(block)] = walked[:, None] + logp[:, digits - 1]
    model.train(was_training)
    return out.reshape(-1)


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

    def fingerprint(self) -> str:
        """Hash of everything a model fine-tuned on this data depends on."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.retain_rows).tobytes())
        for ids, role, kind in zip(self.examples.ids, self.examples.role, self.examples.kind):
            h.update(f"{kind}:{role}:{list(ids)}".encode())
        h.update(f"{self.insertions}/{self.background_insertions}/{self.start_id}".encode())
        return h.hexdigest()[:16]

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
    secrets = p["llm_forget_size"] + p["llm_background_size"] + p["llm_control_size"] + p["llm_population_size"]
    if secrets > 10 ** p["llm_canary_digits"] // 2:
        problems.append(f"{secrets} canary secrets (forget + background + control + population) need more than "
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

    ``english`` and ``lowresource`` default to ``llm.english_texts(p['llm_english_source'])`` and
    ``llm.lowresource_texts()``. English documents are split whole: held-out documents give the population,
    controls and utility rows; training documents give the shared training windows and the ID forget set.
    """
    from .llm import english_texts, lowresource_texts, token_windows

    check_llm_params(p)
    rng = random.Random(p["seed"])
    L = p["llm_example_tokens"]
    F, B, C, P = p["llm_forget_size"], p["llm_background_size"], p["llm_control_size"], p["llm_population_size"]
    T, U = p["llm_train_size"], p["llm_utility_rows"]
    start = start_token_id(tokenizer)
    english = english_texts(p["llm_english_source"]) if english is None else english
    lowresource = lowresource_texts() if lowresource is None else lowresource

    # English: whole documents go to held-out until it has enough windows; the rest are training documents.
    per_doc = [token_windows(tokenizer, [d], L) for d in english]
    order = list(range(len(english)))
    rng.shuffle(order)
    need_held = P + C + U
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
    if len(held) < need_held or len(train) < T + F:
        raise LLMStudyError(f"the English source {p['llm_english_source']!r} has {len(held) + len(train)} distinct "
                            f"windows of {L} tokens but the study needs {need_held} held-out (population + control + "
                            f"utility rows) and {T + F} training windows (llm_train_size + llm_forget_size): lower "
                            f"those sizes or llm_example_tokens, or use a larger source")
    rng.shuffle(held)
    chosen = rng.sample(range(len(train)), T + F)
    forget_w = [train[i] for i in chosen[:F]]
    shared_w = [train[i] for i in sorted(chosen[F:])]
    rows: list[dict] = []
    rows += [_row("id", "forget", i, "english/train", [start] + w, 1, tokenizer) for i, w in enumerate(forget_w)]
    rows += [_row("id", "population", i, "english/heldout", [start] + w, 1, tokenizer)
             for i, w in enumerate(held[:P])]
    rows += [_row("id", "control", i, "english/heldout", [start] + w, 1, tokenizer)
             for i, w in enumerate(held[P:P + C])]
    heldout_rows = np.asarray([[start] + w for w in held[P + C:P + C + U]], dtype=np.int64)
    retain_rows = np.asarray([[start] + w for w in shared_w], dtype=np.int64)

    # The low-resource language: forget, background (both models), population and controls from one pool.
    lang = dedupe_windows(token_windows(tokenizer, lowresource, L))
    counts = {"forget": F, "background": B, "population": P, "control": C}
    if len(lang) < sum(counts.values()):
        raise LLMStudyError(f"the low-resource source has {len(lang)} distinct windows of {L} tokens but the study "
                            f"needs {sum(counts.values())} ({counts}): lower the sizes or llm_example_tokens")
    rng.shuffle(lang)
    pos = 0
    for role, n in counts.items():
        rows += [_row("language", role, i, "persian/chatterbot", [start] + w, 1, tokenizer)
                 for i, w in enumerate(lang[pos:pos + n])]
        pos += n

    # Canaries: the template in the model's own tokens, then one token per digit.
    prefix, digit_ids = canary_tokens(tokenizer)
    digits = p["llm_canary_digits"]
    values = rng.sample(range(10 ** digits), F + B + C + P)
    groups = {"forget": values[:F], "background": values[F:F + B], "control": values[F + B:F + B + C],
              "population": sorted(values[F + B + C:])}
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
                        p["llm_background_insertions"], sources)


def summary_table(data: LLMStudyData) -> pd.DataFrame:
    """Per kind and role: examples, tokens, scored tokens, and how often each is in each model's data."""
    df = data.examples.copy()
    df["in_original"] = df.role.map({"forget": data.insertions, "background": data.background_insertions}).fillna(0)
    df["in_reference"] = df.role.map({"background": data.background_insertions}).fillna(0)
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


# --------------------------------------------------------------------------------------- fine-tuning

def finetune_rows(data: LLMStudyData) -> tuple[list[list[int]], np.ndarray, list[str]]:
    """The original model's fine-tuning rows in a fixed order: (sequences, is_forget mask, uid per row).

    Shared English windows once each, background examples ``background_insertions`` times, forget examples
    ``insertions`` times. The reference model's rows are the same without the forget rows (see
    :func:`finetune_order`).
    """
    seqs = [list(map(int, r)) for r in data.retain_rows]
    uids = [""] * len(seqs)
    forget = [False] * len(seqs)
    for r in data.examples.itertuples():
        times = {"forget": data.insertions, "background": data.background_insertions}.get(r.role, 0)
        seqs += [list(r.ids)] * times
        uids += [r.uid] * times
        forget += [r.role == "forget"] * times
    return seqs, np.asarray(forget, dtype=bool), uids


def finetune_order(is_forget: np.ndarray, epochs: float, seed: int, include_forget: bool) -> np.ndarray:
    """Row indices in training order: a seeded permutation per epoch, for ``epochs`` passes (fractions allowed).

    With ``include_forget=False`` (the reference model) the forget rows are dropped from the same permutations,
    so both models see the shared rows in the same relative order.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    is_forget = np.asarray(is_forget, dtype=bool)
    n = len(is_forget)
    per_epoch = n if include_forget else int((~is_forget).sum())
    gen = torch.Generator().manual_seed(seed)
    order = []
    for _ in range(math.ceil(epochs)):
        perm = torch.randperm(n, generator=gen).numpy()
        order.append(perm if include_forget else perm[~is_forget[perm]])
    return np.concatenate(order)[:max(1, round(epochs * per_epoch))]


def trainable_names(model: torch.nn.Module, n_layers: int) -> list[str]:
    """Parameter names of the last ``n_layers`` transformer blocks and the final norm (a Llama-style model)."""
    blocks = model.model.layers
    if not 1 <= n_layers <= len(blocks):
        raise LLMStudyError(f"llm_train_layers = {n_layers} but the model has {len(blocks)} blocks: use 1 to "
                            f"{len(blocks)}")
    first = len(blocks) - n_layers
    keep = tuple(f"model.layers.{i}." for i in range(first, len(blocks))) + ("model.norm.",)
    return [n for n, _ in model.named_parameters() if n.startswith(keep)]


def freeze_except(model: torch.nn.Module, names: list[str]) -> None:
    """Only the named parameters train; every other one (embeddings, first blocks) is frozen."""
    wanted = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)


def _rows(value, idx: torch.Tensor, batch: int):
    """The rows ``idx`` of a batch-shaped tensor (or of each tensor of a tuple); anything else as it is."""
    if isinstance(value, tuple):
        return tuple(_rows(v, idx, batch) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
        return value.index_select(0, idx.to(value.device))
    return value


class FrozenPrefixCache:
    """Remember, per distinct input row, the hidden states after the frozen first blocks of a Llama-style model.

    With the embeddings and the first blocks frozen, their output for a given row never changes, while the study
    scores the same rows (population, held-out text, the forget set) at every recorded step and fine-tunes on the same
    rows every epoch. Installed on a model, the first frozen block returns the stored hidden states of rows seen
    before and runs the frozen blocks only on new rows; the other frozen blocks pass their input through. The model
    keeps its modules and parameter names; :meth:`remove` restores it.

    A row is recognised by its input embeddings (so by its token ids and its padded width); causal attention makes a
    row's hidden states independent of the other rows of its batch. Only rows computed without a key/value cache are
    stored. At most ``max_rows`` rows are kept (then the store starts over).
    """

    def __init__(self, model: torch.nn.Module, n_frozen: int, max_rows: int = 20000):
        blocks = list(model.model.layers[:n_frozen])
        frozen = [model.model.embed_tokens] + blocks
        if any(p.requires_grad for m in frozen for p in m.parameters()):
            raise LLMStudyError("the frozen-prefix cache needs the embeddings and the first blocks frozen")
        self.blocks, self.max_rows = blocks, max_rows
        self.forwards = [b.forward for b in blocks]
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0
        if blocks:
            blocks[0].forward = self._stack
            for b in blocks[1:]:
                b.forward = self._passthrough

    def remove(self) -> None:
        for b in self.blocks:
            b.__dict__.pop("forward", None)
        self.store.clear()

    @staticmethod
    def _passthrough(hidden_states, *args, **kwargs):
        return hidden_states

    def _run(self, h, args, kwargs):
        with torch.no_grad():
            for forward in self.forwards:
                out = forward(h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
        return h

    def _stack(self, hidden_states, *args, **kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return self._run(hidden_states, args, kwargs)
        batch = hidden_states.shape[0]
        rows = hidden_states.detach().cpu().numpy()
        keys = [hashlib.blake2b(r.tobytes(), digest_size=16).digest() + bytes(str(r.shape), "ascii") for r in rows]
        unique = list(dict.fromkeys(keys))
        new = [k for k in unique if k not in self.store]
        if new and len(self.store) + len(new) > self.max_rows:
            self.store.clear()                          # start over (a batch never needs more than it holds)
            new = unique
        missing = [keys.index(k) for k in new]
        self.hits += batch - len(missing)
        self.misses += len(missing)
        if missing:
            idx = torch.as_tensor(missing, dtype=torch.long, device=hidden_states.device)
            h = self._run(hidden_states.index_select(0, idx), tuple(_rows(a, idx, batch) for a in args),
                          {k: _rows(v, idx, batch) for k, v in kwargs.items()})
            for j, i in enumerate(missing):
                self.store[keys[i]] = h[j]
        return torch.stack([self.store[k] for k in keys])


def finetune(model: torch.nn.Module, seqs: list[list[int]], order: np.ndarray, *, batch_size: int, lr: float,
             pad_id: int, heldout_rows: np.ndarray | None = None, desc: str = "fine-tuning") -> pd.DataFrame:
    """Fine-tune the trainable parameters in place (AdamW, warmup then cosine decay); return the loss curve.

    Rows are right-padded per batch (padding is not scored). The curve has the training loss of every step and,
    if ``heldout_rows`` are given, the held-out loss before the first and after the last step.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LLMStudyError("nothing to fine-tune: every parameter is frozen")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps = math.ceil(len(order) / batch_size)
    warmup = max(1, steps // 10)
    curve = []
    if heldout_rows is not None:
        curve.append({"step": 0, "split": "held-out",
                      "loss": mean_token_loss(model, heldout_rows, batch_size=EVAL_BATCH, device=device)})
    model.train()
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0):
        batch = [seqs[i] for i in order[step * batch_size:(step + 1) * batch_size]]
        ids, labels = pad_rows(batch, max(len(s) for s in batch), pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        out = model(input_ids=torch.from_numpy(ids).to(device), labels=torch.from_numpy(labels).to(device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append({"step": step, "split": "train", "loss": out.loss.item()})
    model.eval()
    if heldout_rows is not None:
        curve.append({"step": steps, "split": "held-out",
                      "loss": mean_token_loss(model, heldout_rows, batch_size=EVAL_BATCH, device=device)})
    return pd.DataFrame(curve)


@dataclass
class LLMModels:
    """One working copy of the model, and the fine-tuned tensors of the original and each reference model.

    The models differ only in their trainable tensors, so :meth:`use` swaps a model in by copying those tensors
    into the working copy (a few hundred MB at most), instead of holding several 135M-parameter models.
    """
    model: torch.nn.Module
    trainable: list[str]
    base: dict[str, torch.Tensor]            # the pretrained values of the trainable tensors
    original: dict[str, torch.Tensor]
    references: dict[int, dict[str, torch.Tensor]]
    seed: int
    meta: dict[str, dict]                    # "original" / "reference <seed>" -> cache key, curve, timing
    prefix_cache: FrozenPrefixCache | None = None

    @torch.no_grad()
    def use(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        params = dict(self.model.named_parameters())
        for name in self.trainable:
            params[name].copy_(state[name])
        return self.model

    def keys(self) -> list[str]:
        return [m["key"] for m in self.meta.values()]

    def curves(self) -> pd.DataFrame:
        """Loss curves of every fine-tuned model: model, step, split, loss (for ``plots.loss_curves``)."""
        return pd.concat([pd.DataFrame(m["curve"]).assign(model=name) for name, m in self.meta.items()],
                         ignore_index=True)

    def table(self) -> pd.DataFrame:
        rows = []
        for name, m in self.meta.items():
            c = pd.DataFrame(m["curve"])
            held = c[c.split == "held-out"].loss
            rows.append({"model": name, "rows_per_epoch": m["rows_per_epoch"], "steps": m["steps"],
                         "trained_parameters": m["trained_parameters"],
                         "heldout_ppl_before": math.exp(held.iloc[0]), "heldout_ppl_after": math.exp(held.iloc[-1])})
        return pd.DataFrame(rows)


def finetune_key(p: dict, data: LLMStudyData, base_key: str, role: str, seed: int) -> str:
    return cache_key("llm-finetune", LLM_STUDY_VERSION, base_key, data.fingerprint(),
                     {k: p[k] for k in FINETUNE_KEYS}, role, seed)


def _get_finetuned(p: dict, data: LLMStudyData, models: LLMModels, base_key: str, role: str, seed: int,
                   cache: ArtifactCache) -> tuple[dict[str, torch.Tensor], dict]:
    key = finetune_key(p, data, base_key, role, seed)
    if cache.has("llm-finetuned", key):
        meta, tensors, _ = cache.load("llm-finetuned", key)
        if sorted(tensors) != sorted(models.trainable):
            raise LLMStudyError(f"cache entry {cache.path('llm-finetuned', key)} holds other tensors than the "
                                f"trainable ones of this model: delete it and rerun")
        return tensors, meta
    seqs, is_forget, _ = finetune_rows(data)
    include = role == "original"
    order = finetune_order(is_forget, p["llm_finetune_epochs"], seed, include_forget=include)
    seed_everything(seed)
    models.use(models.base)
    start = time.perf_counter()
    curve = finetune(models.model, seqs, order, batch_size=p["llm_batch_size"], lr=p["llm_lr"],
                     pad_id=data.start_id, heldout_rows=data.heldout_rows, desc=f"fine-tuning {role} (seed {seed})")
    tensors = {n: t.detach().cpu().clone() for n, t in models.model.named_parameters() if n in set(models.trainable)}
    meta = {"role": role, "seed": seed, "rows_per_epoch": int(len(is_forget) if include else (~is_forget).sum()),
            "steps": math.ceil(len(order) / p["llm_batch_size"]), "seconds": time.perf_counter() - start,
            "trained_parameters": int(sum(t.numel() for t in tensors.values())),
            "data_fingerprint": data.fingerprint(), "curve": curve.to_dict(orient="list")}
    cache.save("llm-finetuned", key, meta, tensors=tensors)
    return tensors, dict(meta, key=key)


def get_llm_models(p: dict, data: LLMStudyData, model: torch.nn.Module, base_key: str,
                   cache: ArtifactCache | None = None, prefix_cache: bool = True) -> LLMModels:
    """The original and reference fine-tuned models (trained now if not cached) around one working copy.

    ``model`` is the pretrained model (e.g. from ``llm.load_smollm``), used in place: its trainable tensors are
    overwritten by :meth:`LLMModels.use`; ``base_key`` names it in the cache keys (``llm.llm_key``). With
    ``prefix_cache`` the frozen blocks' output is remembered per row (:class:`FrozenPrefixCache`), which about
    halves the cost of scoring and of each training step when most blocks are frozen.
    """
    cache = cache or ArtifactCache()
    check_llm_params(p, len(model.model.layers))
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")   # plain matmul attention: deterministic on CPU and CUDA alike
    model.config.use_cache = False            # no key/value cache: every call scores whole sequences
    names = trainable_names(model, p["llm_train_layers"])
    freeze_except(model, names)
    base = {n: t.detach().cpu().clone() for n, t in model.named_parameters() if n in set(names)}
    n_frozen = len(model.model.layers) - p["llm_train_layers"]
    prefix = FrozenPrefixCache(model, n_frozen) if n_frozen and prefix_cache else None
    models = LLMModels(model.eval(), names, base, {}, {}, p["seed"], {}, prefix)
    models.original, meta = _get_finetuned(p, data, models, base_key, "original", p["seed"], cache)
    models.meta[f"original (seed {p['seed']})"] = meta
    for seed in p["llm_reference_seeds"]:
        models.references[seed], meta = _get_finetuned(p, data, models, base_key, "reference", seed, cache)
        models.meta[f"reference (seed {seed})"] = meta
    models.use(models.original)
    return models


# -------------------------------------------------------------------------------------- unlearning

@dataclass
class LLMForgetSetView:
    """What one unlearning run scores: the forget and control examples of a kind and its never-trained peers."""
    kind: str
    targets: pd.DataFrame
    population: pd.DataFrame

    @classmethod
    def build(cls, data: LLMStudyData, kind: str) -> "LLMForgetSetView":
        if kind not in KINDS:
            raise LLMStudyError(f"unknown forget set {kind!r}: use one of {', '.join(KINDS)}")
        ex = data.select(kind)
        targets = ex[ex.role.isin(["forget", "control"])].reset_index(drop=True)
        return cls(kind, targets, ex[ex.role == "population"].reset_index(drop=True))


def unlearn_settings(p: dict, method: str) -> UnlearnSettings:
    return UnlearnSettings(method=method, lr=p["llm_unlearn_lr"], steps=p["llm_unlearn_steps"],
                           batch=p["llm_batch_size"], optimizer=p["unlearn_optimizer"], grad_clip=p["grad_clip"],
                           record_every=p["llm_record_every"], retain_weight=p["retain_weight"],
                           npo_beta=p["npo_beta"], seed=p["seed"])


def utility(model: torch.nn.Module, data: LLMStudyData) -> dict[str, float]:
    """heldout_ppl: perplexity of the held-out English rows; retain_loss: nats/token on shared training rows."""
    return {"heldout_ppl": math.exp(mean_token_loss(model, data.heldout_rows, batch_size=EVAL_BATCH)),
            "retain_loss": mean_token_loss(model, data.retain_sample(len(data.heldout_rows)), batch_size=EVAL_BATCH)}


def make_evaluator(data: LLMStudyData, view: LLMForgetSetView, final_step: int, start: dict | None = None):
    """The function the unlearner calls at each recorded step; returns tidy records (as ``study.make_evaluator``).

    Per forget and control example: ``ll``, ``relex_bits`` (against the never-trained population) and, for
    canaries, ``exposure_bits`` (skew-normal extrapolation from the population sample) and at the first and last
    step ``exposure_exact_bits`` (over all 10**digits candidates). Per model: ``membership_auc``, ``heldout_ppl``,
    ``retain_loss``. ``start``, a dict shared by the evaluators of one forget set, keeps the step-0 records: every
    method starts from the same fine-tuned model, so step 0 is scored once.
    """
    scored = pd.concat([view.targets, view.population], ignore_index=True)
    n_t = len(view.targets)
    n_scored = scored.n_scored.to_numpy()
    is_forget = (view.targets.role == "forget").to_numpy()

    def evaluate(model, step: int) -> list[dict]:
        if step == 0 and start is not None and view.kind in start:
            return start[view.kind]
        ll = metrics.example_logprobs(model, scored, batch_size=EVAL_BATCH)
        ll_t, ll_pop = ll[:n_t], ll[n_t:]
        recs = study.target_records(view.targets, ll_t, ll_pop, extrapolate=view.kind == "canary")
        if view.kind == "canary" and step in (0, final_step):
            all_ll = canary_candidate_logprobs(model, data.canary_prefix, data.digit_ids, data.canary_digits)
            for r in view.targets.itertuples():
                recs.append({"uid": r.uid, "role": r.role, "metric": "exposure_exact_bits",
                             "value": metrics.exposure_from_logprobs(all_ll[int(r.secret)], all_ll)})
        per_token = ll / n_scored
        recs += study.model_records(per_token[:n_t][is_forget], per_token[n_t:], utility(model, data))
        if step == 0 and start is not None:
            start[view.kind] = recs
        return recs

    return evaluate


def reference_logprobs(models: LLMModels, examples: pd.DataFrame) -> np.ndarray:
    """ll of each example under each reference model: [n_reference, n_examples]; leaves the original in place."""
    out = []
    for seed in sorted(models.references):
        models.use(models.references[seed])
        out.append(metrics.example_logprobs(models.model, examples, batch_size=EVAL_BATCH))
    models.use(models.original)
    return np.stack(out)


def unlearn_forget_set(p: dict, data: LLMStudyData, models: LLMModels, kind: str, method: str,
                       ref_ll: np.ndarray | None = None, start: dict | None = None,
                       steps: int | None = None) -> pd.DataFrame:
    """Unlearn one forget set from the fine-tuned original with one method; return the tidy table (with GenEx).

    The working copy is reset to the original before and after, so runs never leak into each other.
    """
    settings = unlearn_settings(p, method)
    steps = steps or settings.steps
    view = LLMForgetSetView.build(data, kind)
    if ref_ll is None:
        ref_ll = reference_logprobs(models, view.targets)
    forget = view.targets[view.targets.role == "forget"]
    model = models.use(models.original)
    evaluate = make_evaluator(data, view, steps, start)
    try:
        u = Unlearner(model, [list(i) for i in forget.ids], forget.score_start.tolist(), settings, data.start_id,
                      retain_rows=data.retain_rows)
        table = pd.DataFrame(u.run(steps, evaluate)).assign(seed=models.seed, kind=kind, method=method)
        del u
    finally:
        models.use(models.original)
        model.zero_grad(set_to_none=True)
        model.eval()
    return study.add_genex(table, view.targets, ref_ll)


def study_key(p: dict, data: LLMStudyData, models: LLMModels) -> str:
    return cache_key("llm-study", LLM_STUDY_VERSION, {k: p[k] for k in UNLEARN_KEYS}, models.keys(),
                     data.fingerprint(), EVAL_BATCH)


def read_table(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""],
                       dtype={"uid": str}).fillna({"uid": ""})


def run_llm_study(p: dict, data: LLMStudyData, models: LLMModels, cache: ArtifactCache | None = None,
                  kinds: tuple[str, ...] = KINDS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every forget set x every method in ``llm_methods``: (per-step tidy table, seconds per run); cached."""
    cache = cache or ArtifactCache()
    key = study_key(p, data, models)
    tag = cache_key(list(kinds))
    if cache.has("llm-study", f"{key}-{tag}"):
        _, _, files = cache.load("llm-study", f"{key}-{tag}")
        return read_table(files["results.csv"]), pd.read_csv(io.StringIO(files["timings.csv"]))
    targets = data.examples[data.examples.role.isin(["forget", "control"])].reset_index(drop=True)
    ref_all = reference_logprobs(models, targets)
    frames, timings, start = [], [], {}
    jobs = [(k, m) for k in kinds for m in p["llm_methods"]]
    pos = {u: i for i, u in enumerate(targets.uid)}
    for kind, method in tqdm(jobs, desc="unlearning", mininterval=1.0):
        view = LLMForgetSetView.build(data, kind)
        ref_ll = ref_all[:, [pos[u] for u in view.targets.uid]]
        t0 = time.perf_counter()
        frames.append(unlearn_forget_set(p, data, models, kind, method, ref_ll=ref_ll, start=start))
        timings.append({"kind": kind, "method": method, "seconds": time.perf_counter() - t0})
    table = pd.concat(frames, ignore_index=True)
    timings = pd.DataFrame(timings)
    cache.save("llm-study", f"{key}-{tag}", {"rows": len(table)},
               files={"results.csv": table.to_csv(index=False), "timings.csv": timings.to_csv(index=False)})
    return table, timings


# ------------------------------------------------------------------------------------------ summaries

def pretrained_losses(model: torch.nn.Module, data: LLMStudyData) -> pd.DataFrame:
    """How familiar each kind is to a model: loss of its never-trained population, per token and per character.

    Per-character loss is the fair comparison across kinds: the tokenizer cuts Persian into many more tokens per
    character than English.
    """
    rows = []
    for kind in KINDS:
        pop = data.select(kind, "population")
        ll = metrics.example_logprobs(model, pop, batch_size=EVAL_BATCH)
        chars = pop.text.str.len().to_numpy() if kind != "canary" else pop.secret.str.len().to_numpy()
        rows.append({"kind": kind, "examples": len(pop), "scored_tokens": float(pop.n_scored.mean()),
                     "loss_per_token": float(-ll.sum() / pop.n_scored.sum()),
                     "loss_per_char": float(-ll.sum() / chars.sum())})
    return pd.DataFrame(rows)


def start_table(table: pd.DataFrame) -> pd.DataFrame:
    """Before unlearning (step 0): mean GenEx and RelEx of forget and control examples, exact canary exposure."""
    t = table[(table.step == 0) & table.role.isin(["forget", "control"])]
    t = t[t.metric.isin(["genex_bits", "relex_bits", "exposure_exact_bits"])]
    t = t.drop_duplicates(["kind", "uid", "metric"])       # step 0 is the same model for every method
    return t.groupby(["kind", "role", "metric"]).value.mean().unstack("metric").reset_index()


def agreement_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """RelEx and GenEx side by side per method, kind, step and example (for ``plots.relex_vs_genex``)."""
    return (table[table.metric.isin(["relex_bits", "genex_bits"])]
            .groupby(["method", "kind", "step", "uid", "metric"]).value.mean().unstack("metric")
            .rename(columns={"relex_bits": "relex", "genex_bits": "genex"}).dropna().reset_index())


def tiny_agreement(summary_path) -> dict[str, float | None]:
    """RelEx/GenEx Spearman correlations of the tiny-model study (notebook 04's section of ``summary.json``),
    keyed ``kind/method``; empty when that notebook has not run into the same output folder."""
    import json
    from pathlib import Path

    path = Path(summary_path)
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return dict(summary.get("tradeoffs", {}).get("relex_genex_spearman", {}))


@contextlib.contextmanager
def kind_labels():
    """Inside this block the suite's figures name the LLM's kinds (ID is English here, not Shakespeare)."""
    from . import plots

    saved = dict(plots.KIND_LABELS)
    plots.KIND_LABELS.update(KIND_LABELS)
    try:
        yield
    finally:
        plots.KIND_LABELS.clear()
        plots.KIND_LABELS.update(saved)

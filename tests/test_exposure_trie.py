"""Trie scoring of canary candidates agrees with plain full-sequence scoring (values and ranks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from forgetlab.exposure_trie import full_token_count, trie_candidate_logprobs, trie_token_count
from forgetlab.forget_sets import canary_ids, canary_prefix_ids
from forgetlab.models import model_config, train_tokenizer
from forgetlab.scoring import sequence_logprobs

ATOL = 1e-4      # nats; float32 rounding between the two scorings is ~1e-6 here
DELTA = 1e-4     # candidates closer than this in ll have no well-defined order at float32 precision


def _model(vocab: int, n_layer: int, n_head: int, d_model: int, block: int, seed: int,
           init: float | None = None) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = model_config(vocab, n_layer, n_head, d_model, block)
    if init is not None:
        cfg.initializer_range = init            # wider logits: candidates' ll spread further apart
    return GPT2LMHeadModel(cfg).eval()


def reference_logprobs(model, prefix_ids, digit_ids, digits, batch_size=1000) -> np.ndarray:
    """The straightforward way: every full sequence prefix + digits through the model, digit log-probs summed."""
    values = np.arange(10 ** digits)
    powers = 10 ** np.arange(digits - 1, -1, -1)
    mat = torch.as_tensor(np.asarray(digit_ids)[(values[:, None] // powers) % 10])
    p = len(prefix_ids)
    prefix = torch.as_tensor(prefix_ids)
    out = np.empty(len(mat), dtype=np.float64)
    with torch.no_grad():
        for b in range(0, len(mat), batch_size):
            ids = torch.cat([prefix.expand(len(mat[b:b + batch_size]), p), mat[b:b + batch_size]], dim=1)
            logp = torch.log_softmax(model(input_ids=ids).logits[:, p - 1:-1].float(), dim=-1)
            out[b:b + batch_size] = logp.gather(-1, ids[:, p:, None]).squeeze(-1).sum(1).double().numpy()
    return out


def strict_ranks(ll: np.ndarray) -> np.ndarray:
    """Carlini rank of every candidate as the secret: 1 + #{r : ll(r) > ll(s)} (no tie tolerance)."""
    s = np.sort(ll)
    return 1 + len(ll) - np.searchsorted(s, ll, side="right")


def assert_same_ranking(ref: np.ndarray, got: np.ndarray, delta: float = DELTA) -> None:
    """Rankings agree wherever float32 precision defines them.

    1. No two candidates are ordered oppositely by more than `delta` nats.
    2. Every candidate whose ll is more than `delta` from every other one has exactly the same rank,
       and the same position in the argsort (the exposure rank of that secret is identical).
    3. Those isolated candidates are the bulk, so 2 is not vacuous.
    Candidates within `delta` of another (exact float32 ties occur among 10**4 random-model
    candidates) have no defined order between them at this precision; 1 still bounds them.
    """
    by_got = ref[np.argsort(got, kind="stable")]
    assert np.max(np.maximum.accumulate(by_got) - by_got) <= delta
    s = np.sort(ref)
    gaps = np.diff(s)
    nearest = np.minimum(np.r_[np.inf, gaps], np.r_[gaps, np.inf])[np.argsort(np.argsort(ref, kind="stable"))]
    isolated = nearest > delta
    assert isolated.mean() > 0.5, "test model too flat: most candidates are near-ties"
    np.testing.assert_array_equal(strict_ranks(got)[isolated], strict_ranks(ref)[isolated])
    pos_ref = np.empty(len(ref), int)
    pos_ref[np.argsort(-ref, kind="stable")] = np.arange(len(ref))
    pos_got = np.empty(len(got), int)
    pos_got[np.argsort(-got, kind="stable")] = np.arange(len(got))
    np.testing.assert_array_equal(pos_got[isolated], pos_ref[isolated])


@pytest.fixture(scope="module")
def tiny():
    return _model(64, 2, 2, 32, 16, seed=0, init=0.3), [0, 5, 6, 7], list(range(40, 50))


@pytest.fixture(scope="module")
def default_sized():
    """The default study's size: 4 layers, 4 heads, d_model 128, 64 positions, 2048 tokens (~1M parameters).

    Initialised wider than GPT-2's 0.02 so the 10**4 candidates spread over ~13 nats (like a trained
    model's), and most of them are more than DELTA from their neighbours: a rank test with teeth.
    """
    model = _model(2048, 4, 4, 128, 64, seed=1, init=0.1)
    rng = np.random.default_rng(1)
    prefix = [0] + rng.integers(11, 2048, size=9).tolist()
    return model, prefix, list(range(1, 11))


@pytest.fixture(scope="module")
def default_sized_ref(default_sized):
    model, prefix, digit_ids = default_sized
    return reference_logprobs(model, prefix, digit_ids, 4)


def test_token_counts():
    assert trie_token_count(14, 4) == 14 + 10 + 100 + 1000
    assert trie_token_count(1, 1) == 1
    assert full_token_count(14, 4) == 10_000 * 18


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_tiny_model_matches_full_scoring(tiny, digits):
    model, prefix, digit_ids = tiny
    ref = reference_logprobs(model, prefix, digit_ids, digits)
    got = trie_candidate_logprobs(model, prefix, digit_ids, digits)
    assert got.dtype == np.float64 and got.shape == (10 ** digits,)
    assert np.allclose(got, ref, rtol=0, atol=ATOL)
    if digits == 3:
        assert_same_ranking(ref, got)


def test_default_sized_model_matches_full_scoring(default_sized, default_sized_ref):
    model, prefix, digit_ids = default_sized
    got = trie_candidate_logprobs(model, prefix, digit_ids, 4)
    assert np.allclose(got, default_sized_ref, rtol=0, atol=ATOL)
    assert_same_ranking(default_sized_ref, got)


@pytest.mark.parametrize("batch_size", [1, 7, 10, 333, 100_000])
def test_batch_size_does_not_change_results(tiny, batch_size):
    model, prefix, digit_ids = tiny
    base = trie_candidate_logprobs(model, prefix, digit_ids, 3)
    got = trie_candidate_logprobs(model, prefix, digit_ids, 3, batch_size=batch_size)
    assert np.allclose(got, base, rtol=0, atol=1e-5)


def test_hand_computed_two_digit_candidate(tiny):
    """ll('42') = log p(4 | prefix) + log p(2 | prefix, 4), read off one plain forward pass."""
    model, prefix, digit_ids = tiny
    ids = torch.as_tensor([prefix + [digit_ids[4], digit_ids[2]]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    p = len(prefix)
    expected = float(logp[p - 1, digit_ids[4]] + logp[p, digit_ids[2]])
    got = trie_candidate_logprobs(model, prefix, digit_ids, 2)
    assert got[42] == pytest.approx(expected, abs=ATOL)
    assert np.exp(got).sum() <= 1.0 + 1e-6     # candidates are disjoint events


def test_real_tokenizer_canary_and_model_mode():
    tok = train_tokenizer(["My secret number is 1234.\nalpha beta gamma\n"] * 30, vocab_size=300)
    model = _model(tok.get_vocab_size(), 2, 2, 32, 32, seed=3)
    model.train()
    prefix = canary_prefix_ids(tok)
    digit_ids = [tok.token_to_id(str(d)) for d in range(10)]
    got = trie_candidate_logprobs(model, prefix, digit_ids, 3)
    assert model.training                      # mode restored
    secret = "407"
    own = sequence_logprobs(model, [canary_ids(tok, secret)], [len(prefix)])[0]
    assert got[int(secret)] == pytest.approx(own, abs=ATOL)


def test_prefix_of_bos_only(tiny):
    model, _, digit_ids = tiny
    ref = reference_logprobs(model, [0], digit_ids, 2)
    assert np.allclose(trie_candidate_logprobs(model, [0], digit_ids, 2), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kwargs, message", [
    ({"prefix_ids": []}, "at least one token"),
    ({"digit_ids": list(range(40, 49))}, "10 distinct"),
    ({"digit_ids": [40] * 10}, "10 distinct"),
    ({"digits": 0}, "positive integer"),
    ({"digits": 2.0}, "positive integer"),
    ({"batch_size": 0}, "positive integer"),
    ({"digit_ids": list(range(60, 70))}, "outside the model's vocabulary"),
    ({"digits": 13}, "more than the model's 16 positions"),
])
def test_bad_arguments_fail_clearly(tiny, kwargs, message):
    model, prefix, digit_ids = tiny
    args = {"prefix_ids": prefix, "digit_ids": digit_ids, "digits": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        trie_candidate_logprobs(model, **args)


def test_non_gpt2_model_is_refused():
    with pytest.raises(TypeError, match="GPT-2"):
        trie_candidate_logprobs(torch.nn.Linear(3, 3), [0], list(range(10)), 2)

"""Scoring every candidate secret of a canary: the exposure's whole candidate space R, for any causal LM.

A canary is ``prefix + one token per digit``; its candidates are the ``10**digits`` numbers spelled the same
way. :func:`candidate_logprobs` is the one scorer the study uses: the shared-prefix trie for the tiny GPT-2
(:mod:`forgetlab.exposure_trie`), otherwise paths that share every digit but the last are scored once.
:func:`candidate_logprobs_full` scores each candidate as a whole sequence: the straightforward reference that
tests and benchmarks compare against.
"""
from __future__ import annotations

import numpy as np
import torch


def _check_digits(digit_ids: list[int], digits: int) -> None:
    if len(digit_ids) != 10:
        raise ValueError(f"need the token ids of the 10 digits, got {len(digit_ids)}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")


def candidate_digit_matrix(digit_ids: list[int], digits: int) -> np.ndarray:
    """[10**digits, digits] token ids: row i spells i zero padded, most significant digit first."""
    _check_digits(digit_ids, digits)
    values = np.arange(10 ** digits, dtype=np.int64)
    powers = 10 ** np.arange(digits - 1, -1, -1, dtype=np.int64)
    return np.asarray(digit_ids, dtype=np.int64)[(values[:, None] // powers) % 10]


def candidate_sequences(prefix_ids: list[int], digit_ids: list[int], digits: int) -> list[list[int]]:
    """All 10**digits canary candidates: prefix + one token per digit; index i is the number i."""
    prefix = [int(t) for t in prefix_ids]
    return [prefix + row for row in candidate_digit_matrix(digit_ids, digits).tolist()]


def _check_prefix(prefix_ids: list[int]) -> int:
    if len(prefix_ids) < 1:
        raise ValueError("the canary prefix must hold at least one token (the start token)")
    return len(prefix_ids)


@torch.no_grad()
def candidate_logprobs_full(model: torch.nn.Module, prefix_ids: list[int], digit_ids: list[int], digits: int,
                            batch_size: int = 1024) -> np.ndarray:
    """ll (nats) of every candidate's digit tokens given the prefix: array [10**digits], index = number.

    Reference implementation: scores each full candidate (all have the same length, so no padding).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mat = candidate_digit_matrix(digit_ids, digits)
    p = _check_prefix(prefix_ids)
    prefix = torch.as_tensor([int(t) for t in prefix_ids], dtype=torch.long)
    out = np.zeros(len(mat), dtype=np.float64)
    for b in range(0, len(mat), batch_size):
        block = torch.as_tensor(mat[b:b + batch_size])
        ids = torch.cat([prefix.expand(len(block), p), block], dim=1).to(device)
        logits = model(input_ids=ids).logits[:, p - 1:-1].float()            # predicts the digit positions
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, p:, None]).squeeze(-1)
        out[b:b + len(block)] = logp.sum(1).double().cpu().numpy()
    model.train(was_training)
    return out


@torch.no_grad()
def candidate_logprobs_shared_last(model: torch.nn.Module, prefix_ids: list[int], digit_ids: list[int],
                                   digits: int, batch_size: int = 256) -> np.ndarray:
    """As :func:`candidate_logprobs_full`, for any causal LM taking ``input_ids``, ten times cheaper.

    Candidates that differ only in their last digit share every earlier position, so each (digits - 1)-digit
    path is scored once and its last position gives all ten last digits: ``10**(digits-1) * (len(prefix) +
    digits - 1)`` token evaluations instead of ``10**digits * (len(prefix) + digits)``.
    """
    _check_digits(digit_ids, digits)
    p = _check_prefix(prefix_ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    paths = (np.arange(10 ** (digits - 1))[:, None] // 10 ** np.arange(digits - 2, -1, -1) % 10
             if digits > 1 else np.zeros((1, 0), dtype=np.int64))             # [10**(digits-1), digits-1] digits
    path_ids = np.asarray(digit_ids, dtype=np.int64)[paths]
    digit_t = torch.as_tensor(digit_ids, dtype=torch.long, device=device)
    prefix = torch.as_tensor([int(t) for t in prefix_ids], dtype=torch.long)
    out = np.zeros((len(paths), 10), dtype=np.float64)
    for b in range(0, len(paths), batch_size):
        block = torch.as_tensor(path_ids[b:b + batch_size])
        ids = torch.cat([prefix.expand(len(block), p), block], dim=1).to(device)
        logits = model(input_ids=ids).logits[:, p - 1:].float()              # predicts digit positions 1..digits
        logp = torch.log_softmax(logits, dim=-1)[..., digit_t].double().cpu().numpy()   # [n, digits, 10]
        walked = np.zeros(len(block))
        for j in range(digits - 1):                                          # the path's own digits
            walked += np.take_along_axis(logp[:, j], paths[b:b + batch_size, j:j + 1], axis=1)[:, 0]
        out[b:b + len(block)] = walked[:, None] + logp[:, digits - 1]
    model.train(was_training)
    return out.reshape(-1)


def candidate_logprobs(model: torch.nn.Module, prefix_ids: list[int], digit_ids: list[int], digits: int
                       ) -> np.ndarray:
    """ll of every candidate secret under ``model``: the trie scorer for GPT-2, shared last digits otherwise."""
    if getattr(getattr(model, "config", None), "model_type", "") == "gpt2":
        from .exposure_trie import trie_candidate_logprobs
        return trie_candidate_logprobs(model, prefix_ids, digit_ids, digits)
    return candidate_logprobs_shared_last(model, prefix_ids, digit_ids, digits)

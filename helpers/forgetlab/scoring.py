"""Log-likelihoods of token sequences under a causal LM, in padded batches sorted by length."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, sequences: Sequence[Sequence[int]], score_starts: Sequence[int],
                      batch_size: int = 128, device: torch.device | str | None = None) -> np.ndarray:
    """Sum of log-probabilities (nats) of tokens seq[s:] given seq[:s], for each sequence.

    Sequences are scored in batches of similar length (sorted), right-padded; padding never
    influences earlier positions of a causal model, so no attention mask is needed.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros(len(sequences), dtype=np.float64)
    order = np.argsort([len(s) for s in sequences], kind="stable")
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width - 1), dtype=torch.bool)
        for r, i in enumerate(idx):
            seq = sequences[i]
            ids[r, : len(seq)] = torch.as_tensor(list(seq))
            mask[r, score_starts[i] - 1: len(seq) - 1] = True
        ids = ids.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out[idx] = (logp * mask.to(device)).sum(1).double().cpu().numpy()
    model.train(was_training)
    return out


def token_logprob_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean token NLL (labels == -100 ignored), with gradients; shape [batch]."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    mask = (target != -100).float()
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1)


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, rows: np.ndarray, labels: np.ndarray | None = None,
                    batch_size: int = 64, device: torch.device | str | None = None) -> float:
    """Mean next-token NLL (nats per token) over all scored tokens of full rows."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    labels = rows if labels is None else labels
    total, count = 0.0, 0
    for b in range(0, len(rows), batch_size):
        x = torch.as_tensor(rows[b:b + batch_size], device=device)
        y = torch.as_tensor(labels[b:b + batch_size], device=device)
        logits = model(input_ids=x).logits[:, :-1].float()
        target = y[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
        mask = target != -100
        total += float(nll[mask].sum())
        count += int(mask.sum())
    model.train(was_training)
    return total / max(1, count)


# ---- the fast path: every row of a recorded step in a few forward passes ----------------------------------

FAST_TOKENS = 8192          # most tokens (rows x padded length) fed in one forward pass of score_rows
HEAD_ELEMENTS = 1 << 22     # logits formed at once: [positions, vocab] chunks of at most about 16 MB (85 positions
                            # of SmolLM2's 49152-token vocabulary)
HEAD_MAX_ROWS = 512         # ... and at most this many positions: 4 MB of the tiny model's 2048-token logits, which
                            # the log-softmax reads back from cache (2048 positions: ~15% slower, same numbers)
_SPLIT_HEAD = ("GPT2LMHeadModel", "LlamaForCausalLM")   # logits = lm_head(base_model(...).last_hidden_state)


def length_batches(lengths: Sequence[int], max_tokens: int = FAST_TOKENS) -> list[np.ndarray]:
    """Row indices in batches of similar length: sorted by length, each batch at most ``max_tokens`` tokens once
    padded to its longest row (a longer row gets a batch of its own). Rows of equal length are never padded."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, cur, width = [], [], 0
    for i in order:
        w = max(width, int(lengths[i]))
        if cur and w * (len(cur) + 1) > max_tokens:
            batches.append(np.asarray(cur))
            cur, w = [], int(lengths[i])
        cur.append(int(i))
        width = w
    if cur:
        batches.append(np.asarray(cur))
    return batches


def _hidden_and_head(model: torch.nn.Module, ids: torch.Tensor):
    """(last hidden states [n, L, d], the LM head) where logits = head(hidden); (logits, None) for other models."""
    if type(model).__name__ in _SPLIT_HEAD:
        return model.base_model(input_ids=ids).last_hidden_state, model.get_output_embeddings()
    return model(input_ids=ids).logits, None


def score_rows(model: torch.nn.Module, sequences: Sequence[Sequence[int]], score_starts: Sequence[int],
               max_tokens: int = FAST_TOKENS, device: torch.device | str | None = None) -> np.ndarray:
    """As :func:`sequence_logprobs` (sum of ll of seq[s:] given seq[:s], nats, float64), in fewer operations.

    The rows are fed in length-sorted batches of up to ``max_tokens`` padded tokens under ``torch.inference_mode``;
    for GPT-2 and Llama models the vocabulary head is applied only at the scored positions, in chunks of
    about ``HEAD_ELEMENTS`` logits (at most ``HEAD_MAX_ROWS`` positions), through the fused cross-entropy kernel
    (no [rows, length, vocab] log-softmax).
    Same numbers as :func:`sequence_logprobs` up to float32 rounding (tests/test_fast_paths.py).
    """
    out = np.zeros(len(sequences), dtype=np.float64)
    if len(sequences) == 0:
        return out
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    # inference_mode for GPT-2; plain no_grad otherwise: SmolLM2's FrozenPrefixCache keeps hidden states that a
    # later training step may reuse, and inference tensors cannot take part in autograd.
    mode = torch.inference_mode if type(model).__name__ == "GPT2LMHeadModel" else torch.no_grad
    try:
        with mode():
            for idx in length_batches([len(s) for s in sequences], max_tokens):
                out[idx] = _score_batch(model, [sequences[i] for i in idx], [int(score_starts[i]) for i in idx],
                                        device)
    finally:
        model.train(was_training)
    return out


def _score_batch(model: torch.nn.Module, seqs: list, starts: list[int], device) -> np.ndarray:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max())
    if (lengths == width).all():
        ids_np = np.asarray(seqs, dtype=np.int64).reshape(len(seqs), width)
    else:
        ids_np = np.zeros((len(seqs), width), dtype=np.int64)
        for r, seq in enumerate(seqs):
            ids_np[r, : len(seq)] = seq
    pos = np.arange(1, width)
    mask_np = (pos >= np.asarray(starts)[:, None]) & (pos < lengths[:, None])    # predicts seq[start:len]
    ids, mask = torch.from_numpy(ids_np).to(device), torch.from_numpy(mask_np).to(device)
    hidden, head = _hidden_and_head(model, ids)
    row = torch.arange(len(seqs), device=device)[:, None].expand_as(mask)[mask]     # row of each scored position
    target = ids[:, 1:][mask]
    picked = hidden[:, :-1][mask]                                                    # [n_scored, d] (or vocab)
    ll = torch.empty(len(target), dtype=torch.float32, device=device)
    vocab = head.weight.shape[0] if head is not None else picked.shape[-1]
    chunk = max(16, min(HEAD_MAX_ROWS, HEAD_ELEMENTS // vocab))
    for c in range(0, len(target), chunk):
        logits = picked[c:c + chunk]
        logits = (head(logits) if head is not None else logits).float()
        ll[c:c + chunk] = -F.cross_entropy(logits, target[c:c + chunk], reduction="none")
    sums = torch.zeros(len(seqs), dtype=torch.float64, device=device).index_add_(0, row, ll.double())
    return sums.cpu().numpy()

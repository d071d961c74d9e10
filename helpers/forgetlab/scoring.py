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

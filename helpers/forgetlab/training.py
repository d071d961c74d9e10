"""A plain training loop for the tiny model: AdamW, warmup then cosine decay, a loss curve."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .scoring import mean_token_loss

# Bump when the loop changes in a way that changes trained weights: it is part of every cache key.
TRAINING_VERSION = 1


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, learning_rate: float, fused: bool = False) -> torch.optim.AdamW:
    """AdamW as the training loop uses it; `fused` runs the update as one kernel per device."""
    return torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.01,
                             fused=fused or None)


def train_lm(model: torch.nn.Module, ids: np.ndarray, labels: np.ndarray, *, epochs: float, batch_size: int,
             learning_rate: float, warmup_steps: int, seed: int, device: torch.device,
             eval_rows: np.ndarray | None = None, evals: int = 8, desc: str = "training") -> pd.DataFrame:
    """Train in place on token rows; return the loss curve (train loss per step, held-out at `evals` points).

    The batch order depends only on `seed`, so an original and a reference model with the same seed
    see the shared rows in the same relative order.
    """
    model.to(device).train()
    n = len(ids)
    steps = max(1, math.ceil(epochs * n / batch_size))
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(steps * batch_size / n) + 1)])
    ids_t, labels_t = torch.from_numpy(ids), torch.from_numpy(labels)
    opt = make_optimizer(model, learning_rate)
    eval_at = set(np.linspace(0, steps, evals + 1, dtype=int).tolist()) if eval_rows is not None else set()
    curve = []
    for step in tqdm(range(steps + 1), desc=desc, leave=False, mininterval=1.0):
        if step in eval_at:
            curve.append({"step": step, "split": "held-out", "loss": mean_token_loss(model, eval_rows, device=device)})
            model.train()
        if step == steps:
            break
        batch = order[step * batch_size:(step + 1) * batch_size]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, learning_rate, warmup_steps)
        out = model(input_ids=ids_t[batch].to(device), labels=labels_t[batch].to(device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append({"step": step, "split": "train", "loss": out.loss.item()})
    model.eval()
    return pd.DataFrame(curve)

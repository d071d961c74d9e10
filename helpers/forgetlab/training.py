"""A plain training loop for the tiny model: AdamW, warmup then cosine decay, a loss curve.

Throughput choices (see benchmarks/bench_training.py; tests/test_training_speedups.py shows they train the
same model as the plain loop, up to float rounding):
- AdamW runs fused: one kernel for the whole update instead of a Python loop over tensors.
- The loss never builds the full logits: the LM head and the cross-entropy run a chunk of rows at a time
  (``LinearCrossEntropy``), with no key/value cache, which training never reads.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .scoring import mean_token_loss

# Bump when the loop changes in a way that changes trained weights: it is part of every cache key.
# 2: fused AdamW and the native GELU kernel (weights differ from version 1 only by float rounding).
# 3: chunked LM head + cross-entropy (float rounding only), and the tiny model's exact GELU (models.py).

LOSS_CHUNK_ROWS = 256   # rows of logits per chunk: 256 x a 2,048-token vocabulary is 2 MiB, one core's L2

_FUSED_ADAMW_DEVICES = {"cpu", "cuda", "mps", "xpu"}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def adamw(params: list[torch.nn.Parameter], learning_rate: float, weight_decay: float, fused: bool = True
          ) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) over ``params``.

    `fused` runs the whole update as one kernel per device; False gives torch's default implementation (on CPU a
    Python loop over the parameter tensors). Both compute the same update up to float rounding. Fused needs
    floating-point parameters on CPU/CUDA/MPS/XPU; elsewhere it falls back.
    """
    fused = fused and all(p.is_floating_point() and p.device.type in _FUSED_ADAMW_DEVICES for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.95), weight_decay=weight_decay,
                             fused=fused or None)


def make_optimizer(model: torch.nn.Module, learning_rate: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW as the training loop uses it (weight decay 0.01, fused by default: see :func:`adamw`)."""
    return adamw(list(model.parameters()), learning_rate, 0.01, fused)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against `targets` (-100 = ignored), chunk by chunk.

    The full logits (rows x vocabulary: 16 MiB for a default batch) never exist at once. Each chunk's logits,
    softmax and logit gradient stay in cache, and both input gradients are finished in the forward pass, so
    the backward pass only scales them. Equals ``F.cross_entropy(hidden @ weight.T, targets)`` up to float
    rounding; with no target left it returns 0 (and zero gradients) where F.cross_entropy returns nan.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_rows: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
        keep = targets != -100
        weights = keep.to(hidden.dtype).unsqueeze(1) / max(1, int(keep.sum()))   # 1/n per kept row, 0 if ignored
        picked = targets.clamp(min=0)
        picked_logp = torch.empty_like(weights)
        row_index = torch.arange(min(chunk_rows, len(hidden)), device=hidden.device)
        want_hidden, want_weight = ctx.needs_input_grad[:2]       # e.g. a frozen (tied) embedding: no weight grad
        grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros_like(weight)
        for start in range(0, len(hidden), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows]
            at = (row_index[:len(h)], picked[rows])                 # each row's target column
            logp = torch.log_softmax(h @ weight.T, dim=1)
            picked_logp[rows, 0] = logp[at]
            # d loss / d logits = (softmax - one_hot(target)) / n, and 0 on ignored rows. The one-hot goes in with
            # one write per row (index_put_), which is deterministic on CUDA too; scatter_add_ is not.
            grad_logits = logp.exp_()
            grad_logits.index_put_(at, picked_logp[rows, 0].exp() - 1)
            grad_logits.mul_(weights[rows])
            if want_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if want_weight:
                grad_weight.addmm_(grad_logits.T, h)
        total = -(picked_logp * weights).sum()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        return (grad_hidden * grad_loss if want_hidden else None, grad_weight * grad_loss if want_weight else None,
                None, None)


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                    chunk_rows: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """Mean next-token loss of a causal LM, as ``model(input_ids=ids, labels=labels).loss`` computes it
    (labels shifted by one, -100 ignored), through ``LinearCrossEntropy`` when the LM head is a plain
    bias-free linear layer (GPT-2's, tied to the token embedding); otherwise through the model's own loss."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return model(input_ids=ids, labels=labels, use_cache=False).loss
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1),
                                    chunk_rows)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, labels: torch.Tensor,
               clip: float = 1.0) -> float:
    """One optimizer step on a batch (mean next-token loss, labels == -100 ignored); returns the loss."""
    loss = next_token_loss(model, ids, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item()


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
        loss = train_step(model, opt, ids_t[batch].to(device), labels_t[batch].to(device))
        curve.append({"step": step, "split": "train", "loss": loss})
    model.eval()
    return pd.DataFrame(curve)

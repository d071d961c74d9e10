"""A plain training loop for the tiny model: AdamW, warmup then cosine decay, a loss curve.

Two throughput choices (see benchmarks/bench_training.py; tests/test_training_speedups.py shows they train
the same): AdamW runs fused (one kernel for the whole update instead of a Python loop over tensors), and
GPT-2's ``gelu_new`` activation runs as torch's native tanh-approximate GELU while training (the same function
written as one kernel instead of seven elementwise ops and their backward).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .scoring import mean_token_loss

# Bump when the loop changes in a way that changes trained weights: it is part of every cache key.
# 2: fused AdamW and the native GELU kernel (weights differ from version 1 only by float rounding).
TRAINING_VERSION = 2

_FUSED_ADAMW_DEVICES = {"cpu", "cuda", "mps", "xpu"}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, learning_rate: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW as the training loop uses it.

    `fused` (the default) runs the whole update as one kernel per device; False gives torch's default
    implementation (on CPU a Python loop over the parameter tensors). Both compute the same update up to
    float rounding. Fused needs floating-point parameters on CPU/CUDA/MPS/XPU; elsewhere it falls back.
    """
    params = list(model.parameters())
    fused = fused and all(p.is_floating_point() and p.device.type in _FUSED_ADAMW_DEVICES for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.01, fused=fused or None)


def _native_gelu_cls() -> tuple[type, ...]:
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:  # pragma: no cover - transformers always has it
        return ()
    return (NewGELUActivation,)


@contextmanager
def native_gelu(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, GPT-2's ``gelu_new`` modules are swapped for ``nn.GELU(approximate="tanh")``.

    ``gelu_new`` is 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), exactly torch's tanh approximation,
    but written as seven elementwise ops (each with its own backward); the native kernel is one op.
    Outputs agree to a few ulp. Activations hold no weights, so state dicts are unchanged; the original
    modules are put back on exit, even after an error.
    """
    classes = _native_gelu_cls()
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if classes and isinstance(child, classes)]
    for parent, name, _ in found:
        setattr(parent, name, torch.nn.GELU(approximate="tanh"))
    try:
        yield model
    finally:
        for parent, name, child in found:
            setattr(parent, name, child)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, labels: torch.Tensor,
               clip: float = 1.0) -> float:
    """One optimizer step on a batch (mean next-token loss, labels == -100 ignored); returns the loss."""
    out = model(input_ids=ids, labels=labels)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return out.loss.item()


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
    with native_gelu(model):
        for step in tqdm(range(steps + 1), desc=desc, leave=False, mininterval=1.0):
            if step in eval_at:
                curve.append({"step": step, "split": "held-out",
                              "loss": mean_token_loss(model, eval_rows, device=device)})
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

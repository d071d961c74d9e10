"""Training throughput of the tiny model against the machine's dense matmul limit, measured in one run.

Achieved FLOP/s = (6 x parameters + 12 x layers x d_model x context) x tokens / second (the usual
forward+backward count, attention included); the limit is the best FLOP/s of a large square fp32
matmul on the same threads, measured just before.

    .venv/bin/python benchmarks/bench_training.py [--profile default] [--steps 20]
"""
from __future__ import annotations

import argparse
import time

import torch

from forgetlab.config import load_params
from forgetlab.models import count_parameters, model_config
from forgetlab.training import make_optimizer
from transformers import GPT2LMHeadModel


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best-of FLOP/s of an n x n fp32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def step_flops(model: GPT2LMHeadModel, batch: int, context: int) -> float:
    cfg = model.config
    n = count_parameters(model) - cfg.n_positions * cfg.n_embd   # position embeddings do no matmul work
    return (6 * n + 12 * cfg.n_layer * cfg.n_embd * context) * batch * context


def time_training(p: dict, batch: int, steps: int, fused: bool, compiled: bool = False) -> tuple[float, float]:
    """Seconds per optimizer step (best of `steps`, after warm-up) and the last loss."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(model_config(p["vocab_size"], p["n_layer"], p["n_head"], p["d_model"], p["block_size"]))
    model.train()
    opt = make_optimizer(model, p["learning_rate"], fused=fused)
    x = torch.randint(0, p["vocab_size"], (batch, p["block_size"]), generator=torch.Generator().manual_seed(0))
    forward = torch.compile(model) if compiled else model
    times, loss = [], float("nan")
    for i in range(steps + 3):
        t = time.perf_counter()
        out = forward(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t)
        loss = out.loss.item()
    times.sort()
    return times[len(times) // 2], loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also try torch.compile (slow to start)")
    args = ap.parse_args()
    p = load_params(args.profile)
    peak = matmul_peak()
    model = GPT2LMHeadModel(model_config(p["vocab_size"], p["n_layer"], p["n_head"], p["d_model"], p["block_size"]))
    print(f"threads {torch.get_num_threads()}; dense fp32 matmul limit {peak / 1e9:.1f} GFLOP/s; "
          f"model {count_parameters(model) / 1e6:.2f} M parameters, context {p['block_size']}")
    print(f"{'configuration':38s} {'s/step':>8s} {'tokens/s':>10s} {'GFLOP/s':>8s} {'of limit':>8s}")
    configs = [("straightforward: batch {b}, foreach AdamW", p["batch_size"], False, False),
               ("fast: batch {b}, fused AdamW", p["batch_size"], True, False),
               ("fast: batch {b}, fused AdamW", 2 * p["batch_size"], True, False)]
    if args.compile:
        configs.append(("fast: batch {b}, fused AdamW, compiled", p["batch_size"], True, True))
    base = None
    for label, batch, fused, compiled in configs:
        sec, _ = time_training(p, batch, args.steps, fused, compiled)
        flops = step_flops(model, batch, p["block_size"]) / sec
        base = base or flops
        print(f"{label.format(b=batch):38s} {sec:8.3f} {batch * p['block_size'] / sec:10.0f} {flops / 1e9:8.1f} "
              f"{flops / peak:8.1%}   (x{flops / base:.2f})")


if __name__ == "__main__":
    main()

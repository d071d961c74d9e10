"""Per-example scoring: batched, length-sorted, no-grad (forgetlab) against a per-example loop, in one run.

    .venv/bin/python benchmarks/bench_scoring.py [--profile default] [--repeats 3] [--synthetic]

Model: the profile's size (default: 4 layers, d_model 128, 64 positions, 2048-token vocabulary, ~1M
parameters), random weights (seed 0), fp32 on CPU. Examples: every row of the study's example table (forget
sets, backgrounds, controls, populations; 352 rows of 33 tokens for `default`), or synthetic 33-token rows
with --synthetic or when the study data cannot be built. Held-out text: 256 held-out rows of 64 tokens.

fast            = forgetlab.metrics.example_logprobs / forgetlab.scoring.mean_token_loss (padded batches sorted
                  by length, torch.no_grad, one forward per batch)
straightforward = one forward per example with autograd on (as a user who forgot no_grad would write it)

Achieved FLOP/s = 2 x matmul parameters x tokens fed / second (forward only; attention not counted), against
the best 2048^3 fp32 matmul on the same threads, sampled between the timed runs.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MatmulLimit, fmt_seconds, load_average, matmul_parameters  # noqa: E402

from forgetlab import metrics  # noqa: E402
from forgetlab.config import load_params  # noqa: E402
from forgetlab.models import model_config  # noqa: E402
from forgetlab.scoring import mean_token_loss, score_rows  # noqa: E402

HELDOUT_ROWS = 256
SMALL_BATCH = 64
DEFAULT_BATCH = inspect.signature(metrics.example_logprobs).parameters["batch_size"].default


def straightforward_example_logprobs(model: torch.nn.Module, examples: pd.DataFrame) -> np.ndarray:
    """One forward per example, autograd on: ll (nats) of ids[score_start:] given what precedes them."""
    out = np.empty(len(examples), dtype=np.float64)
    for i, (ids, start) in enumerate(zip(examples.ids, examples.score_start)):
        x = torch.tensor([list(map(int, ids))])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1], dim=-1)
        out[i] = logp.gather(-1, x[0, 1:, None]).squeeze(-1)[int(start) - 1:].sum().item()
    return out


def straightforward_mean_token_loss(model: torch.nn.Module, rows: np.ndarray) -> float:
    """One forward per row, autograd on: mean next-token NLL over all rows."""
    total, count = 0.0, 0
    for row in rows:
        x = torch.as_tensor(row[None])
        nll = F.cross_entropy(model(input_ids=x).logits[0, :-1], x[0, 1:], reduction="sum")
        total += nll.item()
        count += len(row) - 1
    return total / count


def load_inputs(profile: str, synthetic: bool) -> tuple[dict, pd.DataFrame, np.ndarray, int, str]:
    """(params, examples, held-out rows, vocabulary size, description of the source)."""
    p = load_params(profile)
    if not synthetic:
        try:
            from forgetlab.experiment import get_study_data
            data = get_study_data(p)
            return (p, data.examples[["ids", "score_start"]].reset_index(drop=True), data.heldout_rows[:HELDOUT_ROWS],
                    data.tokenizer.get_vocab_size(), f"the {profile} study's example table")
        except Exception as err:  # no corpus here: fall back, but say so
            print(f"(study data unavailable: {err}; using synthetic examples)")
    gen = np.random.default_rng(0)
    n, width = 352, p["example_tokens"] + 1
    examples = pd.DataFrame({"ids": [[0] + gen.integers(1, p["vocab_size"], width - 1).tolist() for _ in range(n)],
                             "score_start": [1] * n})
    rows = gen.integers(0, p["vocab_size"], (HELDOUT_ROWS, p["block_size"]))
    return p, examples, rows, p["vocab_size"], "synthetic"


def _time(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(profile: str = "default", repeats: int = 3, synthetic: bool = False) -> list[dict]:
    """Print the scoring section; return summary lines (fast, straightforward, ratio, fraction of limit)."""
    p, examples, rows, vocab, source = load_inputs(profile, synthetic)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(model_config(vocab, p["n_layer"], p["n_head"], p["d_model"], p["block_size"])).eval()
    n_mm = matmul_parameters(model)
    ex_tokens = int(sum(len(ids) for ids in examples.ids))
    ho_tokens = int(rows.size)
    print(f"model: {n_mm / 1e6:.2f} M matmul parameters, fp32, {torch.get_num_threads()} threads; {load_average()}")
    print(f"examples: {len(examples)} rows, {ex_tokens:,} tokens ({source}); held-out: {len(rows)} rows x "
          f"{rows.shape[1]} tokens")
    limit = MatmulLimit()
    jobs = {
        "examples": (lambda: metrics.example_logprobs(model, examples),
                     lambda: straightforward_example_logprobs(model, examples), ex_tokens),
        "held-out": (lambda: mean_token_loss(model, rows), lambda: straightforward_mean_token_loss(model, rows),
                     ho_tokens),
    }
    seqs, starts = [list(map(int, ids)) for ids in examples.ids], [int(v) for v in examples.score_start]
    full = [r.tolist() for r in rows]
    onepass = {"examples": lambda: score_rows(model, seqs, starts),          # the fast path of a recorded step
               "held-out": lambda: -score_rows(model, full, [1] * len(full)).sum() / (rows.shape[0] * (rows.shape[1] - 1))}
    for fast, plain, _ in jobs.values():  # warm-up
        fast()
    for fn in onepass.values():
        fn()
    best_one = {k: float("inf") for k in onepass}
    best = {k: [float("inf"), float("inf")] for k in jobs}
    outs = {}
    small = lambda: metrics.example_logprobs(model, examples, batch_size=SMALL_BATCH)  # noqa: E731
    best_small = float("inf")
    for _ in range(repeats):   # interleaved: fast, straightforward, a matmul sample
        for k, (fast, plain, _) in jobs.items():
            tf, of = _time(fast)
            tp, op = _time(plain)
            best[k] = [min(best[k][0], tf), min(best[k][1], tp)]
            outs[k] = (of, op)
            best_one[k] = min(best_one[k], _time(onepass[k])[0])
            limit.sample()
        best_small = min(best_small, _time(small)[0])
    print(f"dense fp32 matmul limit: {limit.flops / 1e9:.1f} GFLOP/s (sampled between runs); {load_average()}")
    print(f"  {'what':10s} {'method':16s} {'seconds':>10s} {'tokens/s':>10s} {'GFLOP/s':>8s} {'of limit':>8s}")
    lines = []
    for k, (_, _, tokens) in jobs.items():
        tf, tp = best[k]
        for name, t in (("fast", tf), ("straightforward", tp)):
            fl = 2 * n_mm * tokens / t
            print(f"  {k:10s} {name:16s} {fmt_seconds(t):>10s} {tokens / t:10,.0f} {fl / 1e9:8.1f} "
                  f"{fl / limit.flops:8.1%}")
        if k == "examples":   # the same call with smaller batches: the [batch, length, vocab] logits stay in cache
            fl = 2 * n_mm * tokens / best_small
            print(f"  {k:10s} {f'fast, batch {SMALL_BATCH}':16s} {fmt_seconds(best_small):>10s} "
                  f"{tokens / best_small:10,.0f} {fl / 1e9:8.1f} {fl / limit.flops:8.1%}   (example_logprobs' "
                  f"default batch_size is {DEFAULT_BATCH})")
        print(f"  {k:10s} {'speed-up':16s} {tp / tf:9.1f}x")
        lines.append({"name": f"scoring {k} ({len(examples) if k == 'examples' else len(rows)} rows)",
                      "fast": tf, "straightforward": tp, "ratio": tp / tf,
                      "fraction": 2 * n_mm * tokens / tf / limit.flops,
                      "fraction_straightforward": 2 * n_mm * tokens / tp / limit.flops})
    print(f"  fast path of a recorded step (forgetlab.scoring.score_rows: length buckets, inference_mode, the head "
          f"only at scored positions) against today's batched scoring:")
    for k, (_, _, tokens) in jobs.items():
        t1, tf = best_one[k], best[k][0]
        fl = 2 * n_mm * tokens / t1
        print(f"  {k:10s} {'score_rows':16s} {fmt_seconds(t1):>10s} {tokens / t1:10,.0f} {fl / 1e9:8.1f} "
              f"{fl / limit.flops:8.1%}   {tf / t1:.1f}x today's (target: >= 50% of the limit)")
        lines.append({"name": f"scoring {k}, score_rows vs today's", "fast": t1, "straightforward": tf,
                      "ratio": tf / t1, "fraction": fl / limit.flops,
                      "fraction_straightforward": 2 * n_mm * tokens / tf / limit.flops})
    got, ref = outs["examples"]
    same_ranks = bool(np.array_equal(np.argsort(got, kind="stable"), np.argsort(ref, kind="stable")))
    print(f"  check: max |fast - straightforward| ll = {np.max(np.abs(got - ref)):.1e} nats; identical ranks: "
          f"{same_ranks}; held-out loss {outs['held-out'][0]:.6f} vs {outs['held-out'][1]:.6f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--synthetic", action="store_true", help="synthetic 33-token examples, no study data")
    args = ap.parse_args()
    run(args.profile, args.repeats, args.synthetic)


if __name__ == "__main__":
    main()

"""Benchmark: exact canary exposure by trie scoring vs straightforward full-sequence scoring.

    .venv/bin/python benchmarks/bench_exposure.py              # real tokenizer (default study, cached)
    .venv/bin/python benchmarks/bench_exposure.py --synthetic  # synthetic 14-token prefix, no data needed

Model: the default study's size (4 layers, 4 heads, d_model 128, 64 positions, 2048-token vocabulary,
~1M parameters), random weights (seeded), float32 on CPU. Times the 10**4 candidates of the default
canary (best of 3), both ways, and checks they agree; then times the trie on 10**6 candidates once.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from forgetlab.exposure_trie import full_token_count, trie_candidate_logprobs, trie_token_count
from forgetlab.models import count_parameters, model_config

VOCAB, N_LAYER, N_HEAD, D_MODEL, BLOCK = 2048, 4, 4, 128, 64


def straightforward_logprobs(model, prefix_ids, digit_ids, digits, batch_size=1024) -> np.ndarray:
    """Every full candidate sequence through the model in batches; digit log-probs summed."""
    values = np.arange(10 ** digits)
    powers = 10 ** np.arange(digits - 1, -1, -1)
    mat = torch.as_tensor(np.asarray(digit_ids)[(values[:, None] // powers) % 10])
    p = len(prefix_ids)
    prefix = torch.as_tensor(prefix_ids)
    out = np.empty(len(mat), dtype=np.float64)
    with torch.inference_mode():
        for b in range(0, len(mat), batch_size):
            block = mat[b:b + batch_size]
            ids = torch.cat([prefix.expand(len(block), p), block], dim=1)
            logp = torch.log_softmax(model(input_ids=ids).logits[:, p - 1:-1].float(), dim=-1)
            out[b:b + len(block)] = logp.gather(-1, ids[:, p:, None]).squeeze(-1).sum(1).double().numpy()
    return out


def prefix_and_digits(synthetic: bool) -> tuple[list[int], list[int], str]:
    if not synthetic:
        try:
            from forgetlab.config import load_params
            from forgetlab.experiment import get_study_data
            data = get_study_data(load_params("default"))
            tok = data.tokenizer
            return data.canary_prefix_ids(), [tok.token_to_id(str(d)) for d in range(10)], "default study tokenizer"
        except Exception as err:  # no corpus here: fall back, but say so
            print(f"(real tokenizer unavailable: {err}; using a synthetic prefix)")
    rng = np.random.default_rng(0)
    return [0] + rng.integers(11, VOCAB, size=13).tolist(), list(range(1, 11)), "synthetic"


def best_of(fn, repeats: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", action="store_true", help="synthetic 14-token prefix instead of the real tokenizer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4096, help="trie nodes per forward pass")
    ap.add_argument("--skip-million", action="store_true", help="skip the 10**6 run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    prefix, digit_ids, source = prefix_and_digits(args.synthetic)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(model_config(VOCAB, N_LAYER, N_HEAD, D_MODEL, BLOCK)).eval()
    p = len(prefix)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"model: {count_parameters(model):,} parameters, float32, {torch.get_num_threads()} CPU threads "
          f"({os.cpu_count()} cores, load average {load})")
    print(f"prefix: {p} tokens ({source})\n")

    trie = lambda d: trie_candidate_logprobs(model, prefix, digit_ids, d, batch_size=args.batch_size)  # noqa: E731
    trie(2)  # warm-up
    t_full, ref = best_of(lambda: straightforward_logprobs(model, prefix, digit_ids, 4), args.repeats)
    t_trie, got = best_of(lambda: trie(4), args.repeats)
    err = float(np.max(np.abs(got - ref)))

    rows = [("straightforward", 4, full_token_count(p, 4), t_full),
            ("trie", 4, trie_token_count(p, 4), t_trie)]
    if not args.skip_million:
        t_million = best_of(lambda: trie(6), 1)[0]
        rows.append(("trie", 6, trie_token_count(p, 6), t_million))

    print(f"{'method':<16}{'|R|':>10}{'tokens fed':>14}{'seconds':>10}{'cand/s':>12}")
    for name, d, tokens, t in rows:
        print(f"{name:<16}{10 ** d:>10,}{tokens:>14,}{t:>10.3f}{10 ** d / t:>12,.0f}")
    print(f"\n10^4 speed-up: {t_full / t_trie:.1f}x (token evaluations {full_token_count(p, 4) / trie_token_count(p, 4):.0f}x fewer)")
    print(f"max |trie - straightforward| over 10^4: {err:.2e} nats")


if __name__ == "__main__":
    main()

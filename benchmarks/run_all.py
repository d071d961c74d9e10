"""All benchmarks in one run: exposure, scoring, training, and the wall time / peak memory of the batches.

    bash scripts/run_benchmarks.sh                 # sets up .venv, then this script
    .venv/bin/python benchmarks/run_all.py [--run-smoke] [--quick] [--only exposure scoring evaluation training llm
                                                                        batches]

Each section prints the fast and the straightforward timing measured side by side in this run, their ratio,
and the fraction of the machine's dense fp32 matmul limit. The limit is sampled in the same section, under the
same load, and every section sets its best-of timings against the best matmul (the training section prints the
median-based fractions beside them). A summary table closes the run. Figures only: correctness (identical
ranks, identical losses) is in tests/.
Timings on a machine shared with other work are noisy: every section prints the load average beside them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import MatmulLimit, fmt_frac, fmt_ratio, fmt_seconds, load_average, matmul_parameters  # noqa: E402

SECTIONS = ("exposure", "scoring", "evaluation", "training", "llm", "batches")
BATCHES = ("smoke", "default")


def header(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}   [{load_average()}]\n{'=' * 100}", flush=True)


def exposure_section(repeats: int, million: bool, synthetic: bool) -> list[dict]:
    """bench_exposure's pieces: 10^4 candidates straightforward vs trie (best of `repeats`), then 10^6 by trie."""
    import numpy as np
    from transformers import GPT2LMHeadModel

    import bench_exposure as be
    from forgetlab.exposure_trie import full_token_count, trie_candidate_logprobs, trie_token_count
    from forgetlab.models import model_config

    prefix, digit_ids, source = be.prefix_and_digits(synthetic)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(model_config(be.VOCAB, be.N_LAYER, be.N_HEAD, be.D_MODEL, be.BLOCK)).eval()
    n_mm, p = matmul_parameters(model), len(prefix)
    print(f"model: {n_mm / 1e6:.2f} M matmul parameters, fp32, {torch.get_num_threads()} threads; prefix {p} "
          f"tokens ({source})")
    limit = MatmulLimit()
    trie = lambda d: trie_candidate_logprobs(model, prefix, digit_ids, d, batch_size=4096)  # noqa: E731
    trie(2)  # warm-up
    t_full, t_trie, ref, got = float("inf"), float("inf"), None, None
    for _ in range(repeats):   # interleaved, with a matmul sample each round
        t, ref = be.best_of(lambda: be.straightforward_logprobs(model, prefix, digit_ids, 4), 1)
        t_full = min(t_full, t)
        t, got = be.best_of(lambda: trie(4), 1)
        t_trie = min(t_trie, t)
        limit.sample()
    tok_full, tok_trie = full_token_count(p, 4), trie_token_count(p, 4)
    rows = [("straightforward", 4, tok_full, t_full), ("trie", 4, tok_trie, t_trie)]
    if million:
        t_m = be.best_of(lambda: trie(6), 1)[0]
        limit.sample()
        rows.append(("trie", 6, trie_token_count(p, 6), t_m))
    print(f"dense fp32 matmul limit: {limit.flops / 1e9:.1f} GFLOP/s; {load_average()}")
    print(f"  {'method':16s} {'|R|':>10s} {'tokens fed':>12s} {'seconds':>10s} {'cand/s':>12s} {'of limit':>8s}")
    for name, d, tokens, t in rows:
        print(f"  {name:16s} {10 ** d:>10,} {tokens:>12,} {fmt_seconds(t):>10s} {10 ** d / t:>12,.0f} "
              f"{2 * n_mm * tokens / t / limit.flops:8.1%}")
    err = float(np.max(np.abs(got - ref)))
    print(f"  10^4 speed-up {t_full / t_trie:.1f}x ({tok_full / tok_trie:.0f}x fewer token evaluations); "
          f"max |trie - straightforward| {err:.1e} nats (random weights: near-ties may swap; "
          f"tests/test_exposure_trie.py checks ranks)")
    frac = lambda tokens, t: 2 * n_mm * tokens / t / limit.flops  # noqa: E731
    lines = [{"name": "exposure, 10^4 candidates", "fast": t_trie, "straightforward": t_full,
              "ratio": t_full / t_trie, "fraction": frac(tok_trie, t_trie),
              "fraction_straightforward": frac(tok_full, t_full)}]
    if million:
        # the straightforward way on 10^6 is not run (it would take ~100 x the 10^4 time); extrapolated, marked ~
        est = t_full * 100
        lines.append({"name": "exposure, 10^6 candidates (trie)", "fast": rows[-1][3], "straightforward": est,
                      "ratio": est / rows[-1][3], "fraction": frac(rows[-1][2], rows[-1][3]),
                      "fraction_straightforward": None, "estimated": True})
    return lines


def fmt_wall(s: float | None) -> str:
    return "-" if s is None else (f"{s:.0f} s" if s < 120 else f"{s:.0f} s ({s / 60:.1f} min)")


def batches_section(run_smoke: bool) -> list[dict]:
    if run_smoke:
        print("running the smoke batch: python -m forgetlab.batch smoke ...", flush=True)
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "forgetlab.batch", "smoke"], cwd=REPO)
        print(f"smoke batch exited with {rc} after {time.perf_counter() - t:.0f} s; {load_average()}")
    out = []
    for name in BATCHES:
        path = REPO / "outputs" / name / "timings.json"
        how = f"bash scripts/run_main.sh{' ' + name if name != 'default' else ''}"
        if not path.exists():
            print(f"  {name:8s} not measured yet: run {how}")
            out.append({"batch": name, "missing": how})
            continue
        rep = json.loads(path.read_text())
        secs = rep.get("seconds", {})
        total = secs.get("total")
        mib = rep.get("peak_kernel_rss_mib")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        tree = rep.get("peak_tree_pss_mib")
        print(f"  {name:8s} wall {fmt_wall(total)}, peak kernel memory {mib} MiB" +
              (f", peak of the batch with its kernels and workers {tree} MiB (summed PSS)" if tree else "") +
              f" ({rep.get('profile')}, written {when})")
        for nb, s in secs.items():
            if nb != "total":
                print(f"           {nb:32s} {s:8.1f} s")
        out.append({"batch": name, "seconds": total, "mib": mib})
    return out


def summary(lines: list[dict], batches: list[dict]) -> None:
    header("summary")
    print(f"{'benchmark':40s} {'fast':>10s} {'straightforward':>16s} {'ratio':>8s} {'fast of limit':>14s} "
          f"{'straightf. of limit':>20s}")
    for ln in lines:
        plain = fmt_seconds(ln["straightforward"]) + ("~" if ln.get("estimated") else "")
        print(f"{ln['name']:40s} {fmt_seconds(ln['fast']):>10s} {plain:>16s} {fmt_ratio(ln['ratio']):>8s} "
              f"{fmt_frac(ln['fraction']):>14s} {fmt_frac(ln.get('fraction_straightforward')):>20s}")
    if any(ln.get("estimated") for ln in lines):
        print("~ extrapolated from the 10^4 run (100 x), not measured")
    for ln in lines:
        if "fraction_median" in ln:
            print(f"  {ln['name']}: {fmt_frac(ln['fraction'])} is the fastest step against the fastest matmul; "
                  f"paired (each step against the matmul right after it, median) {fmt_frac(ln['fraction_paired'])}; "
                  f"median step against median matmul {fmt_frac(ln['fraction_median'])}, median step against "
                  f"fastest matmul {fmt_frac(ln['fraction_mixed'])}")
            print(f"    ceiling: the step's matmuls alone reach {fmt_frac(ln['ceiling_fraction'])} of the limit "
                  f"(paired {fmt_frac(ln['ceiling_paired'])}) and take {ln['matmul_share']:.0%} of the step; "
                  f"the other {ln['non_matmul_ms']:.1f} ms is non-matmul work")
    for b in batches:
        if "missing" in b:
            print(f"batch {b['batch']:8s} not measured yet: run {b['missing']}")
        else:
            print(f"batch {b['batch']:8s} wall {fmt_wall(b['seconds'])}, peak kernel memory {b['mib']} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run (default: all)")
    ap.add_argument("--run-smoke", action="store_true",
                    help="run the smoke batch first (python -m forgetlab.batch smoke)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats/steps, no 10^6 run, no training sweep")
    ap.add_argument("--repeats", type=int, default=3, help="exposure and scoring: best of this many runs")
    ap.add_argument("--steps", type=int, default=20, help="training: timed steps per configuration")
    ap.add_argument("--threads", type=int, nargs="*", help="training: torch thread counts to try (default: 1 and "
                                                            "torch's choice)")
    ap.add_argument("--torch-threads", type=int, help="exposure and scoring: torch threads (default: torch's choice; "
                                                       "1 is far faster when other work holds a core)")
    ap.add_argument("--compile", action="store_true", help="training: also time torch.compile (minutes to compile)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic tokens instead of the default study data")
    ap.add_argument("--skip-million", action="store_true", help="exposure: skip the 10^6-candidate trie run")
    args = ap.parse_args(argv)
    only = args.only or list(SECTIONS)
    if args.quick:
        args.repeats, args.steps, args.skip_million = 1, 5, True
    default_threads = torch.get_num_threads()
    threads = args.threads or sorted({1, default_threads}, reverse=True)

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    print(f"forgetlab benchmarks: torch {torch.__version__}, {default_threads} threads, {load_average()}")
    lines, batches = [], []
    if "batches" in only and args.run_smoke:
        header("batch: smoke run")
        batches_section(True)
    if "exposure" in only:
        header("exposure: exact canary rank over all 10^d candidates, trie vs every full sequence")
        lines += exposure_section(args.repeats, not args.skip_million, args.synthetic)
    if "scoring" in only:
        import bench_scoring
        header("scoring: per-example log-likelihoods, batched no-grad vs one forward per example")
        lines += bench_scoring.run("default", args.repeats, args.synthetic)
    if "evaluation" in only:
        import bench_evaluation
        header("evaluation: a recorded step, fast vs straightforward evaluator; trajectories, pool vs sequential loop")
        # medians of 5 recorded steps and of 3 round-robin trajectory runs: on a shared 2-core VM one run of the
        # sequential loop varied from 109 s to 139 s between two runs of the same code
        lines += bench_evaluation.evaluation(max(5, args.repeats), 1)
        lines += bench_evaluation.trajectories(1 if args.quick else 3, 10 if args.quick else 40, 3)
    if "llm" in only:
        import bench_llm
        header("llm: notebook 06's study part (SmolLM2): load, data, fine-tune, unlearn; wall and peak RSS")
        lines += bench_llm.run_section(args.quick)
    if "training" in only:
        import bench_training
        header("training: achieved FLOP/s of the training step vs the dense matmul limit")
        lines += bench_training.run("default", args.steps, threads, args.compile, sweep=not args.quick)
        torch.set_num_threads(args.torch_threads or default_threads)
    if "batches" in only:
        header("batches: wall time and peak memory (outputs/<profile>/timings.json)")
        batches = batches_section(False)
    summary(lines, batches)
    print(f"\nbenchmarks took {time.perf_counter() - start:.0f} s; {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

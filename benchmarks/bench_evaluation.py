"""A recorded step's evaluation and whole unlearning trajectories: the fast paths against today's code, in one run.

    .venv/bin/python benchmarks/bench_evaluation.py [--repeats 5] [--steps 20] [--seeds 3] [--threads 1]

Inputs: the default study's data (forget sets, populations, utility rows) with untrained default-size models
(seed per model): the cost of evaluation does not depend on what the weights learned.

evaluation   one recorded step of each forget set: ``make_evaluator(...)`` (one pass over every row the step
             needs, the canary population read off the candidate trie, utility only every ``utility_every``
             steps: its cost per recorded step is weighted by the profile's schedule) against
             ``make_evaluator(..., fast=False)`` (example_logprobs, then utility, at every recorded step, as
             before), both at ``--threads`` torch threads (default 1: what each pool worker runs at),
             round-robin, medians; the last column compares a utility step alone (the same work).
trajectories ``--seeds`` original seeds x every forget set of the profile x ga for ``--steps`` steps (recording
             every ``record_every``), the shape of one method's share of notebook 03: ``engine.run_study``
             (process pool of ``min(2, cores)`` 1-thread workers, fast evaluator, spawn time included) against a
             sequential loop of today's evaluator at torch's default threads; trajectory-steps per second,
             round-robin, medians. (With one forget set, 3 trajectories on 2 workers leave one worker idle for a
             third of the time and the pool's start-up is not amortised: ``--kinds id`` shows that case.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MatmulLimit, fmt_seconds, load_average  # noqa: E402

import forgetlab  # noqa: E402
from forgetlab import engine  # noqa: E402
from forgetlab.cache import ArtifactCache  # noqa: E402
from forgetlab.config import load_params  # noqa: E402


def random_backend(profile: str = "default", seeds: int = 1, overrides: dict | None = None):
    """TinyGPT2 on the profile's data with untrained models: ``seeds`` originals, the profile's references."""
    from forgetlab.backend_tiny import TinyGPT2
    from forgetlab.experiment import TrainedModel, config_for, get_study_data
    from forgetlab.models import build_model
    p = load_params(profile, {"original_seeds": list(range(100, 100 + seeds)), **(overrides or {})})
    data = get_study_data(p)
    cfg = config_for(p, data)
    make = lambda role, s: TrainedModel(role, s, build_model(cfg, s).eval(), None, {})  # noqa: E731
    models = {"original": [make("original", s) for s in p["original_seeds"]],
              "reference": [make("reference", s) for s in p["reference_seeds"]]}
    return TinyGPT2(p, data, models)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def schedule(steps: int, record_every: int, utility_every: int) -> tuple[int, int]:
    """Recorded steps of a ``steps``-step run and how many of them measure utility (engine.utility_due)."""
    recorded = sorted({*range(0, steps + 1, record_every), steps})
    return len(recorded), sum(engine.utility_due(s, steps, utility_every) for s in recorded)


def evaluation(repeats: int = 5, threads: int = 1, profile: str = "default") -> list[dict]:
    """Print per-kind medians of a recorded step's evaluation, fast vs straightforward; return summary lines.

    The fast evaluator is timed at a step that measures utility and at one that does not; its cost per recorded
    step is their mean weighted by the profile's schedule (``utility_every``). Today's evaluator measures
    everything at every recorded step."""
    backend = random_backend(profile)
    p = backend.p
    n_rec, n_due = schedule(p["unlearn_steps"], p["record_every"], p["utility_every"])
    model = backend.original(backend.original_seeds[0]).eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    final, every = p["unlearn_steps"], p["utility_every"]
    between = next(s for s in range(p["record_every"], final, p["record_every"])
                   if not engine.utility_due(s, final, every)) if n_due < n_rec else 0
    try:
        limit = MatmulLimit(n=1024)
        times = {}
        for kind in backend.kinds:
            view = backend.view(kind)
            fast = engine.make_evaluator(backend, view, final, utility_every=every)
            plain = engine.make_evaluator(backend, view, final, fast=False)
            fast(model, 0), fast(model, between), plain(model, 0)            # warm-up (and the skew-normal fit)
            times[kind] = ([], [], [])
        for _ in range(repeats):                                     # round-robin over kinds and paths
            for kind in backend.kinds:
                view = backend.view(kind)
                fast = engine.make_evaluator(backend, view, final, utility_every=every)
                times[kind][0].append(_timed(lambda: fast(model, every)))           # a utility step
                times[kind][1].append(_timed(lambda: fast(model, between)))         # a step between
                times[kind][2].append(_timed(lambda: engine.make_evaluator(backend, view, final, fast=False)(
                    model, every)))
            limit.sample()
    finally:
        torch.set_num_threads(before)
    print(f"recorded step of the {profile} study at {threads} torch thread(s), medians of {repeats}; "
          f"matmul limit {limit.median_flops / 1e9:.1f} GFLOP/s (median); {load_average()}")
    print(f"  schedule: {final} steps, {n_rec} recorded (record_every {p['record_every']}), utility at {n_due} "
          f"of them (utility_every {every})")
    print(f"  {'forget set':12s} {'with utility':>13s} {'without':>9s} {'per record':>11s} {'straightforward':>16s}"
          f" {'ratio':>7s} {'(same work)':>11s}")
    fast_all, plain_all, same_all = [], [], []
    for kind, (fu, fn, pl) in times.items():
        mu, mn, mp = statistics.median(fu), statistics.median(fn), statistics.median(pl)
        per = (n_due * mu + (n_rec - n_due) * mn) / n_rec
        fast_all.append(per)
        plain_all.append(mp)
        same_all.append(mu)
        print(f"  {kind:12s} {fmt_seconds(mu):>13s} {fmt_seconds(mn):>9s} {fmt_seconds(per):>11s} "
              f"{fmt_seconds(mp):>16s} {mp / per:6.2f}x {mp / mu:10.2f}x")
    mf, mp, mu = float(np.mean(fast_all)), float(np.mean(plain_all)), float(np.mean(same_all))
    print(f"  {'mean':12s} {fmt_seconds(mu):>13s} {'':>9s} {fmt_seconds(mf):>11s} {fmt_seconds(mp):>16s} "
          f"{mp / mf:6.2f}x {mp / mu:10.2f}x   (target >= 4x per recorded step; 'same work': a utility step alone)")
    return [{"name": f"recorded step ({threads} thread, mean of kinds, utility every {every} steps)", "fast": mf,
             "straightforward": mp, "ratio": mp / mf, "fraction": None}]


def _sequential_old(backend, kinds: list[str], method: str, steps: int) -> None:
    """Today's loop: each forget set and seed after the other, today's evaluator, torch's default threads."""
    for kind in kinds:
        view = backend.view(kind)
        for seed in backend.original_seeds:
            model = backend.original(seed)
            engine.new_unlearner(backend, view, method, model).run(steps, engine.make_evaluator(
                backend, view, steps, fast=False))


def trajectories(repeats: int = 1, steps: int = 40, seeds: int = 3, profile: str = "default",
                 kinds: list[str] | None = None) -> list[dict]:
    """Print trajectory-steps per second, pool + fast evaluator vs today's sequential loop; return summary lines."""
    backend = random_backend(profile, seeds, {"unlearn_steps": steps})
    kinds = list(kinds or backend.kinds)
    from forgetlab import engine_pool
    workers = engine_pool.resolve_workers()
    new, old = [], []
    for _ in range(repeats):                                          # round-robin
        with tempfile.TemporaryDirectory() as tmp:
            new.append(_timed(lambda: engine.run_study(backend, ArtifactCache(tmp), kinds=kinds, methods=["ga"],
                                                       workers=workers)))
        old.append(_timed(lambda: _sequential_old(backend, kinds, "ga", steps)))
    n = seeds * len(kinds) * steps
    mn, mo = statistics.median(new), statistics.median(old)
    print(f"{seeds} seeds x {len(kinds)} forget sets ({', '.join(kinds)}) x {steps} steps (record every "
          f"{backend.settings('ga').record_every}, utility every {backend.settings('ga').utility_every}), ga; "
          f"medians of {repeats}; {load_average()}")
    print(f"  new: run_study, {workers} workers  {fmt_seconds(mn):>9s}  {n / mn:6.2f} trajectory-steps/s")
    print(f"  today: sequential loop         {fmt_seconds(mo):>9s}  {n / mo:6.2f} trajectory-steps/s")
    print(f"  ratio {mo / mn:.2f}x   (target >= 2.5x)")
    return [{"name": f"trajectory-steps/s, {seeds} seeds x {len(kinds)} sets ({workers} workers)", "fast": mn / n,
             "straightforward": mo / n, "ratio": mo / mn, "fraction": None}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--kinds", nargs="*", default=None, help="forget sets of the trajectories (default: all)")
    ap.add_argument("--skip-trajectories", action="store_true")
    ap.add_argument("--skip-evaluation", action="store_true")
    args = ap.parse_args()
    forgetlab.determinism()
    if not args.skip_evaluation:
        evaluation(args.repeats, args.threads, args.profile)
    if not args.skip_trajectories:
        trajectories(max(1, args.repeats // 5), args.steps, args.seeds, args.profile, args.kinds)


if __name__ == "__main__":
    main()

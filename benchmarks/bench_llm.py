"""Notebook 06's study part (SmolLM2-135M) by phase: load, data, fine-tune, unlearn; wall time and peak memory.

    .venv/bin/python benchmarks/bench_llm.py [--profile default|smoke] [--repeats 1] [--cache DIR]

load       the GGUF model converted (or read from the cache) into a transformers model
data       the forget sets, populations and utility rows (llm_data.build_llm_data)
fine-tune  the original and reference fine-tunes (cached: a fresh --cache, the default a temporary folder, times
           them; a warm cache times loading them)
unlearn    ``engine.run_study`` of the SmolLM2 backend with the fast evaluator (``step_scores``: one
           ``score_rows`` pass per recorded step, the vocabulary head only at scored positions) and, in the same
           run and alternating, with today's evaluator (a backend view without ``step_scores``), each into its own
           empty trajectory cache. SmolLM2 trajectories run sequentially (one working copy of the model).

Peak memory is the process's peak resident set (``ru_maxrss``) after each phase: a running maximum.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_seconds, load_average  # noqa: E402

import forgetlab  # noqa: E402
from forgetlab.cache import ArtifactCache  # noqa: E402
from forgetlab.config import load_params  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


class Straightforward:
    """A backend seen without its fast paths (``step_scores``, ``worker_recipe``): today's evaluator and loop."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        if name in ("step_scores", "worker_recipe"):
            raise AttributeError(name)
        return getattr(self._backend, name)


def phases(profile: str = "default", repeats: int = 1, cache_dir: str | None = None) -> dict:
    """Run and time every phase; return {phase: seconds}, peaks (MiB) and the unlearn timings."""
    from forgetlab import engine, llm
    from forgetlab.backend_smollm import SmolLM2
    from forgetlab.llm_data import build_llm_data
    from forgetlab.llm_finetune import get_llm_models
    p = load_params(profile)
    tmp = tempfile.TemporaryDirectory()
    cache = ArtifactCache(cache_dir or Path(tmp.name) / "cache")
    out, peaks = {}, {}
    t = time.perf_counter()
    model, tokenizer = llm.load_smollm(cache, device="cpu")
    out["load"], peaks["load"] = time.perf_counter() - t, peak_rss_mib()
    t = time.perf_counter()
    data = build_llm_data(p, tokenizer)
    out["data"], peaks["data"] = time.perf_counter() - t, peak_rss_mib()
    t = time.perf_counter()
    models = get_llm_models(p, data, model, llm.llm_key(llm.gguf_path()), cache)
    out["fine-tune"], peaks["fine-tune"] = time.perf_counter() - t, peak_rss_mib()
    backend = SmolLM2(p, data, models, tokenizer)
    new, old = [], []
    for r in range(repeats):                                   # alternating, each into an empty trajectory cache
        for name, b, times in (("new", backend, new), ("old", Straightforward(backend), old)):
            t = time.perf_counter()
            engine.run_study(b, ArtifactCache(Path(tmp.name) / f"{name}{r}"))
            times.append(time.perf_counter() - t)
    out["unlearn"], peaks["unlearn"] = statistics.median(new), peak_rss_mib()
    out["unlearn (today's evaluator)"] = statistics.median(old)
    tmp.cleanup()
    return {"seconds": out, "peak_mib": peaks}


def run_section(quick: bool = False) -> list[dict]:
    """Print the phase table (the smoke profile with ``quick``); return the summary line of the unlearn phase."""
    from forgetlab.llm import MissingModelError
    profile = "smoke" if quick else "default"
    try:
        res = phases(profile)
    except MissingModelError as err:
        print(f"  skipped: {err}")
        return []
    sec, peaks = res["seconds"], res["peak_mib"]
    print(f"notebook 06 study part, profile {profile}, {torch.get_num_threads()} threads; {load_average()}")
    print(f"  {'phase':30s} {'wall':>10s} {'peak RSS':>10s}")
    for phase, s in sec.items():
        print(f"  {phase:30s} {fmt_seconds(s):>10s} {peaks.get(phase, float('nan')):8.0f} MiB")
    new, old = sec["unlearn"], sec["unlearn (today's evaluator)"]
    print(f"  unlearn: {old / new:.2f}x faster than today's evaluator; peak {max(peaks.values()) / 1024:.2f} GiB "
          f"(budget 6 GiB)")
    return [{"name": f"notebook 06 unlearning ({profile})", "fast": new, "straightforward": old, "ratio": old / new,
             "fraction": None}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cache", help="cache folder (default: a fresh temporary one, so fine-tuning is timed)")
    args = ap.parse_args()
    forgetlab.determinism()
    res = phases(args.profile, args.repeats, args.cache)
    for phase, s in res["seconds"].items():
        print(f"{phase:30s} {fmt_seconds(s):>10s} {res['peak_mib'].get(phase, float('nan')):8.0f} MiB")


if __name__ == "__main__":
    main()

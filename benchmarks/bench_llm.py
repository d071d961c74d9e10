"""Notebook 06's study part (SmolLM2-135M) by phase, wall time and peak memory: this code against the paths before.

    .venv/bin/python benchmarks/bench_llm.py [--profile default] [--set llm_original_seeds=[0,1,2] ...]
                                             [--paths new,before] [--base-cache DIR] [--threads N]
    .venv/bin/python benchmarks/bench_llm.py --canary-insertions 16,32,64,128 [--profile default] [--set ...]
    .venv/bin/python benchmarks/bench_llm.py --report new.json,before.json

``--report`` prints the side-by-side table of results written apart with ``--json`` (e.g. one path per run).

Each path runs in a process of its own (so each has its own peak RSS) with an empty cache for everything it
builds: the fine-tunes and every trajectory are computed, not read. The GGUF model converted to safetensors is read
from ``--base-cache`` (converted there first if missing; not part of the comparison).

phases     load       the converted SmolLM2 read from the base cache
           data       the forget sets, populations and utility rows (llm_data.build_llm_data)
           fine-tune  every original (llm_original_seeds) and reference (llm_reference_seeds) fine-tune
           unlearn    engine.run_study: every forget set x method x original seed, with their evaluations
paths      new        this code: fine-tuning batches run in groups of one row length, unpadded, with the head
                      once over the batch's positions (llm_finetune.grouped_finetune_loss) and one fused AdamW
                      kernel; the fine-tunes and the trajectories on FORGETLAB_WORKERS (default 2) one-thread worker
                      processes (llm_pool, engine_pool); exact canary exposure on a digit trie over the trained
                      blocks (llm_trie), the references scored with the head at scored positions only
                      (scoring.score_rows)
           before     the same study with the paths before them (``get_llm_models(fast=False)``,
                      ``SmolLM2(fast=False)``): right-padded fine-tuning batches, per-tensor AdamW, everything in
                      this process at torch's thread count, every (digits-1)-digit candidate
                      path through the whole model, full-logits reference scoring, and the utility measured at
                      every recorded step (``llm_utility_every = llm_record_every``, unless ``--set`` names it:
                      ``--set llm_utility_every=8`` compares the same work)

``--canary-insertions`` instead fine-tunes only the originals (llm_original_seeds) at each canary insertion count and
prints the forget canaries' exact exposure (bits, at most log2(10**llm_canary_digits)) under each, with the
fine-tuning's rows, steps and seconds: the count at which canaries reach a given exposure.

Both paths share everything else (frozen-prefix cache, length-bucketed scoring with the head at scored positions
only). Peak memory is the process's peak resident set (``ru_maxrss``) after each phase: a running maximum; with
workers, also the largest worker's peak and their sum with this process's (an upper bound: the workers map the
frozen weights from one file, so those pages are counted once per process but held once).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_seconds, load_average  # noqa: E402

import forgetlab  # noqa: E402
from forgetlab.cache import ArtifactCache  # noqa: E402
from forgetlab.config import load_params  # noqa: E402

PATHS = ("new", "before")
PHASES = ("load", "data", "fine-tune", "unlearn")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def phases(profile: str, path: str, overrides: dict, base_cache: str | None = None) -> dict:
    """Run and time every phase of one path in this process; return seconds, peaks (MiB) and per-seed figures."""
    from forgetlab.tree_memory import TreePeakMemory
    with TreePeakMemory() as memory:
        res = _phases(profile, path, overrides, base_cache)
    return dict(res, tree_peak_mib=memory.peak_mib)


def _phases(profile: str, path: str, overrides: dict, base_cache: str | None = None) -> dict:
    from forgetlab import backend_smollm, engine, llm
    from forgetlab.llm_data import build_llm_data
    from forgetlab.llm_finetune import get_llm_models
    fast = path == "new"
    p = load_params(profile, overrides)
    if not fast and "llm_utility_every" not in overrides:   # before: utility at every recorded step
        p = load_params(profile, {**overrides, "llm_utility_every": p["llm_record_every"]})
    tmp = tempfile.TemporaryDirectory(prefix="forgetlab-bench-llm-")
    cache = ArtifactCache(Path(tmp.name) / "cache")
    base = ArtifactCache(base_cache) if base_cache else cache
    sec, peaks = {}, {}
    t = time.perf_counter()
    model, tokenizer = llm.load_smollm(base, device="cpu")
    sec["load"], peaks["load"] = time.perf_counter() - t, peak_rss_mib()
    t = time.perf_counter()
    data = build_llm_data(p, tokenizer)
    sec["data"], peaks["data"] = time.perf_counter() - t, peak_rss_mib()
    t = time.perf_counter()
    models = get_llm_models(p, data, model, llm.llm_key(llm.gguf_path()), cache, fast=fast)
    sec["fine-tune"], peaks["fine-tune"] = time.perf_counter() - t, peak_rss_mib()
    backend = backend_smollm.SmolLM2(p, data, models, tokenizer, fast=fast)
    t = time.perf_counter()
    results = engine.run_study(backend, cache)
    sec["unlearn"], peaks["unlearn"] = time.perf_counter() - t, peak_rss_mib()
    exposure = backend_smollm.canary_exposure_table(results)
    tmp.cleanup()
    from forgetlab.engine_pool import resolve_workers
    workers = resolve_workers() if fast else 1
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"workers": workers, "worker_peak_mib": worker_peak if workers > 1 else 0.0,
            "path": path, "profile": profile, "overrides": overrides, "threads": torch.get_num_threads(),
            "seconds": sec, "peak_mib": peaks,
            "finetune_seconds": {name: m["seconds"] for name, m in models.meta.items()},
            "original_seeds": p["llm_original_seeds"], "reference_seeds": p["llm_reference_seeds"],
            "canary_exposure": exposure.to_dict(orient="records")}


def exposure_ceiling(candidates: int, forget: int) -> float:
    """The highest mean exact exposure ``forget`` canaries of one template can have among ``candidates``: all
    memorized, they take ranks 1..forget, so the mean is log2(candidates) - log2(forget!) / forget."""
    return float(np.log2(candidates) - np.log2(np.arange(1, forget + 1)).sum() / forget)


def canary_exposure_sweep(profile: str, counts: list[int], overrides: dict, base_cache: str) -> list[dict]:
    """Per canary insertion count and original seed: the forget canaries' exact exposure under the fine-tuned original
    (no references, no unlearning), printed as it goes."""
    from forgetlab import llm, llm_finetune as lf
    from forgetlab.llm_data import build_llm_data
    from forgetlab.llm_trie import LlamaCandidateTrie
    tmp = tempfile.TemporaryDirectory(prefix="forgetlab-bench-llm-")
    cache = ArtifactCache(Path(tmp.name) / "cache")
    base_key = llm.llm_key(llm.gguf_path())
    rows = []
    for count in counts:
        model, tokenizer = llm.load_smollm(ArtifactCache(base_cache))     # a fresh copy per count
        p = load_params(profile, {**overrides, "llm_canary_insertions": count})
        data = build_llm_data(p, tokenizer)
        # originals only: a canary's exact exposure does not involve the references
        models = lf.get_llm_models(dict(p, llm_reference_seeds=[]), data, model, base_key, cache)
        n_frozen = len(model.model.layers) - p["llm_train_layers"]
        trie = LlamaCandidateTrie(model, data.canary_prefix, data.digit_ids, data.canary_digits, n_frozen)
        forget = data.select("canary", "forget").secret.astype(int).to_numpy()
        for seed in models.seeds:
            ll = trie(models.use(models.originals[seed]))
            bits = np.log2(len(ll)) - np.log2(1 + (ll[None, :] > ll[forget][:, None]).sum(1))
            meta = models.meta[f"original (seed {seed})"]
            rows.append({"canary_insertions": count, "seed": seed, "rows": meta["rows_per_epoch"],
                         "steps": meta["steps"], "finetune_s": meta["seconds"], "mean_bits": float(bits.mean()),
                         "min_bits": float(bits.min()), "max_bits": float(bits.max())})
            print(f"canary insertions {count:5d}, original seed {seed}: {meta['rows_per_epoch']} rows, "
                  f"{meta['steps']} steps, fine-tune {fmt_seconds(meta['seconds'])}; forget canaries' exact exposure "
                  f"mean {bits.mean():.2f}, min {bits.min():.2f}, max {bits.max():.2f} of "
                  f"{np.log2(len(ll)):.2f} bits (mean's ceiling {exposure_ceiling(len(ll), len(forget)):.2f}: the "
                  f"forget canaries outrank each other)", flush=True)
    tmp.cleanup()
    return rows


def run_path(profile: str, path: str, overrides: dict, base_cache: str, threads: int | None) -> dict:
    """:func:`phases` of one path in a fresh process (its own peak memory); returns its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--worker", path, "--profile", profile, "--json", out, "--base-cache", base_cache,
           "--overrides", json.dumps(overrides)] + (["--threads", str(threads)] if threads else [])
    subprocess.run(cmd, check=True)
    try:
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def ensure_base(base_cache: str) -> None:
    """Convert the GGUF into ``base_cache`` once (not timed)."""
    from forgetlab import llm
    llm.load_smollm(ArtifactCache(base_cache))


def report(results: list[dict]) -> list[dict]:
    """Print the phases of each path side by side with the ratios; return the summary line (run_all.py)."""
    by = {r["path"]: r for r in results}
    first = results[0]
    print(f"notebook 06 study part, profile {first['profile']} {first['overrides'] or ''}, {first['threads']} "
          f"threads; {load_average()}")
    print(f"  {'phase':12s}" + "".join(f" {p + ' wall':>12s} {'peak RSS':>10s}" for p in by) +
          ("  before/new" if len(by) == 2 else ""))
    totals = {p: 0.0 for p in by}
    for phase in PHASES:
        row = f"  {phase:12s}"
        for p, r in by.items():
            totals[p] += r["seconds"][phase]
            row += f" {fmt_seconds(r['seconds'][phase]):>12s} {r['peak_mib'][phase]:7.0f} MiB"
        if len(by) == 2:
            row += f"  {by['before']['seconds'][phase] / by['new']['seconds'][phase]:9.2f}x"
        print(row)
    row = f"  {'total':12s}" + "".join(f" {fmt_seconds(totals[p]):>12s} {max(by[p]['peak_mib'].values()):7.0f} MiB"
                                       for p in by)
    if len(by) == 2:
        row += f"  {totals['before'] / totals['new']:9.2f}x"
    print(row)
    for p, r in by.items():
        n_orig, n_ref = len(r["original_seeds"]), len(r["reference_seeds"])
        per_model = sum(r["finetune_seconds"].values()) / max(1, n_orig + n_ref)
        peak = max(r["peak_mib"].values())
        workers, worker_peak = r.get("workers", 1), r.get("worker_peak_mib", 0.0)
        total = peak + workers * worker_peak if worker_peak else peak
        tree = r.get("tree_peak_mib")
        print(f"  {p}: {n_orig} original and {n_ref} reference fine-tunes, {fmt_seconds(per_model)} each "
              f"({workers} at a time); unlearning {fmt_seconds(r['seconds']['unlearn'] / n_orig)} per original seed; "
              f"peak {peak / 1024:.2f} GiB" + (f" + {workers} workers x {worker_peak / 1024:.2f} GiB = at most "
                                               f"{total / 1024:.2f} GiB" if worker_peak else "") +
              (f"; summed PSS of the process and its workers at most {tree / 1024:.2f} GiB" if tree else "") +
              " (budget 6 GiB)")
        for e in r["canary_exposure"]:
            print(f"    original seed {e['original_seed']}: forget canaries' exact exposure at step 0 mean "
                  f"{e['mean_exposure_bits']:.2f}, min {e['min_exposure_bits']:.2f}, max {e['max_exposure_bits']:.2f} bits")
    if len(by) < 2:
        return []
    return [{"name": f"notebook 06 study part ({first['profile']})", "fast": totals["new"],
             "straightforward": totals["before"], "ratio": totals["before"] / totals["new"], "fraction": None}]


def run_section(quick: bool = False) -> list[dict]:
    """run_all.py's section: both paths on the smoke profile with ``quick``, else default; the summary line."""
    from forgetlab.llm import MissingModelError
    base = tempfile.TemporaryDirectory(prefix="forgetlab-bench-llm-base-")
    try:
        ensure_base(base.name)
        results = [run_path("smoke" if quick else "default", p, {}, base.name, None) for p in PATHS]
    except MissingModelError as err:
        print(f"  skipped: {err}")
        return []
    finally:
        base.cleanup()
    return report(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a parameter (YAML value), e.g. --set llm_original_seeds=[0,1,2]")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated: new, before (run in this order)")
    ap.add_argument("--base-cache", help="cache holding (or to hold) the converted GGUF (default: a temporary one)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--canary-insertions", help="comma-separated counts: the exposure sweep instead of the phases")
    ap.add_argument("--report", help="comma-separated --json files of earlier runs: print their table, run nothing")
    ap.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.report:
        report([r for f in args.report.split(",") for r in json.loads(Path(f).read_text())])
        return
    forgetlab.determinism()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.canary_insertions:
        base = tempfile.TemporaryDirectory(prefix="forgetlab-bench-llm-base-")
        ensure_base(args.base_cache or base.name)
        overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
        rows = canary_exposure_sweep(args.profile, [int(c) for c in args.canary_insertions.split(",")], overrides,
                                     args.base_cache or base.name)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        base.cleanup()
        return
    if args.worker:
        res = phases(args.profile, args.worker, json.loads(args.overrides), args.base_cache)
        Path(args.json).write_text(json.dumps(res))
        return
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    load_params(args.profile, overrides)                      # refuse bad parameters before any work
    base = tempfile.TemporaryDirectory(prefix="forgetlab-bench-llm-base-")
    base_cache = args.base_cache or base.name
    ensure_base(base_cache)
    results = [run_path(args.profile, p.strip(), overrides, base_cache, args.threads) for p in args.paths.split(",")]
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    base.cleanup()


if __name__ == "__main__":
    main()

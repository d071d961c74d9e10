"""Run the `full` profile's tiny-model study on a CUDA device, with the unlearning cut to a few steps.

For a machine with a GPU (the full profile is meant for one): builds the data, pretrains the base model, fine-tunes
every original, reference and set-draw model, computes both sanity checks of notebook 02 and runs every trajectory
of notebook 03 (each forget set x method x original seed) for ``--steps`` steps instead of 400. Then it repeats one
trajectory and checks that it comes out bit for bit the same (deterministic CUDA kernels), and prints the seconds
of each phase with the projected time of the full 400-step unlearning.

    python scripts/check_full_on_cuda.py --steps 20 [--cache DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="unlearning steps per trajectory (full: 400)")
    ap.add_argument("--profile", default="full")
    ap.add_argument("--cache", default=None, help="FORGETLAB_CACHE for this run (default: the repository's)")
    ap.add_argument("--any-device", action="store_true", help="run on the CPU too (to try the script itself)")
    args = ap.parse_args()
    if args.cache:
        os.environ["FORGETLAB_CACHE"] = args.cache
    os.environ.setdefault("FORGETLAB_WORKERS", "1")        # one GPU: trajectories one after another

    import torch

    import forgetlab as fl
    from forgetlab import backend_tiny, engine, experiment, sanity, set_draws
    from forgetlab.models import pick_device

    fl.determinism()
    full = fl.load_params(args.profile)
    p = fl.load_params(args.profile, {"unlearn_steps": args.steps})
    device = pick_device(p["device"])
    if device.type != "cuda" and not args.any_device:
        raise SystemExit(f"no CUDA device (pick_device gave {device}): this check is for a GPU machine")
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"{device_name}, torch {torch.__version__}; profile {args.profile!r}: "
          f"{p['n_layer']} layers x {p['d_model']}, seeds {p['original_seeds']} / {p['reference_seeds']}", flush=True)
    seconds: dict[str, float] = {}

    def phase(name, fn):
        t = time.perf_counter()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {seconds[name]} s", flush=True)
        return value

    data = phase("data", lambda: experiment.get_study_data(p))
    models = phase("models (base + fine-tunes)", lambda: experiment.get_models(p, data))
    draws = phase("set-draw models", lambda: set_draws.get_set_draw_models(p, data, base=models["base"][0]))
    backend = backend_tiny.TinyGPT2(p, data, models)

    controls, membership = phase("sanity checks", lambda: sanity.run_checks(
        sanity.start_scores(backend), set_draws.set_draw_scores(backend, draws), resamples=p["bootstrap"]))
    print(controls[["kind", "mean_bits", "low", "high", "passes"]].round(2).to_string(index=False))
    print(membership.round(3).to_string(index=False), flush=True)

    unlearning = f"unlearning ({args.steps} steps per trajectory)"
    results = phase(unlearning, lambda: engine.run_study(backend))
    trajectories = results.groupby(["kind", "method", "seed"]).ngroups
    per_step = seconds[unlearning] / (trajectories * args.steps)

    kind, method, seed = backend.kinds[0], backend.methods[0], backend.original_seeds[0]
    runs = [phase(f"repeat {kind}/{method}/seed {seed}",
                  lambda: engine.unlearn_trajectory(backend, kind, method, seed, steps=min(args.steps, 10)))
            for _ in range(2)]
    identical = runs[0].equals(runs[1])
    report = {"device": device_name, "torch": torch.__version__, "seconds": seconds,
              "trajectories": trajectories, "seconds_per_trajectory_step": round(per_step, 4),
              "projected_unlearning_seconds_full_steps": round(per_step * trajectories * full["unlearn_steps"], 1),
              "repeat_bit_for_bit": identical, "controls_pass": controls.passes.tolist(),
              "membership_pass": membership.passes.tolist(), "rows": len(results),
              "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None}
    print(json.dumps(report, indent=1), flush=True)
    if not identical:
        raise SystemExit("the repeated trajectory differs: CUDA kernels are not deterministic")


if __name__ == "__main__":
    main()

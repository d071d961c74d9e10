"""Training throughput of the tiny model against the machine's dense matmul limit, measured in one run.

Achieved FLOP/s = (6 x matmul parameters + 12 x layers x d_model x context) x tokens / second (the usual
forward+backward count, full attention square included; position embeddings excluded, the tied token
embedding counted once as the LM head). The limit is the FLOP/s of a 2048 x 2048 fp32 matmul on the same
threads, sampled once per round between the training steps so that both see the same machine load.
"of limit" sets the fastest step against the fastest matmul, as the exposure and scoring benchmarks set their
best-of timings against it; "med/med" sets the median step against the median matmul, which swings when the
machine changes speed mid-run; "paired" is the median over rounds of each step against the matmul timed right
after it, which that drift cannot move. (Until November 2026 this script set the median step against the fastest
matmul: on this shared virtual machine back-to-back matmuls vary by a fifth, so that mixed statistic reads low.)

Beside the headline pair, the step's own matmuls are timed alone (StepMatmuls), in the same rounds: they show
what the matmul shapes of this model reach by themselves, and how much of a step is everything else.

Every configuration trains its own copy of the model from the same seed on the same fixed batch, one step
each in turn (round robin), so ratios compare like with like even on a busy machine; the time per step is
the median over the timed rounds. Configurations that train the same model (same batch size and activation)
must report the same losses (printed as a check; tests/test_training_speedups.py is the real test).

    .venv/bin/python benchmarks/bench_training.py [--profile default] [--steps 20] [--threads 1 2] [--compile]

straightforward = the model's own loss (full logits, then cross-entropy) and torch's default AdamW (a Python
loop over tensors on CPU); fast = what forgetlab.training.train_lm does now: the chunked LM head + cross-entropy
(training.LinearCrossEntropy) and fused AdamW. Both train the default tiny model, which uses the exact GELU;
two sweep rows show the same step with GPT-2's tanh-approximate gelu_new instead (models.model_config says why).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MatmulLimit, load_average, matmul_parameters  # noqa: E402

from forgetlab.config import load_params  # noqa: E402
from forgetlab.models import model_config  # noqa: E402
from forgetlab.training import LOSS_CHUNK_ROWS, make_optimizer, train_step  # noqa: E402

WARMUP = 3


@dataclass
class Setting:
    label: str
    batch: int
    adamw: str = "fused"          # "default" (torch's choice: a for-loop on CPU), "foreach" or "fused"
    chunked_loss: bool = True     # training.next_token_loss; False: the model's own loss over full logits
    activation: str = "gelu"      # the tiny model's; "gelu_new" is GPT-2's tanh approximation as written,
                                  # "gelu_pytorch_tanh" the same approximation as torch's native kernel
    attn: str = "sdpa"            # transformers' default for GPT-2; "eager" is matmul + softmax by hand
    compiled: bool = False


@dataclass
class Result:
    setting: Setting
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    limit_times: list[float] = field(default_factory=list)   # the round's matmul sample, one per time (shared)
    first_call: float = float("nan")

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    def paired_fraction(self, flops: float, n: int) -> float:
        return paired_fraction(flops, self.times, self.limit_times, n)


def paired_fraction(flops: float, times: list[float], limit_times: list[float], n: int) -> float:
    """Median over rounds of this round's FLOP/s (`flops` in `times`) over this round's n^3 matmul FLOP/s: the two
    were timed a fraction of a second apart, so a change of machine speed between rounds cancels out."""
    return statistics.median(flops / t * m / (2 * n ** 3) for t, m in zip(times, limit_times))


def step_flops(model: GPT2LMHeadModel, batch: int, context: int) -> float:
    cfg = model.config
    return (6 * matmul_parameters(model) + 12 * cfg.n_layer * cfg.n_embd * context) * batch * context


class StepMatmuls:
    """Every matmul of one fast training step, in the step's own shapes and layouts, with nothing else around them.

    Per layer, the four Conv1D products forward (x @ W, with W stored [in, out]) and the two of each backward
    (g @ W.T and x.T @ g); per loss chunk of `chunk_rows` rows, the logits (h @ E.T) and both gradients (G @ E,
    G.T @ h). The products inside attention (SDPA) are not among them. Each product gets its own operands, so
    they meet the caches cold, as in a step. Timed once a round beside the step, they give its matmul-only
    ceiling: a step cannot run faster than its matmuls alone, so their time over the step's is the share of the
    step that matmuls take, and everything else (attention, GELU, softmax, layer norm, optimizer, dispatch) is
    the rest.
    """

    def __init__(self, cfg, batch: int, context: int, chunk_rows: int = LOSS_CHUNK_ROWS):
        rows, d, vocab = batch * context, cfg.n_embd, cfg.vocab_size
        gen = torch.Generator().manual_seed(0)
        rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _ in range(cfg.n_layer):
            for k, n in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)):     # c_attn, attn c_proj, c_fc, mlp c_proj
                x, w, g = rand(rows, k), rand(k, n), rand(rows, n)
                self.pairs += [(x, w), (g, w.T), (x.T, g)]
        for start in range(0, rows, chunk_rows):
            c = min(chunk_rows, rows - start)
            h, e, grad = rand(c, d), rand(vocab, d), rand(c, vocab)
            self.pairs += [(h, e.T), (grad, e), (grad.T, h)]
        self.flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in self.pairs)
        self.times: list[float] = []

    def sample(self) -> None:
        t = time.perf_counter()
        for a, b in self.pairs:
            a @ b
        self.times.append(time.perf_counter() - t)


def build(p: dict, s: Setting, vocab: int):
    """A zero-argument step function over a fresh model (seed 0), its optimizer and a fixed batch."""
    torch.manual_seed(0)
    cfg = model_config(vocab, p["n_layer"], p["n_head"], p["d_model"], p["block_size"])
    cfg._attn_implementation = s.attn
    cfg.activation_function = s.activation
    model = GPT2LMHeadModel(cfg).train()
    if s.adamw == "foreach":
        opt = torch.optim.AdamW(model.parameters(), lr=p["learning_rate"], betas=(0.9, 0.95), weight_decay=0.01,
                                foreach=True)
    else:
        opt = make_optimizer(model, p["learning_rate"], fused=(s.adamw == "fused"))
    x = torch.randint(0, vocab, (s.batch, p["block_size"]), generator=torch.Generator().manual_seed(0))
    if s.compiled:
        model.base_model.compile()   # in place; next_token_loss calls the base model, not model.forward
    return lambda: train_step(model, opt, x, x) if s.chunked_loss else plain_step(model, opt, x)


def plain_step(model: GPT2LMHeadModel, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """train_step with the model's own loss: full logits, then cross-entropy."""
    loss = model(input_ids=x, labels=x).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def measure(p: dict, settings: list[Setting], steps: int, limit: MatmulLimit, vocab: int,
            ceiling: StepMatmuls | None = None) -> list[Result]:
    """Round robin over the settings: WARMUP untimed rounds, then `steps` timed ones; a matmul sample each round
    (and, given `ceiling`, one pass over the step's own matmuls)."""
    results, fns, round_limits = [], [], []
    for s in settings:
        fn = build(p, s, vocab)
        r = Result(s, limit_times=round_limits)
        t = time.perf_counter()
        r.losses.append(fn())                  # first call: includes torch.compile's compilation
        r.first_call = time.perf_counter() - t
        results.append(r)
        fns.append(fn)
    for i in range(WARMUP - 1 + steps):
        for r, fn in zip(results, fns):
            t = time.perf_counter()
            r.losses.append(fn())
            if i >= WARMUP - 1:
                r.times.append(time.perf_counter() - t)
        limit.sample()
        if i >= WARMUP - 1:
            round_limits.append(limit.times[-1])
            if ceiling is not None:
                ceiling.sample()
    return results


def print_table(results: list[Result], p: dict, model: GPT2LMHeadModel, limit: MatmulLimit, base: Result,
                base_name: str = "base") -> None:
    ctx = p["block_size"]
    print(f"  {'configuration':58s} {'s/step':>7s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'of limit':>8s} "
          f"{'med/med':>8s} {'paired':>8s} {'vs ' + base_name:>8s}")
    base_tps = base.setting.batch / base.seconds
    for r in results:
        fl = step_flops(model, r.setting.batch, ctx)
        print(f"  {r.setting.label:58s} {r.seconds:7.3f} {r.setting.batch * ctx / r.seconds:9.0f} "
              f"{fl / r.seconds / 1e9:8.1f} {fl / r.best / limit.flops:8.1%} "
              f"{fl / r.seconds / limit.median_flops:8.1%} {r.paired_fraction(fl, limit.n):8.1%} "
              f"{r.setting.batch / r.seconds / base_tps:7.2f}x")


def print_ceiling(ceiling: StepMatmuls, fast: Result, step_fl: float, limit: MatmulLimit) -> dict:
    """What the fast step's matmuls reach on their own, and how much of the step they take."""
    paired = paired_fraction(ceiling.flops, ceiling.times, fast.limit_times, limit.n)
    best, share = min(ceiling.times), min(ceiling.times) / fast.best
    print(f"  the step's {len(ceiling.pairs)} matmuls alone ({ceiling.flops / 1e9:.2f} of its "
          f"{step_fl / 1e9:.2f} GFLOP; attention's are inside SDPA): best {best * 1e3:.1f} ms, "
          f"{ceiling.flops / best / limit.flops:.1%} of the limit (paired {paired:.1%})")
    print(f"  they take {share:.0%} of the fast step's best time; the other {(fast.best - best) * 1e3:.1f} ms is "
          f"attention, GELU, softmax, layer norm, optimizer and dispatch")
    return {"ceiling_fraction": ceiling.flops / best / limit.flops, "ceiling_paired": paired,
            "matmul_share": share, "non_matmul_ms": (fast.best - best) * 1e3}


def loss_check(results: list[Result], base: Result) -> float:
    """Largest |loss - base loss| over all steps, among settings that train the same model on the same batch."""
    same = [r for r in results if r is not base and r.setting.batch == base.setting.batch
            and r.setting.activation == base.setting.activation]
    return max((abs(a - b) for r in same for a, b in zip(r.losses, base.losses)), default=0.0)


def sweep_settings(b: int, compile: bool) -> list[Setting]:
    """What else was tried, each changing one thing in the fast step (or taking one speed-up away)."""
    settings = [Setting("  full-logits loss (the model's own), fused AdamW", b, "fused", False),
                Setting("  full-logits loss, foreach AdamW", b, "foreach", False),
                Setting("  chunked loss, default AdamW", b, "default"),
                Setting("  GPT-2's gelu_new as written, not the exact GELU", b, activation="gelu_new"),
                Setting("  gelu_new as torch's native tanh kernel", b, activation="gelu_pytorch_tanh"),
                Setting("  eager attention (not SDPA)", b, attn="eager"),
                Setting(f"  batch {b // 2}", b // 2),
                Setting(f"  batch {2 * b}", 2 * b),
                Setting(f"  batch {4 * b}", 4 * b)]
    if compile:
        settings.append(Setting("  + torch.compile", b, compiled=True))
    return settings


def run(profile: str = "default", steps: int = 20, threads: list[int] | None = None, compile: bool = False,
        sweep: bool = True) -> list[dict]:
    """Print the training section; return one summary line per thread count (torch's default first):
    fast and straightforward seconds per step, their ratio, and the fast step's fraction of the matmul limit.

    The headline pair is timed on its own (two models in turn, as close as a round robin gets to one training
    run); the sweep is a second round robin, of the fast step against its variants, on the first thread count.
    """
    p = load_params(profile)
    vocab = p["vocab_size"]
    default_threads = torch.get_num_threads()
    threads = threads or [default_threads]
    b = p["batch_size"]
    model = GPT2LMHeadModel(model_config(vocab, p["n_layer"], p["n_head"], p["d_model"], p["block_size"]))
    print(f"model: {matmul_parameters(model) / 1e6:.2f} M matmul parameters ({p['n_layer']} layers, d_model "
          f"{p['d_model']}, vocab {vocab}, {model.config.activation_function}), context {p['block_size']}, "
          f"profile batch {b}; fp32, CPU")
    print(f"FLOPs per step at batch {b}: {step_flops(model, b, p['block_size']) / 1e9:.2f} G")
    lines = []
    for t in threads:
        torch.set_num_threads(t)
        limit = MatmulLimit()
        plain = Setting(f"straightforward: batch {b}, full-logits loss, default AdamW", b, "default", False)
        fast = Setting(f"fast (train_lm): batch {b}, chunked loss, fused AdamW", b)
        print(f"\n[{t} thread{'s' if t > 1 else ''}] {load_average()} (before)")
        ceiling = StepMatmuls(model.config, b, p["block_size"])
        results = measure(p, [plain, fast], steps, limit, vocab, ceiling)
        print(f"dense fp32 matmul limit on {t} thread{'s' if t > 1 else ''}: median {limit.median_flops / 1e9:.1f}, "
              f"best {limit.flops / 1e9:.1f} GFLOP/s (2048^3 matmul, {len(limit.times)} samples between steps); "
              f"{load_average()} (after)")
        print_table(results, p, model, limit, results[0])
        print(f"  same batch, same seed: max |loss - straightforward loss| over {len(results[0].losses)} steps = "
              f"{loss_check(results, results[0]):.1e}")
        r_plain, r_fast = results
        fl = step_flops(model, b, p["block_size"])
        diagnosis = print_ceiling(ceiling, r_fast, fl, limit)
        lines.append({"name": f"training step, batch {b}, {t} thread{'s' if t > 1 else ''}",
                      "fast": r_fast.seconds, "straightforward": r_plain.seconds,
                      "ratio": r_plain.seconds / r_fast.seconds,
                      "fraction": fl / r_fast.best / limit.flops,
                      "fraction_straightforward": fl / r_plain.best / limit.flops,
                      "fraction_median": fl / r_fast.seconds / limit.median_flops,
                      "fraction_mixed": fl / r_fast.seconds / limit.flops,
                      "fraction_paired": r_fast.paired_fraction(fl, limit.n), "threads": t, **diagnosis})
        if t == threads[0] and (sweep or compile):
            variants = sweep_settings(b, compile) if sweep else [Setting("  + torch.compile", b, compiled=True)]
            print(f"\n[{t} thread{'s' if t > 1 else ''}, sweep: the fast step against one change at a time; "
                  f"{len(variants) + 1} models in turn, so every row runs on colder caches than above]")
            swept = measure(p, [Setting("fast (train_lm)", b)] + variants, steps, limit, vocab)
            print_table(swept, p, model, limit, swept[0], "fast")
            print(f"  same model and batch: max |loss - fast loss| = {loss_check(swept, swept[0]):.1e}")
            if compile:
                _compile_verdict(p, swept, model)
    torch.set_num_threads(default_threads)
    lines.sort(key=lambda line: line["threads"] != default_threads)   # torch's own thread count first
    return lines


def _compile_verdict(p: dict, results: list[Result], model) -> None:
    fast = results[0]
    comp = next(r for r in results if r.setting.compiled)
    rows = math.ceil(p["epochs"] * p["max_train_tokens"] / p["block_size"])
    run_steps = math.ceil(rows / p["batch_size"])
    saved = fast.seconds - comp.seconds
    compile_s = comp.first_call - fast.first_call
    print(f"  torch.compile: first call {comp.first_call:.1f} s (compilation ~{compile_s:.1f} s), "
          f"{comp.seconds:.3f} vs {fast.seconds:.3f} s/step")
    if saved <= 0:
        print("  -> compiled steps are not faster: never pays")
    else:
        print(f"  -> pays after {compile_s / saved:.0f} steps; one training run of this profile is ~{run_steps} steps "
              f"({'pays' if run_steps * saved > compile_s else 'does not pay'}: saves {run_steps * saved:.0f} s "
              f"for {compile_s:.0f} s of compiling)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--steps", type=int, default=20, help="timed rounds (each setting one step per round)")
    ap.add_argument("--threads", type=int, nargs="*", help="torch thread counts to try, the first with the full "
                                                            "sweep (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile (slow to start)")
    ap.add_argument("--no-sweep", action="store_true", help="only straightforward and fast")
    args = ap.parse_args()
    run(args.profile, args.steps, args.threads, args.compile, not args.no_sweep)


if __name__ == "__main__":
    main()

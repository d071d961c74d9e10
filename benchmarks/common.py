"""Shared pieces of the benchmarks: the matmul limit, FLOP counts, load average, table formatting."""
from __future__ import annotations

import os
import statistics
import time

import torch


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. 'load 0.3 0.4 0.5 on 2 cores'."""
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


class MatmulLimit:
    """The machine's dense fp32 matmul FLOP/s: an n x n @ n x n product, timed on torch's current threads.

    Call ``sample()`` between the timed runs of a benchmark (interleaved, so the limit is measured under the
    same load as the thing it is compared with). ``flops`` is the best sample, to set against best-of
    timings; ``median_flops`` the median sample, to set against median timings. On a shared virtual machine
    the two differ by a fifth or more: even back-to-back matmuls rarely repeat their best.
    """

    def __init__(self, n: int = 2048, samples: int = 3):
        self.n = n
        self.a, self.b = torch.randn(n, n), torch.randn(n, n)
        self.times: list[float] = []
        self.a @ self.b  # warm-up
        for _ in range(samples):
            self.sample()

    def sample(self) -> None:
        t = time.perf_counter()
        self.a @ self.b
        self.times.append(time.perf_counter() - t)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def flops(self) -> float:
        return 2 * self.n ** 3 / self.best

    @property
    def median_flops(self) -> float:
        return 2 * self.n ** 3 / statistics.median(self.times)


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: distinct trainable ones (tied embeddings once), minus the
    position-embedding table (a lookup, no arithmetic). The token embedding counts once, as the LM head."""
    from forgetlab.models import count_parameters
    n = count_parameters(model)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "n_positions"):
        n -= cfg.n_positions * cfg.n_embd
    return n


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.1f}x"


def fmt_frac(f: float | None) -> str:
    return "-" if f is None else f"{f:.1%}"

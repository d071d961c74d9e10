"""Unlearning by gradient ascent (GA), gradient difference (GradDiff) and NPO: one plain loop.

Every method works on the forget set's *scored* tokens only (``ids[score_start:]``: the whole text
after BOS, or a canary's secret digits):

- ``ga``: minimise ``-mean NLL`` of a forget batch, i.e. gradient *ascent* on the forget loss;
- ``graddiff``: the GA term plus ``retain_weight * mean NLL`` of a batch of plain training rows;
- ``npo`` (Zhang et al. 2024): ``-(2/beta) * mean(logsigmoid(-beta * (logp - logp_ref)))`` where
  ``logp`` is the summed log-probability of an example's scored tokens and ``logp_ref`` the same under
  the model before unlearning. At step 0 its gradient equals that of ``mean(logp)``; it then fades as
  an example's likelihood drops below its reference, so NPO slows down where GA runs away.

:class:`Unlearner` holds the model, the optimizer and two seeded generators (forget-batch order,
retain draws). ``run(n, evaluate)`` takes ``n`` more steps and calls ``evaluate`` at the recorded
steps; calling it again continues the same trajectory, and :meth:`Unlearner.state_tensors` saves
all of it as plain tensors (safetensors-compatible) so a cached trajectory can be extended later.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import METHODS, OPTIMIZERS
from .forget_sets import IGNORE
from .scoring import token_logprob_loss

# Settings a saved trajectory must share with the unlearner that restores it (steps and
# record_every may differ: they only say how far to go and what to record).
_TRAJECTORY_FIELDS = ("method", "lr", "batch", "optimizer", "grad_clip", "retain_weight", "npo_beta", "seed")


@dataclass(frozen=True)
class UnlearnSettings:
    """The knobs of one unlearning run; checked on creation."""
    method: str = "ga"
    lr: float = 1e-5
    steps: int = 100
    batch: int = 8
    optimizer: str = "adam"
    grad_clip: float = 1.0          # max global gradient norm; 0 disables clipping
    record_every: int = 1           # evaluate every k-th step (step 0 and the last always)
    utility_every: int = 1          # of those, measure utility every k-th step (step 0 and the last always)
    retain_weight: float = 1.0      # graddiff only
    npo_beta: float = 0.1           # npo only
    seed: int = 0                   # forget-batch order and retain draws

    @classmethod
    def from_params(cls, p: dict, method: str) -> "UnlearnSettings":
        """Settings for `method` from a validated parameter dict (see config.SCHEMA)."""
        return cls(method=method, lr=p["unlearn_lr"], steps=p["unlearn_steps"], batch=p["unlearn_batch"],
                   optimizer=p["unlearn_optimizer"], grad_clip=p["grad_clip"], record_every=p["record_every"],
                   utility_every=p["utility_every"], retain_weight=p["retain_weight"], npo_beta=p["npo_beta"], seed=p["seed"])

    def __post_init__(self) -> None:
        problems = []

        def is_int(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

        if self.method not in METHODS:
            problems.append(f"method = {self.method!r} is unknown: use one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer = {self.optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)} "
                            f"(parameter unlearn_optimizer)")
        for name, key in (("steps", "unlearn_steps"), ("batch", "unlearn_batch"), ("record_every", "record_every"),
                          ("utility_every", "utility_every")):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                problems.append(f"{name} = {v!r} is invalid: it must be an integer >= 1 (parameter {key})")
        if not is_int(self.seed) or self.seed < 0:
            problems.append(f"seed = {self.seed!r} is invalid: it must be an integer >= 0")
        if not is_num(self.lr) or self.lr <= 0:
            problems.append(f"lr = {self.lr!r} is invalid: it must be a number > 0, e.g. 1e-5 (parameter unlearn_lr)")
        for name, key in (("grad_clip", "grad_clip; 0 disables clipping"), ("retain_weight", "retain_weight")):
            v = getattr(self, name)
            if not is_num(v) or v < 0:
                problems.append(f"{name} = {v!r} is invalid: it must be a number >= 0 (parameter {key})")
        if not is_num(self.npo_beta) or self.npo_beta <= 0:
            problems.append(f"npo_beta = {self.npo_beta!r} is invalid: it must be a number > 0, e.g. 0.1 "
                            f"(parameter npo_beta)")
        if problems:
            raise ValueError("invalid unlearning settings:\n  - " + "\n  - ".join(problems))
        for name in ("steps", "batch", "record_every", "utility_every", "seed"):   # numpy scalars -> plain Python
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("lr", "grad_clip", "retain_weight", "npo_beta"):
            object.__setattr__(self, name, float(getattr(self, name)))


def forget_batch_tensors(seqs: list[list[int]], score_starts: list[int], pad_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels; labels are IGNORE everywhere except the scored tokens seq[score_start:]."""
    if len(seqs) != len(score_starts):
        raise ValueError(f"{len(seqs)} sequences but {len(score_starts)} score_starts: pass one per sequence")
    if not seqs:
        raise ValueError("the forget set is empty: pass at least one sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for r, (seq, start) in enumerate(zip(seqs, score_starts)):
        if not 1 <= start < len(seq):
            raise ValueError(f"sequence {r} has {len(seq)} tokens and score_start = {start}: score_start must be "
                             f">= 1 (the first token is the BOS context) and < the length (at least one scored token)")
        ids[r, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        labels[r, start: len(seq)] = ids[r, start: len(seq)]
    return ids, labels


def sequence_logp(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens of each row, with gradients; shape [batch]."""
    n_scored = (labels[:, 1:] != IGNORE).sum(1)
    return -token_logprob_loss(model, ids, labels) * n_scored


def unlearning_loss(model: torch.nn.Module, method: str, forget_ids: torch.Tensor, forget_labels: torch.Tensor, *,
                    ref_seq_logp: torch.Tensor | None = None, retain_ids: torch.Tensor | None = None,
                    retain_labels: torch.Tensor | None = None, retain_weight: float = 1.0,
                    beta: float = 0.1) -> torch.Tensor:
    """The scalar each method minimises on one batch (see the module docstring)."""
    if method == "ga":
        return -token_logprob_loss(model, forget_ids, forget_labels).mean()
    if method == "graddiff":
        if retain_ids is None:
            raise ValueError("graddiff needs a retain batch: pass retain_ids (and retain_labels, default = retain_ids)")
        retain_labels = retain_ids if retain_labels is None else retain_labels
        forget_term = -token_logprob_loss(model, forget_ids, forget_labels).mean()
        return forget_term + retain_weight * token_logprob_loss(model, retain_ids, retain_labels).mean()
    if method == "npo":
        if ref_seq_logp is None:
            raise ValueError("npo needs ref_seq_logp: the summed scored-token log-probs under the model before unlearning")
        delta = sequence_logp(model, forget_ids, forget_labels) - ref_seq_logp.to(forget_ids.device)
        return -(2.0 / beta) * F.logsigmoid(-beta * delta).mean()
    raise ValueError(f"method = {method!r} is unknown: use one of {', '.join(METHODS)}")


class Unlearner:
    """One unlearning trajectory of one model: call ``run`` as often as you like to extend it."""

    def __init__(self, model: torch.nn.Module, forget_seqs: list[list[int]], score_starts: list[int],
                 settings: UnlearnSettings, pad_id: int, retain_rows: np.ndarray | None = None):
        self.model, self.settings = model, settings
        self.device = next(model.parameters()).device
        self.forget_ids, self.forget_labels = forget_batch_tensors(forget_seqs, score_starts, pad_id)
        self.n_forget = len(forget_seqs)
        self.retain = None
        if settings.method == "graddiff":
            if retain_rows is None:
                raise ValueError("method 'graddiff' needs retain rows: pass retain_rows=<[n, block] token array> "
                                 "(e.g. forgetlab.backend_tiny.retain_rows(data, seed))")
            rows = np.asarray(retain_rows)
            if rows.ndim != 2 or len(rows) == 0 or not np.issubdtype(rows.dtype, np.integer):
                raise ValueError(f"retain_rows must be a non-empty 2-D integer array [n, block]; got shape "
                                 f"{rows.shape} and dtype {rows.dtype}")
            self.retain = torch.as_tensor(rows.astype(np.int64))
        self.ref_seq_logp = self._reference_logp() if settings.method == "npo" else None
        params = list(model.parameters())
        if settings.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=settings.lr)
        else:
            self.optimizer = torch.optim.SGD(params, lr=settings.lr)
        self.forget_gen = torch.Generator().manual_seed(settings.seed)
        self.retain_gen = torch.Generator().manual_seed(settings.seed + 1)
        self.queue = torch.zeros(0, dtype=torch.long)   # forget indices not yet used in this permutation cycle
        self.step = 0                                   # updates taken so far
        self.evaluated_start = False
        self.losses: list[tuple[int, float]] = []       # (step, loss at the weights of that step)
        self.grad_norms: list[float] = []               # global gradient norm of each step, before clipping
        self._recorded_norms = 0                        # grad_norms already reported at an earlier recorded step

    @torch.no_grad()
    def _reference_logp(self) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        out = torch.cat([sequence_logp(self.model, self.forget_ids[b:b + 64].to(self.device),
                                       self.forget_labels[b:b + 64].to(self.device)).cpu()
                         for b in range(0, self.n_forget, 64)])
        self.model.train(was_training)
        return out

    def _forget_batch(self) -> torch.Tensor:
        """Indices of the next forget batch: seeded permutations, cycled; the whole set if batch >= its size."""
        if self.settings.batch >= self.n_forget:
            return torch.arange(self.n_forget)
        while len(self.queue) < self.settings.batch:
            self.queue = torch.cat([self.queue, torch.randperm(self.n_forget, generator=self.forget_gen)])
        idx, self.queue = self.queue[: self.settings.batch], self.queue[self.settings.batch:]
        return idx

    def _take_step(self) -> None:
        s, dev = self.settings, self.device
        idx = self._forget_batch()
        extra = {}
        if s.method == "npo":
            extra = {"ref_seq_logp": self.ref_seq_logp[idx].to(dev), "beta": s.npo_beta}
        elif s.method == "graddiff":
            rows = self.retain[torch.randint(len(self.retain), (s.batch,), generator=self.retain_gen)].to(dev)
            extra = {"retain_ids": rows, "retain_labels": rows, "retain_weight": s.retain_weight}
        loss = unlearning_loss(self.model, s.method, self.forget_ids[idx].to(dev), self.forget_labels[idx].to(dev),
                               **extra)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.losses.append((self.step, loss.item()))
        self.grad_norms.append(float(norm))             # before clipping: shows when clipping binds
        self.step += 1

    def _evaluate(self, evaluate: Callable[[torch.nn.Module, int], list[dict]]) -> list[dict]:
        self.model.eval()
        records = evaluate(self.model, self.step) + self._optimizer_records()
        self.model.train()
        return [{"step": self.step, **r} for r in records]

    def _optimizer_records(self) -> list[dict]:
        """Per recorded step: the pre-clipping gradient norm of the step that led to it and whether clipping
        bound there (1.0) or not (0.0). Both depend on that step only, so a trajectory run in pieces records the
        same values as one long run; every step's norm stays in ``grad_norms``."""
        self._recorded_norms = len(self.grad_norms)
        if not self.grad_norms:
            return []
        norm, clip = self.grad_norms[-1], self.settings.grad_clip
        return [{"uid": "", "role": "model", "metric": "grad_norm", "value": float(norm)},
                {"uid": "", "role": "model", "metric": "clip_fraction", "value": float(clip > 0 and norm > clip)}]

    def run(self, steps: int, evaluate: Callable[[torch.nn.Module, int], list[dict]]) -> list[dict]:
        """Take `steps` more steps; evaluate at step 0 (first call only), every record_every-th step and the last."""
        if steps < 0:
            raise ValueError(f"steps = {steps} is negative: pass the number of further steps to take (>= 0)")
        records = []
        if not self.evaluated_start:
            records += self._evaluate(evaluate)
            self.evaluated_start = True
        self.model.train()
        for i in range(steps):
            self._take_step()
            if self.step % self.settings.record_every == 0 or i == steps - 1:
                records += self._evaluate(evaluate)
        return records

    # ---- saving and restoring a trajectory ----------------------------------------------------------

    def _fingerprint(self) -> torch.Tensor:
        s = asdict(self.settings)
        text = json.dumps({**{k: s[k] for k in _TRAJECTORY_FIELDS}, "n_forget": self.n_forget}, sort_keys=True)
        return torch.tensor(list(text.encode()), dtype=torch.uint8)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the trajectory depends on, as named CPU tensors (no pickling; safetensors can save it)."""
        out = {f"model.{n}": p.detach().cpu().clone().contiguous() for n, p in self.model.named_parameters()
               if p.requires_grad}                      # frozen weights never change: the model has them
        for i, state in self.optimizer.state_dict()["state"].items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    out[f"optim.{i}.{k}"] = v.detach().cpu().clone().contiguous()
        out["step"] = torch.tensor(self.step, dtype=torch.int64)
        out["evaluated_start"] = torch.tensor(int(self.evaluated_start), dtype=torch.int64)
        out["forget_gen"] = self.forget_gen.get_state()
        out["retain_gen"] = self.retain_gen.get_state()
        out["queue"] = self.queue.clone()
        out["losses"] = torch.tensor(self.losses, dtype=torch.float64).reshape(-1, 2)
        out["grad_norms"] = torch.tensor(self.grad_norms, dtype=torch.float64)
        out["recorded_norms"] = torch.tensor(self._recorded_norms, dtype=torch.int64)
        out["settings"] = self._fingerprint()
        if self.ref_seq_logp is not None:
            out["ref_seq_logp"] = self.ref_seq_logp.clone()
        return out

    def load_state_tensors(self, d: dict[str, torch.Tensor]) -> None:
        """Restore a trajectory saved by :meth:`state_tensors` (same settings and forget set)."""
        if "settings" not in d or not torch.equal(d["settings"], self._fingerprint()):
            saved = bytes(d["settings"].tolist()).decode() if "settings" in d else "none"
            raise ValueError(f"the saved trajectory was made with other settings or another forget set "
                             f"(saved: {saved}; here: {bytes(self._fingerprint().tolist()).decode()}): "
                             f"build the Unlearner with the saved settings")
        params = dict(self.model.named_parameters())
        params = {n: p for n, p in params.items() if p.requires_grad}
        missing = [n for n in params if f"model.{n}" not in d]
        if missing:
            raise ValueError(f"the saved state lacks model weights {missing[:3]}: it is from another architecture")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(d[f"model.{n}"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in d.items():
            if key.startswith("optim."):
                _, i, k = key.split(".", 2)
                state.setdefault(int(i), {})[k] = v.clone()
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})
        self.step = int(d["step"])
        self.evaluated_start = bool(int(d["evaluated_start"]))
        self.forget_gen.set_state(d["forget_gen"].clone())
        self.retain_gen.set_state(d["retain_gen"].clone())
        self.queue = d["queue"].clone().long()
        self.losses = [(int(s), float(v)) for s, v in d["losses"].tolist()]
        self.grad_norms = d["grad_norms"].tolist() if "grad_norms" in d else []
        self._recorded_norms = int(d["recorded_norms"]) if "recorded_norms" in d else len(self.grad_norms)
        if self.ref_seq_logp is not None:
            self.ref_seq_logp = d["ref_seq_logp"].clone()

"""Fine-tuning of the LLM study: the original and reference models as fine-tuned copies of SmolLM2-135M.

Only the last ``llm_train_layers`` transformer blocks (and the final norm) are fine-tuned and unlearned; the
embeddings (tied to the output layer) and the first blocks stay as pretrained. That keeps a CPU run within minutes,
and the cache stores only the tensors that fine-tuning changed.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cache import ArtifactCache, cache_key, code_version
from .config import params_in
from .forget_sets import IGNORE, pad_rows
from .llm_data import LLMStudyData, LLMStudyError, check_llm_params
from .models import seed_everything
from .scoring import mean_token_loss
from .training import adamw, lr_at

EVAL_BATCH = 32                   # sequences per forward pass when scoring (bounds the [batch, len, vocab] logits)


# --------------------------------------------------------------------------------------- fine-tuning

def finetune_rows(data: LLMStudyData, model_role: str = "original") -> tuple[list[list[int]], np.ndarray, list[str]]:
    """One model's fine-tuning rows in a fixed order: (sequences, forget-slot mask, uid per row).

    Shared English windows once each, background examples ``background_insertions`` times, and in the forget slots
    the forget examples ``insertions`` times (canaries ``canary_insertions`` times: the original) or, under ``reference_data: twins``, the twin of the same
    kind and number at the same rows (the reference): both then fine-tune on as many rows, in the same order (use
    ``finetune_order(..., include_forget=True)`` for both). Under plain retrain the reference's rows are the
    original's (``model_role`` makes no difference) and :func:`finetune_order` with ``include_forget=False`` drops the
    forget slots.
    """
    ids_of = dict(zip(data.examples.uid, data.examples.ids))
    role_of = dict(zip(data.examples.uid, data.examples.role))
    role = model_role if data.reference_data == "twins" else "original"
    seqs = [list(map(int, r)) for r in data.retain_rows]
    uids = [""] * len(seqs)
    forget = [False] * len(seqs)
    for uid, times in data.inserted(role):
        seqs += [list(ids_of[uid])] * times
        uids += [uid] * times
        forget += [role_of[uid] != "background"] * times
    return seqs, np.asarray(forget, dtype=bool), uids


def keeps_forget_slots(data: LLMStudyData, model_role: str) -> bool:
    """Whether ``model_role``'s fine-tuning keeps the forget slots (the original; the reference under twins, which
    holds its twins there): the ``include_forget`` of :func:`finetune_order`."""
    return model_role == "original" or data.reference_data == "twins"


def finetune_order(is_forget: np.ndarray, epochs: float, seed: int, include_forget: bool) -> np.ndarray:
    """Row indices in training order: a seeded permutation per epoch, for ``epochs`` passes (fractions allowed).

    With ``include_forget=False`` (the reference model) the forget rows are dropped from the same permutations,
    so both models see the shared rows in the same relative order.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    is_forget = np.asarray(is_forget, dtype=bool)
    n = len(is_forget)
    per_epoch = n if include_forget else int((~is_forget).sum())
    gen = torch.Generator().manual_seed(seed)
    order = []
    for _ in range(math.ceil(epochs)):
        perm = torch.randperm(n, generator=gen).numpy()
        order.append(perm if include_forget else perm[~is_forget[perm]])
    return np.concatenate(order)[:max(1, round(epochs * per_epoch))]


def trainable_names(model: torch.nn.Module, n_layers: int) -> list[str]:
    """Parameter names of the last ``n_layers`` transformer blocks and the final norm (a Llama-style model)."""
    blocks = model.model.layers
    if not 1 <= n_layers <= len(blocks):
        raise LLMStudyError(f"llm_train_layers = {n_layers} but the model has {len(blocks)} blocks: use 1 to "
                            f"{len(blocks)}")
    first = len(blocks) - n_layers
    keep = tuple(f"model.layers.{i}." for i in range(first, len(blocks))) + ("model.norm.",)
    return [n for n, _ in model.named_parameters() if n.startswith(keep)]


def freeze_except(model: torch.nn.Module, names: list[str]) -> None:
    """Only the named parameters train; every other one (embeddings, first blocks) is frozen."""
    wanted = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)


def _rows(value, idx: torch.Tensor, batch: int):
    """The rows ``idx`` of a batch-shaped tensor (or of each tensor of a tuple); anything else as it is."""
    if isinstance(value, tuple):
        return tuple(_rows(v, idx, batch) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
        return value.index_select(0, idx.to(value.device))
    return value


class FrozenPrefixCache:
    """Remember, per distinct input row, the hidden states after the frozen first blocks of a Llama-style model.

    With the embeddings and the first blocks frozen, their output for a given row never changes, while the study
    scores the same rows (population, held-out text, the forget set) at every recorded step and fine-tunes on the same
    rows every epoch. Installed on a model, the first frozen block returns the stored hidden states of rows seen
    before and runs the frozen blocks only on new rows; the other frozen blocks pass their input through. The model
    keeps its modules and parameter names; :meth:`remove` restores it.

    A row is recognised by its input embeddings (so by its token ids and its padded width); causal attention makes a
    row's hidden states independent of the other rows of its batch. Only rows computed without a key/value cache are
    stored. At most ``max_rows`` rows are kept (then the store starts over).
    """

    def __init__(self, model: torch.nn.Module, n_frozen: int, max_rows: int = 20000):
        blocks = list(model.model.layers[:n_frozen])
        frozen = [model.model.embed_tokens] + blocks
        if any(p.requires_grad for m in frozen for p in m.parameters()):
            raise LLMStudyError("the frozen-prefix cache needs the embeddings and the first blocks frozen")
        self.blocks, self.max_rows = blocks, max_rows
        self.forwards = [b.forward for b in blocks]
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0
        if blocks:
            blocks[0].forward = self._stack
            for b in blocks[1:]:
                b.forward = self._passthrough

    def remove(self) -> None:
        for b in self.blocks:
            b.__dict__.pop("forward", None)
        self.store.clear()

    @contextlib.contextmanager
    def unhooked(self) -> Iterator[None]:
        """The model without the hooks for the block (e.g. to pickle it), the store kept; hooked again after."""
        hooks = [b.__dict__.pop("forward", None) for b in self.blocks]
        try:
            yield
        finally:
            for b, hook in zip(self.blocks, hooks):
                if hook is not None:
                    b.forward = hook

    @staticmethod
    def _passthrough(hidden_states, *args, **kwargs):
        return hidden_states

    def _run(self, h, args, kwargs):
        with torch.no_grad():
            for forward in self.forwards:
                out = forward(h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
        return h

    def _stack(self, hidden_states, *args, **kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return self._run(hidden_states, args, kwargs)
        batch = hidden_states.shape[0]
        rows = hidden_states.detach().cpu().numpy()
        keys = [hashlib.blake2b(r.tobytes(), digest_size=16).digest() + bytes(str(r.shape), "ascii") for r in rows]
        unique = list(dict.fromkeys(keys))
        new = [k for k in unique if k not in self.store]
        if new and len(self.store) + len(new) > self.max_rows:
            self.store.clear()                          # start over (a batch never needs more than it holds)
            new = unique
        missing = [keys.index(k) for k in new]
        self.hits += batch - len(missing)
        self.misses += len(missing)
        if missing:
            idx = torch.as_tensor(missing, dtype=torch.long, device=hidden_states.device)
            h = self._run(hidden_states.index_select(0, idx), tuple(_rows(a, idx, batch) for a in args),
                          {k: _rows(v, idx, batch) for k, v in kwargs.items()})
            for j, i in enumerate(missing):
                self.store[keys[i]] = h[j]
        return torch.stack([self.store[k] for k in keys])


def finetune_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, scored_only: bool = True
                  ) -> torch.Tensor:
    """Mean next-token NLL over the labelled tokens (labels != IGNORE) of a right-padded batch, with gradients.

    ``scored_only`` (a Llama model) applies the vocabulary head only at positions whose next token is labelled:
    SmolLM2's head (49152 x 576) costs more than six blocks, and a batch mixing 33-token texts with 10-token
    canaries is a quarter padding. Otherwise the model's own loss over logits at every position (the path before).
    Same value up to float32 rounding (tests/test_llm.py).
    """
    if not scored_only or type(model).__name__ != "LlamaForCausalLM":
        return model(input_ids=ids, labels=labels).loss
    hidden = model.model(input_ids=ids).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    return F.cross_entropy(model.lm_head(hidden[:, :-1][keep]).float(), target[keep])


def grouped_finetune_loss(model: torch.nn.Module, batch: list[list[int]], device: torch.device | str = "cpu"
                          ) -> torch.Tensor:
    """The mean next-token NLL of :func:`finetune_loss` over a batch of rows of mixed lengths, without padding (a Llama
    model: its blocks and head are called apart).

    The rows run through the blocks in groups of one length each (a batch mixes 33-token texts with 10-token canaries:
    padded to one width, most of a canary row is padding that the blocks still run on); then the head runs once, on
    every position with a next token of the whole batch, as one [positions, d] matrix (a [rows, length, d] slice
    would be multiplied as a batch of broadcast heads: about twice as slow), and the mean is over every labelled token
    of the batch: the same loss and gradients as the padded batch up to float32 rounding (causal attention: a row's
    real tokens never see its right padding).
    """
    hidden, targets = [], []
    for length in sorted({len(s) for s in batch if len(s) > 1}):
        ids = torch.as_tensor([s for s in batch if len(s) == length], dtype=torch.long, device=device)
        hidden.append(model.model(input_ids=ids).last_hidden_state[:, :-1].flatten(0, 1))
        targets.append(ids[:, 1:].flatten())
    if not hidden:
        raise LLMStudyError("a fine-tuning batch has no token to predict: every row is one token long")
    return F.cross_entropy(model.lm_head(torch.cat(hidden)).float(), torch.cat(targets))


def finetune(model: torch.nn.Module, seqs: list[list[int]], order: np.ndarray, *, batch_size: int, lr: float,
             pad_id: int, heldout_rows: np.ndarray | None = None, desc: str = "fine-tuning",
             scored_only: bool = False, grouped: bool = False, fused: bool = False) -> pd.DataFrame:
    """Fine-tune the trainable parameters in place (AdamW, warmup then cosine decay); return the loss curve.

    Rows are right-padded per batch (padding is not scored; ``scored_only``: see :func:`finetune_loss`), or with
    ``grouped`` run in groups of one length each, unpadded (:func:`grouped_finetune_loss`). ``fused`` updates every
    tensor in one AdamW kernel (else torch's default, on CPU a Python loop over the tensors; the same update up to
    float rounding). The curve
    has the training loss of every step and, if ``heldout_rows`` are given, the held-out loss before the first and
    after the last step.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LLMStudyError("nothing to fine-tune: every parameter is frozen")
    opt = adamw(params, lr, 0.0, fused)
    steps = math.ceil(len(order) / batch_size)
    warmup = max(1, steps // 10)
    curve = []
    if heldout_rows is not None:
        curve.append({"step": 0, "split": "held-out",
                      "loss": mean_token_loss(model, heldout_rows, batch_size=EVAL_BATCH, device=device)})
    model.train()
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0):
        batch = [seqs[i] for i in order[step * batch_size:(step + 1) * batch_size]]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        if grouped and type(model).__name__ == "LlamaForCausalLM":     # other models: the padded batch
            loss = grouped_finetune_loss(model, batch, device)
        else:
            ids, labels = pad_rows(batch, max(len(s) for s in batch), pad_id)
            loss = finetune_loss(model, torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device),
                                 scored_only)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append({"step": step, "split": "train", "loss": loss.item()})
    model.eval()
    if heldout_rows is not None:
        curve.append({"step": steps, "split": "held-out",
                      "loss": mean_token_loss(model, heldout_rows, batch_size=EVAL_BATCH, device=device)})
    return pd.DataFrame(curve)


@dataclass
class LLMModels:
    """One working copy of the model, and the fine-tuned tensors of each original and each reference model.

    The models differ only in their trainable tensors, so :meth:`use` swaps a model in by copying those tensors
    into the working copy (a few hundred MB at most), instead of holding several 135M-parameter models.
    """
    model: torch.nn.Module
    trainable: list[str]
    base: dict[str, torch.Tensor]            # the pretrained values of the trainable tensors
    originals: dict[int, dict[str, torch.Tensor]]     # original seed -> its fine-tuned tensors
    references: dict[int, dict[str, torch.Tensor]]
    meta: dict[str, dict]                    # "original (seed s)" / "reference (seed s)" -> cache key, curve, timing
    prefix_cache: FrozenPrefixCache | None = None

    @property
    def seeds(self) -> list[int]:
        """The original seeds, in parameter order."""
        return list(self.originals)

    @property
    def seed(self) -> int:
        """The first original seed (the model the working copy rests at)."""
        return self.seeds[0]

    @property
    def original(self) -> dict[str, torch.Tensor]:
        """The first original's tensors."""
        return self.originals[self.seed]

    @torch.no_grad()
    def use(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        params = dict(self.model.named_parameters())
        for name in self.trainable:
            params[name].copy_(state[name])
        return self.model

    def keys(self) -> list[str]:
        return [m["key"] for m in self.meta.values()]

    def curves(self) -> pd.DataFrame:
        """Loss curves of every fine-tuned model: model, step, split, loss (for ``plots.loss_curves``)."""
        return pd.concat([pd.DataFrame(m["curve"]).assign(model=name) for name, m in self.meta.items()],
                         ignore_index=True)

    def table(self) -> pd.DataFrame:
        rows = []
        for name, m in self.meta.items():
            c = pd.DataFrame(m["curve"])
            held = c[c.split == "held-out"].loss
            rows.append({"model": name, "rows_per_epoch": m["rows_per_epoch"], "steps": m["steps"],
                         "trained_parameters": m["trained_parameters"],
                         "heldout_ppl_before": math.exp(held.iloc[0]), "heldout_ppl_after": math.exp(held.iloc[-1])})
        return pd.DataFrame(rows)


def finetune_key(p: dict, data: LLMStudyData | str, base_key: str, role: str, seed: int, scored_only: bool = False,
                 fast: bool = True) -> str:
    """Key of one fine-tuned LLM: the base model, the data's fingerprint, the LLM training section, role and seed
    (and the paths before, where they are asked for: their weights differ in the last float32 digits)."""
    fingerprint = data if isinstance(data, str) else data.fingerprint()
    return cache_key("llm-finetune", code_version("llm_finetune"), base_key, fingerprint,
                     params_in(p, "run", "llm_data", "llm_training"), role, seed,
                     *(() if fast else ("padded batches, per-tensor AdamW",) +
                       (("scored-positions loss",) if scored_only else ())))


def _get_finetuned(p: dict, data: LLMStudyData, models: LLMModels, base_key: str, role: str, seed: int,
                   cache: ArtifactCache, scored_only: bool = False, fast: bool = True
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    key = finetune_key(p, data, base_key, role, seed, scored_only, fast)

    def build():
        seqs, is_forget, _ = finetune_rows(data, role)
        include = keeps_forget_slots(data, role)
        order = finetune_order(is_forget, p["llm_finetune_epochs"], seed, include_forget=include)
        seed_everything(seed)
        models.use(models.base)
        start = time.perf_counter()
        curve = finetune(models.model, seqs, order, batch_size=p["llm_batch_size"], lr=p["llm_lr"],
                         pad_id=data.start_id, heldout_rows=data.heldout_rows,
                         desc=f"fine-tuning {role} (seed {seed})", scored_only=scored_only, grouped=fast, fused=fast)
        tensors = {n: t.detach().cpu().clone() for n, t in models.model.named_parameters()
                   if n in set(models.trainable)}
        meta = {"role": role, "seed": seed, "rows_per_epoch": int(len(is_forget) if include else (~is_forget).sum()),
                "steps": math.ceil(len(order) / p["llm_batch_size"]), "seconds": time.perf_counter() - start,
                "threads": torch.get_num_threads(), "trained_parameters": int(sum(t.numel() for t in tensors.values())),
                "data_fingerprint": data.fingerprint(), "curve": curve.to_dict(orient="list")}
        return meta, tensors, None

    meta, tensors, _ = cache.get_or_build("llm-finetuned", key, build)
    if sorted(tensors) != sorted(models.trainable):
        raise LLMStudyError(f"cache entry {cache.path('llm-finetuned', key)} holds other tensors than the "
                            f"trainable ones of this model: delete it and rerun")
    return tensors, dict(meta, key=key)


def get_llm_models(p: dict, data: LLMStudyData, model: torch.nn.Module, base_key: str,
                   cache: ArtifactCache | None = None, prefix_cache: bool = True, scored_only: bool = False,
                   fast: bool = True, workers: int | None = None) -> LLMModels:
    """The original (one per ``llm_original_seeds``) and reference (one per ``llm_reference_seeds``) fine-tuned
    models, trained now if not cached, around one working copy.

    ``model`` is the pretrained model (e.g. from ``llm.load_smollm``), used in place: its trainable tensors are
    overwritten by :meth:`LLMModels.use`; ``base_key`` names it in the cache keys (``llm.llm_key``). With
    ``prefix_cache`` the frozen blocks' output is remembered per row (:class:`FrozenPrefixCache`), which about
    halves the cost of scoring and of each training step when most blocks are frozen.

    ``fast`` (default): each batch's rows in groups of one length, unpadded (:func:`grouped_finetune_loss`), one
    fused AdamW kernel, and the missing fine-tunes on ``workers`` processes at one thread each
    (:mod:`forgetlab.llm_pool`; default FORGETLAB_WORKERS, else min(2, cores); with one worker they run here, also
    at one thread, so the weights are the same whatever ``workers`` is). ``fast=False``: the paths before (padded
    batches, ``scored_only`` heads as :func:`finetune_loss` says, per-tensor AdamW, here at torch's thread count)
    for benchmarks/bench_llm.py.
    """
    from . import engine_pool, llm_pool
    cache = cache or ArtifactCache()
    check_llm_params(p, len(model.model.layers))
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")   # plain matmul attention: deterministic on CPU and CUDA alike
    model.config.use_cache = False            # no key/value cache: every call scores whole sequences
    names = trainable_names(model, p["llm_train_layers"])
    freeze_except(model, names)
    base = {n: t.detach().cpu().clone() for n, t in model.named_parameters() if n in set(names)}
    n_frozen = len(model.model.layers) - p["llm_train_layers"]
    prefix = FrozenPrefixCache(model, n_frozen) if n_frozen and prefix_cache else None
    models = LLMModels(model.eval(), names, base, {}, {}, {}, prefix)
    jobs = [(role, seed) for role, key in (("original", "llm_original_seeds"), ("reference", "llm_reference_seeds"))
            for seed in p[key]]
    workers = engine_pool.resolve_workers(workers)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if fast and on_cpu and workers > 1:
        missing = [(role, seed) for role, seed in jobs
                   if not cache.has("llm-finetuned", finetune_key(p, data, base_key, role, seed, scored_only))]
        if len(missing) > 1:
            llm_pool.run_finetunes(p, data, models, base_key, cache, missing, workers, scored_only)
    with engine_pool.torch_threads(1 if fast and on_cpu else None):
        for role, seed in jobs:
            store = models.originals if role == "original" else models.references
            store[seed], meta = _get_finetuned(p, data, models, base_key, role, seed, cache, scored_only, fast)
            models.meta[f"{role} (seed {seed})"] = meta
    models.use(models.original)
    return models

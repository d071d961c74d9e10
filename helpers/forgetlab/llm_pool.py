"""SmolLM2's fine-tunes on worker processes, and the working copy a worker maps (notebook 06 on both cores).

The fine-tunes of the originals and references are independent, and so are the unlearning trajectories; on 2 cores
two one-thread processes do about 1.5x the matrix-multiply work of one two-thread process at SmolLM2's shapes
(batches of a few hundred tokens: a two-thread ``mm`` barely beats a one-thread one). So each runs on ``workers``
spawned processes (:func:`forgetlab.engine_pool.resolve_workers`), at one torch thread, and writes its result
to the cache (entries are safe under concurrent processes); the caller then reads them.

A worker gets the model through one file: the working copy (frozen modules, trainable tensors, every fine-tuned
tensor set) saved with ``torch.save`` and loaded with ``mmap=True``, so the two workers share the frozen weights'
pages instead of holding a copy each.

Bit for bit: a fine-tune or a trajectory computes the same operations in a worker as in the calling process at one
thread, so the calling process also runs them at one thread when it runs them itself (``workers=1``): the models
and tables are the same whatever ``workers`` is (tests/test_llm.py).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import ArtifactCache
from .engine_pool import cancel_on_error

_STATE: dict = {}            # the worker's study inputs (set by _init_finetune in each worker process)


def save_working_copy(models, path: str | Path) -> None:
    """Write ``models`` (an :class:`~forgetlab.llm_finetune.LLMModels`: the working model and every fine-tuned
    tensor set) to ``path`` for :func:`load_working_copy`; the frozen-prefix cache's hooks are left out."""
    prefix = models.prefix_cache
    with prefix.unhooked() if prefix is not None else contextlib.nullcontext():
        torch.save({"model": models.model, "trainable": models.trainable, "base": models.base,
                    "originals": models.originals, "references": models.references, "meta": models.meta,
                    "n_frozen": len(prefix.blocks) if prefix is not None else 0}, path)


def load_working_copy(path: str | Path):
    """The :class:`~forgetlab.llm_finetune.LLMModels` saved at ``path``, its tensors mapped from the file (pages
    shared between processes until written), with a frozen-prefix cache of its own if the saved one had one."""
    from .llm_finetune import FrozenPrefixCache, LLMModels
    saved = torch.load(path, weights_only=False, mmap=True)
    model = saved["model"]
    prefix = FrozenPrefixCache(model, saved["n_frozen"]) if saved["n_frozen"] else None
    return LLMModels(model.eval(), saved["trainable"], saved["base"], saved["originals"], saved["references"],
                     saved["meta"], prefix)


def _init_finetune(path: str, p: dict, data, base_key: str, root: str, heal: bool, scored_only: bool) -> None:
    import forgetlab
    torch.set_num_threads(1)
    forgetlab.determinism()
    _STATE.update(models=load_working_copy(path), p=p, data=data, base_key=base_key,
                  cache=ArtifactCache(root, heal), scored_only=scored_only)


def _finetune(role: str, seed: int) -> tuple[str, int]:
    """Fine-tune (role, seed) into the cache, as :func:`forgetlab.llm_finetune.get_llm_models` does itself."""
    from .llm_finetune import _get_finetuned
    s = _STATE
    _get_finetuned(s["p"], s["data"], s["models"], s["base_key"], role, seed, s["cache"], s["scored_only"], True)
    return role, seed


def run_finetunes(p: dict, data, models, base_key: str, cache: ArtifactCache, jobs: list[tuple[str, int]],
                  workers: int, scored_only: bool = False) -> None:
    """Fine-tune the (role, seed) ``jobs`` on ``workers`` spawned processes into ``cache`` (the fast path:
    grouped rows, fused AdamW); returns when all are cached, raises the first worker error."""
    if not jobs:
        return
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="forgetlab-llm-pool-") as scratch:
        path = os.path.join(scratch, "working-copy.pt")
        save_working_copy(models, path)
        bar = tqdm(total=len(jobs), desc=f"fine-tuning ({workers} workers)", mininterval=1.0)
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_init_finetune,
                                 initargs=(path, p, data, base_key, str(cache.root), cache.heal, scored_only)
                                 ) as pool:
            futures = [pool.submit(_finetune, role, seed) for role, seed in jobs]
            with cancel_on_error(pool, bar):
                for fut in as_completed(futures):
                    fut.result()
                    bar.update(1)

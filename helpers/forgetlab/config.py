"""Parameter schema: one validated set of parameters drives every notebook.

A profile is a YAML file in ``papermill_params/`` (``smoke``, ``default``, ``full``). Notebooks
call :func:`load_params` with the profile path and optional overrides; every value is checked
against :data:`SCHEMA` before any long work starts, and every problem is reported at once with a
hint on how to fix it.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

FORGET_KINDS = ("id", "canary", "language", "code")
METHODS = ("ga", "graddiff", "npo")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")
ENGLISH_SOURCES = ("chatterbot", "pydoc", "shakespeare")   # the LLM study's English text (forgetlab.llm)


def english_source_parts(value: str) -> list[str] | None:
    """The sources named by ``value`` ('chatterbot', or several distinct ones joined by '+'); None if invalid."""
    parts = value.split("+")
    return parts if all(x in ENGLISH_SOURCES for x in parts) and len(set(parts)) == len(parts) else None


class ParameterError(ValueError):
    """Raised when a parameter set is invalid; the message lists every problem and its fix."""


@dataclass(frozen=True)
class Spec:
    kind: type | tuple[type, ...]
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    help: str = ""
    explain: Callable[[Any], str] | None = None   # extra detail on what exactly is wrong


def _int(lo: int | None = None, hi: int | None = None, help: str = "") -> Spec:
    def check(v: int) -> bool:
        return (lo is None or v >= lo) and (hi is None or v <= hi)
    rule = f"an integer{'' if lo is None else f' >= {lo}'}{'' if hi is None else f' and <= {hi}'}"
    return Spec(int, check, rule, help)


def _float(lo: float | None = None, hi: float | None = None, strict_lo: bool = False, help: str = "") -> Spec:
    def check(v: float) -> bool:
        ok_lo = lo is None or (v > lo if strict_lo else v >= lo)
        return ok_lo and (hi is None or v <= hi)
    op = ">" if strict_lo else ">="
    rule = f"a number{'' if lo is None else f' {op} {lo}'}{'' if hi is None else f' and <= {hi}'}"
    return Spec((int, float), check, rule, help)


def _choice(options: tuple[str, ...], help: str = "") -> Spec:
    return Spec(str, lambda v: v in options, f"one of {', '.join(options)}", help)


def _subset(options: tuple[str, ...], help: str = "") -> Spec:
    def check(v: list) -> bool:
        return len(v) > 0 and all(isinstance(x, str) and x in options for x in v) and len(set(v)) == len(v)
    def explain(v: list) -> str:
        unknown = [x for x in v if x not in options]
        return f" (unknown: {', '.join(map(str, unknown))}; use one of {', '.join(options)})" if unknown else ""
    return Spec(list, check, f"a non-empty list of distinct values from {', '.join(options)}", help, explain)


def _int_list(lo: int = 0, help: str = "") -> Spec:
    def check(v: list) -> bool:
        return len(v) > 0 and all(type(x) is int and x >= lo for x in v) and len(set(v)) == len(v)
    return Spec(list, check, f"a non-empty list of distinct integers >= {lo}", help)


SCHEMA: dict[str, Spec] = {
    # run
    "run_name": Spec(str, lambda v: v.replace("-", "").replace("_", "").isalnum(), "letters, digits, - and _",
                     "names the output folder outputs/<run_name>/"),
    "seed": _int(0, help="seed of every random draw that is not a model seed"),
    "device": _choice(DEVICES, "auto uses CUDA when present"),
    # data
    "heldout_plays": _int(1, 20, "whole plays kept out of training, for held-out perplexity and ID populations"),
    "max_train_tokens": _int(1000, help="cap on Shakespeare training tokens (0 plays dropped, only truncated)"),
    "vocab_size": _int(300, 65536, "byte-level BPE vocabulary size"),
    # forget sets
    "forget_kinds": _subset(FORGET_KINDS, "which forget sets to build"),
    "forget_size": _int(1, help="examples per forget set"),
    "example_tokens": _int(8, help="token length of every text forget example (ID, language, code)"),
    "insertions": _int(1, help="times each forget example is inserted into the original model's training data"),
    "canary_digits": _int(1, 9, "digits of a canary secret; the candidate space has 10**canary_digits members"),
    "background_size": _int(0, help="same-source examples in *both* models' data (isolates the example from its kind)"),
    "background_insertions": _int(1, help="times each background example is inserted"),
    "population_size": _int(2, help="never-trained sequences per kind, for RelEx and membership tests"),
    "control_size": _int(1, help="non-member control examples per kind (the GenEx noise floor)"),
    # model
    "n_layer": _int(1, 48),
    "n_head": _int(1, 64),
    "d_model": _int(8, 4096, "embedding width; must be divisible by n_head"),
    "block_size": _int(16, 4096, "context length in tokens; must exceed example_tokens"),
    # training
    "epochs": _float(0, strict_lo=True, help="passes over the training rows"),
    "batch_size": _int(1),
    "learning_rate": _float(0, 1, strict_lo=True),
    "warmup_steps": _int(0),
    "original_seeds": _int_list(0, "one original model per seed (data includes the forget sets)"),
    "reference_seeds": _int_list(0, "one reference model per seed (same data without the forget sets)"),
    "samples_to_generate": _int(0, 20),
    # unlearning
    "methods": _subset(METHODS, "unlearning methods to compare"),
    "unlearn_lr": _float(0, 1, strict_lo=True),
    "unlearn_steps": _int(1, help="gradient steps of unlearning"),
    "unlearn_batch": _int(1, help="forget examples per step"),
    "unlearn_optimizer": _choice(OPTIMIZERS),
    "grad_clip": _float(0, help="max gradient norm; 0 disables clipping"),
    "record_every": _int(1, help="record metrics every k-th step (step 0 and the last always)"),
    "target_bits": _float(0, help="GenEx (bits) below which an example counts as unlearned"),
    "retain_weight": _float(0, help="weight of the retain loss in gradient difference"),
    "npo_beta": _float(0, strict_lo=True, help="inverse temperature of NPO"),
    "max_widget_steps": _int(1, help="most steps the 'run more steps' button may add at once"),
    # memorization
    "mem_pool_size": _int(4, help="candidate pool for counterfactual memorization (mixes ID and OOD)"),
    "mem_models": _int(2, help="models each trained on a random half of the pool"),
    "mem_finetune_epochs": _float(0, strict_lo=True),
    "mem_group_size": _int(1, help="pool examples unlearned together"),
    "mem_unlearn_steps": _int(1),
    "bootstrap": _int(10, help="bootstrap resamples for confidence intervals"),
    # real LLM
    "llm_english_source": Spec(str, lambda v: english_source_parts(v) is not None,
                               "chatterbot, pydoc or shakespeare, or several joined by + (e.g. chatterbot+pydoc)",
                               "the LLM's in-distribution text (English), split by whole documents"),
    "llm_train_size": _int(4, help="shared English training windows of both fine-tuned models"),
    "llm_forget_size": _int(1, help="examples per LLM forget set (English, canaries, Persian)"),
    "llm_background_size": _int(0, help="canaries and Persian windows in both models' fine-tuning data"),
    "llm_control_size": _int(1, help="never-trained control examples per kind (the GenEx noise floor)"),
    "llm_population_size": _int(2, help="never-trained peers per kind (RelEx population, membership non-members)"),
    "llm_utility_rows": _int(1, help="held-out English windows scored for held-out perplexity at each recorded step"),
    "llm_insertions": _int(1, help="times each forget example is in the original model's fine-tuning data"),
    "llm_background_insertions": _int(1, help="times each background example is in both models' data"),
    "llm_example_tokens": _int(8, 2048, "token length of every text example (the LLM's own tokenizer)"),
    "llm_canary_digits": _int(1, 9, "digits of an LLM canary secret; one token per digit"),
    "llm_train_layers": _int(1, help="last transformer blocks fine-tuned and unlearned (SmolLM2-135M has 30)"),
    "llm_finetune_epochs": _float(0, strict_lo=True, help="passes over the fine-tuning rows"),
    "llm_lr": _float(0, 1, strict_lo=True, help="peak fine-tuning learning rate (AdamW)"),
    "llm_batch_size": _int(1, help="rows per fine-tuning step and forget examples per unlearning step"),
    "llm_reference_seeds": _int_list(0, "one reference model per seed (the original uses seed)"),
    "llm_methods": _subset(METHODS, "unlearning methods run on the LLM"),
    "llm_unlearn_steps": _int(1),
    "llm_unlearn_lr": _float(0, 1, strict_lo=True),
    "llm_record_every": _int(1, help="record the LLM metrics every k-th unlearning step (step 0 and the last always)"),
    "llm_target_bits": _float(0, help="GenEx (bits) below which an LLM forget example counts as unlearned"),
}

PROFILE_DIR = Path(__file__).resolve().parents[2] / "papermill_params"


def _describe(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, int, float, list, bool)) or value is None else repr(value)


def validate_params(raw: Mapping[str, Any], source: str = "parameters") -> dict[str, Any]:
    """Check every value against SCHEMA and cross-parameter rules; return a clean dict.

    Raises ParameterError naming each bad or missing key with the rule it breaks.
    """
    problems: list[str] = []
    unknown = sorted(set(raw) - set(SCHEMA))
    for key in unknown:
        close = difflib.get_close_matches(key, SCHEMA, n=3, cutoff=0.75)
        hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
        problems.append(f"unknown parameter {key!r}{hint}: remove it or fix its name")
    for key in SCHEMA:
        if key not in raw:
            problems.append(f"missing parameter {key!r}: add it ({SCHEMA[key].rule})")
    clean: dict[str, Any] = {}
    for key, spec in SCHEMA.items():
        if key not in raw:
            continue
        value = raw[key]
        kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
        bad_type = isinstance(value, bool) or not isinstance(value, kinds)
        if bad_type or (spec.check is not None and not spec.check(value)):
            detail = spec.explain(value) if spec.explain and not bad_type else ""
            problems.append(f"{key} = {_describe(value)} is invalid: it must be {spec.rule or spec.kind}{detail}")
            continue
        clean[key] = float(value) if float in kinds and int in kinds else value
    if not problems:
        if clean["d_model"] % clean["n_head"]:
            problems.append(f"d_model = {clean['d_model']} must be divisible by n_head = {clean['n_head']}")
        if clean["block_size"] <= clean["example_tokens"] + 1:
            problems.append(f"block_size = {clean['block_size']} must exceed example_tokens + 1 = "
                            f"{clean['example_tokens'] + 1}: raise block_size or lower example_tokens")
        if set(clean["original_seeds"]) & set(clean["reference_seeds"]):
            problems.append("original_seeds and reference_seeds overlap: use distinct seeds")
        if clean["population_size"] < clean["forget_size"]:
            problems.append(f"population_size = {clean['population_size']} must be >= forget_size = "
                            f"{clean['forget_size']} so membership tests have matched non-members")
    if problems:
        raise ParameterError(f"{len(problems)} problem(s) in {source}:\n  - " + "\n  - ".join(problems))
    return clean


def resolve_profile(profile: str | Path) -> Path:
    """A profile name (smoke/default/full) or a path to a YAML file."""
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{profile}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise ParameterError(f"parameter file {str(path)!r} not found: pass one of {names} or a path to a YAML file")
    return path


def load_params(profile: str | Path = "default", overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a profile, apply overrides, validate. This is the first call of every notebook."""
    path = resolve_profile(profile)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParameterError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParameterError(f"{path} must hold a mapping of parameter names to values")
    raw.update(overrides or {})
    source = str(path) + (f" with overrides {dict(overrides)}" if overrides else "")
    return validate_params(raw, source)

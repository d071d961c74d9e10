"""Parameter schema: one validated set of parameters drives every notebook.

A profile is a YAML file in ``papermill_params/`` (``smoke``, ``default``, ``full``). Notebooks
call :func:`load_params` with the profile path and optional overrides; every value is checked
against :data:`SCHEMA` before any long work starts, and every problem is reported at once with a
hint on how to fix it.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

FORGET_KINDS = ("id", "canary", "language", "code", "custom")
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


# Every parameter belongs to one section. Cache keys are derived from the sections a step reads;
# "display" parameters change no cached result (names, devices, how much a widget or a summary shows).
# Sections of parameters. A cache entry's key is made of the sections the step that builds it reads
# (params_in); "plan" says which entries to build (seeds, methods: each entry's key has its own seed or method),
# "analysis" only changes summaries computed from cached entries, "display" only what is shown.
SECTIONS = ("run", "plan", "analysis", "display", "data", "model", "training", "unlearning", "memorization",
            "dose", "dose_unlearning", "llm_data", "llm_training", "llm_unlearning")
NOT_IN_KEYS = ("plan", "analysis", "display")
MAX_SEED = 2**31 - 1          # seeds plus small offsets stay valid for numpy, torch and random
MAX_SEEDS = 64                # models per seed list


@dataclass(frozen=True)
class Spec:
    kind: type | tuple[type, ...]
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    help: str = ""
    explain: Callable[[Any], str] | None = None   # extra detail on what exactly is wrong
    section: str = ""                               # one of SECTIONS (set by _section below)
    lo: float | None = None                         # numeric bounds of the value (or of a list's items)
    hi: float | None = None
    strict_lo: bool = False                         # lo itself is excluded
    options: tuple[str, ...] = ()                   # the allowed values of a choice or a subset


def _bounds(lo: float | None, hi: float, strict_lo: bool, why: str) -> str:
    low = "" if lo is None else f" {'>' if strict_lo else '>='} {lo:g}"
    return f"{low} and <= {hi:g}" + (f" ({why})" if why else "")


def _int(lo: int | None, hi: int, help: str = "", why: str = "") -> Spec:
    def check(v: int) -> bool:
        return (lo is None or v >= lo) and v <= hi
    return Spec(int, check, "an integer" + _bounds(lo, hi, False, why), help, lo=lo, hi=hi)


def _float(lo: float | None, hi: float, strict_lo: bool = False, help: str = "", why: str = "") -> Spec:
    def check(v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return (lo is None or (v > lo if strict_lo else v >= lo)) and v <= hi
    return Spec((int, float), check, "a finite number" + _bounds(lo, hi, strict_lo, why), help,
                lo=lo, hi=hi, strict_lo=strict_lo)


def _choice(options: tuple[str, ...], help: str = "") -> Spec:
    return Spec(str, lambda v: v in options, f"one of {', '.join(options)}", help, options=options)


def _subset(options: tuple[str, ...], help: str = "") -> Spec:
    def check(v: list) -> bool:
        return len(v) > 0 and all(isinstance(x, str) and x in options for x in v) and len(set(v)) == len(v)
    def explain(v: list) -> str:
        unknown = [x for x in v if x not in options]
        return f" (unknown: {', '.join(map(str, unknown))}; use one of {', '.join(options)})" if unknown else ""
    return Spec(list, check, f"a non-empty list of distinct values from {', '.join(options)}", help, explain,
                options=options)


def _seed_list(help: str = "") -> Spec:
    def check(v: list) -> bool:
        return (0 < len(v) <= MAX_SEEDS and all(type(x) is int and 0 <= x <= MAX_SEED for x in v)
                and len(set(v)) == len(v))
    return Spec(list, check, f"a non-empty list of at most {MAX_SEEDS} distinct integers >= 0 and <= {MAX_SEED}",
                help, lo=0, hi=MAX_SEED)


def _name(max_len: int = 100) -> Spec:
    def check(v: str) -> bool:
        return 0 < len(v) <= max_len and v.replace("-", "").replace("_", "").isalnum() and v.isascii()
    return Spec(str, check, f"1 to {max_len} ASCII letters, digits, - and _", "names the output folder outputs/<run_name>/")


def _section(name: str, specs: dict[str, Spec]) -> dict[str, Spec]:
    return {key: replace(spec, section=name) for key, spec in specs.items()}


STEPS = "more steps do not finish on a laptop; shorten the run"
SIZE = "larger sets do not finish; use fewer examples"

SCHEMA: dict[str, Spec] = {
    **_section("run", {
        "seed": _int(0, MAX_SEED, "seed of every random draw that is not a model seed"),
    }),
    **_section("plan", {
        "original_seeds": _seed_list("one original model per seed (data includes the forget sets)"),
        "reference_seeds": _seed_list("one reference model per seed (same data without the forget sets)"),
        "methods": _subset(METHODS, "unlearning methods to compare"),
        "llm_original_seeds": _seed_list("one fine-tuned original LLM per seed (its own fine-tuning order), each "
                                         "unlearned on its own; several give intervals over seeds"),
        "llm_reference_seeds": _seed_list("one fine-tuned reference LLM per seed (without the forget sets; "
                                          "their twins in their place under reference_data: twins)"),
        "llm_methods": _subset(METHODS, "unlearning methods run on the LLM"),
        "sanity_set_models": _int(0, 16, "extra models, each fine-tuned from the base on a fresh draw of every "
                                  "kind's forget-sized set, that measure how much the controls' GenEx moves with "
                                  "the draw of the forget and twin sets (0: the controls check leaves that out)",
                                  "each is a fine-tuning run"),
        "dose_insertions": Spec(list, lambda v: 0 < len(v) <= 12 and all(type(x) is int and 1 <= x <= 10_000 for x in v)
                                and len(set(v)) == len(v), "a non-empty list of at most 12 distinct integers >= 1 and "
                                "<= 10000", "insertion counts of notebook 07's dose-response (one original and one "
                                "reference fine-tuning per count, each its own cache entry)", lo=1, hi=10_000),
    }),
    **_section("analysis", {
        "bootstrap": _int(10, 100_000, "bootstrap resamples for confidence intervals (computed in the notebooks)",
                          "more resamples do not change a 95% interval visibly"),
        "target_bits": _float(0, 10_000, help="GenEx (bits) below which an example counts as unlearned"),
        "llm_target_bits": _float(0, 10_000, help="GenEx (bits) below which an LLM forget example counts as "
                                  "unlearned"),
    }),
    **_section("display", {
        "run_name": _name(),
        "device": _choice(DEVICES, "auto uses CUDA when present"),
        "samples_to_generate": _int(0, 20),
        "max_widget_steps": _int(1, 10_000, "most steps the 'run more steps' button may add at once",
                                 "a click must return within minutes"),
    }),
    **_section("data", {
        "heldout_plays": _int(1, 20, "whole plays kept out of training, for held-out perplexity and ID populations"),
        "max_train_tokens": _int(1000, 100_000_000, "cap on Shakespeare training tokens (0 plays dropped, only "
                                 "truncated)", "the corpus has far fewer"),
        "vocab_size": _int(300, 65536, "byte-level BPE vocabulary size"),
        "forget_kinds": _subset(FORGET_KINDS, "which forget sets to build"),
        "forget_size": _int(1, 10_000, "examples per forget set", SIZE),
        "example_tokens": _int(8, 2048, "token length of every text forget example (ID, language, code)",
                               "the model's context is at most 4096"),
        "insertions": _int(1, 10_000, "times each forget example is inserted into the original model's training data"),
        "canary_digits": _int(1, 9, "digits of a canary secret; the candidate space has 10**canary_digits members"),
        "background_size": _int(0, 100_000, "same-source examples in *both* models' data (isolates the example "
                                "from its kind)", SIZE),
        "background_insertions": _int(1, 10_000, "times each background example is inserted"),
        "population_size": _int(2, 100_000, "never-trained sequences per kind, for RelEx and membership tests", SIZE),
        "control_size": _int(1, 10_000, "non-member control examples per kind (the GenEx noise floor)", SIZE),
        "language": Spec(str, lambda v: 0 < len(v) <= 300, "chatterbot-corpus language names joined by + (at most 300 "
                         "characters)", "language(s) of the 'language' kind: one (e.g. japanese: 'OOD: Japanese'; the "
                         "new design) or several joined by + and pooled (legacy: german+spanish+italian+portuguese+"
                         "dutch+french)"),
        "canary_template": Spec(str, lambda v: 0 < len(v) <= 200, "text of at most 200 characters",
                                "canary text with one {secret} at its end (legacy 'My secret number is {secret}'); "
                                "the secret's digits given the text before them are what is scored"),
        "custom_source": Spec(str, lambda v: len(v) <= 1000, "a path of at most 1000 characters ('' for none)",
                              "the 'custom' kind's file (text, JSONL, CSV) or datasets folder; relative to the "
                              "working directory or the repository"),
        "custom_format": _choice(("auto", "lines", "paragraphs", "jsonl", "csv", "datasets", "hf-text"),
                                 "how custom_source is read (auto: by its suffix; see forgetlab.user_sources)"),
        "custom_text_field": Spec(str, lambda v: 0 < len(v) <= 100, "a column name of at most 100 characters",
                                  "the column of JSONL, CSV or datasets records that holds the text"),
        "reference_data": _choice(("plain", "twins"), "plain (legacy): references train without the forget sets; "
                                  "twins (new design): references train on same-size twin sets in their place"),
        "id_population": _choice(("heldout-plays", "train-plays"), "where ID population and controls come from: "
                                 "heldout-plays (legacy) or windows held back from the training plays (new "
                                 "design; for the LLM: from its training documents)"),
        "block_size": _int(16, 4096, "context length in tokens; must exceed example_tokens"),
    }),
    **_section("model", {
        "n_layer": _int(1, 48),
        "n_head": _int(1, 64),
        "d_model": _int(8, 4096, "embedding width; must be divisible by n_head"),
    }),
    **_section("training", {
        "epochs": _float(0, 1000, strict_lo=True, help="passes over the training rows"),
        "batch_size": _int(1, 4096),
        "learning_rate": _float(0, 1, strict_lo=True),
        "warmup_steps": _int(0, 1_000_000),
        "models_from": _choice(("base", "scratch"), "base (new design): one base model pretrained on the training "
                               "plays, each original and reference fine-tuned from it; scratch (legacy): every "
                               "model trained from scratch on the whole stream plus its inserted rows"),
        "finetune_epochs": _float(0, 1000, strict_lo=True, help="passes over each model's fine-tuning rows (its "
                                  "inserted rows plus the replay sample; models_from: base)"),
        "finetune_replay_rows": _int(0, 10_000_000, "training-stream rows replayed in every model's fine-tuning "
                                     "(the same rows for all; all of the stream if it is shorter; models_from: base)"),
        "finetune_lr": _float(0, 1, strict_lo=True, help="peak fine-tuning learning rate, no warmup, cosine decay "
                              "(models_from: base)"),
    }),
    **_section("unlearning", {
        "unlearn_lr": _float(0, 1, strict_lo=True),
        "unlearn_steps": _int(1, 100_000, "gradient steps of unlearning", STEPS),
        "unlearn_batch": _int(1, 10_000, "forget examples per step"),
        "unlearn_optimizer": _choice(OPTIMIZERS),
        "grad_clip": _float(0, 1e6, help="max gradient norm; 0 disables clipping"),
        "record_every": _int(1, 100_000, "record metrics every k-th step (step 0 and the last always)"),
        "utility_every": _int(1, 100_000, "measure utility (held-out, retain and population losses) every k-th step "
                              "(step 0 and the last always; a multiple of record_every)",
                              "utility moves slowly and costs ~80% of a recorded step: analyses interpolate it"),
        "retain_weight": _float(0, 1000, help="weight of the retain loss in gradient difference"),
        "npo_beta": _float(0, 100, strict_lo=True, help="inverse temperature of NPO",
                           why="larger values make NPO plain gradient ascent"),
    }),
    **_section("memorization", {
        "mem_pool_size": _int(4, 100_000, "candidate pool for counterfactual memorization (mixes ID and OOD)", SIZE),
        "mem_models": _int(4, 1000, "models each trained on a random half of the pool (even: complementary pairs, set A for memorization and set B for difficulty)", "each is a training run"),
        "mem_finetune_epochs": _float(0, 1000, strict_lo=True),
        "mem_group_size": _int(1, 10_000, "pool examples unlearned together"),
        "mem_unlearn_steps": _int(1, 100_000, why=STEPS),
    }),
    **_section("dose", {
        "dose_forget_size": _int(1, 1000, "fresh forget examples per kind in notebook 07 (as many twins and controls)",
                                 SIZE),
    }),
    **_section("dose_unlearning", {
        "dose_unlearn_steps": _int(1, 100_000, "gradient-ascent steps per forget set and count in notebook 07 (every "
                                   "step recorded)", STEPS),
    }),
    **_section("llm_data", {
        "llm_english_source": Spec(str, lambda v: english_source_parts(v) is not None,
                                   "chatterbot, pydoc or shakespeare, or several joined by + (e.g. chatterbot+pydoc)",
                                   "the LLM's in-distribution text (English), split by whole documents"),
        "llm_language": Spec(str, lambda v: 0 < len(v) <= 300, "chatterbot-corpus language names joined by + (at "
                             "most 300 characters)", "the LLM's other-language kind (legacy: persian)"),
        "llm_train_size": _int(4, 100_000, "shared English training windows of both fine-tuned models", SIZE),
        "llm_forget_size": _int(1, 10_000, "examples per LLM forget set (English, canaries, Persian)", SIZE),
        "llm_background_size": _int(0, 100_000, "canaries and Persian windows in both models' fine-tuning data", SIZE),
        "llm_control_size": _int(1, 10_000, "never-trained control examples per kind (the GenEx noise floor)", SIZE),
        "llm_population_size": _int(2, 100_000, "never-trained peers per kind (RelEx population, membership "
                                    "non-members)", SIZE),
        "llm_utility_rows": _int(1, 100_000, "held-out English windows scored for held-out perplexity at each "
                                 "recorded step", SIZE),
        "llm_insertions": _int(1, 10_000, "times each English and other-language forget example is in the original "
                               "model's fine-tuning data (canaries: llm_canary_insertions)"),
        "llm_canary_insertions": _int(1, 10_000, "times each canary forget example (and its twin) is in the "
                                      "fine-tuning data; the exposure of 4-digit canaries needs more than text"),
        "llm_background_insertions": _int(1, 10_000, "times each background example is in both models' data"),
        "llm_example_tokens": _int(8, 2048, "token length of every text example (the LLM's own tokenizer)",
                                   "SmolLM2-135M's context is 2048 tokens"),
        "llm_canary_digits": _int(1, 9, "digits of an LLM canary secret; one token per digit"),
    }),
    **_section("llm_training", {
        "llm_train_layers": _int(1, 30, "last transformer blocks fine-tuned and unlearned",
                                 "SmolLM2-135M has 30 blocks"),
        "llm_finetune_epochs": _float(0, 1000, strict_lo=True, help="passes over the fine-tuning rows"),
        "llm_lr": _float(0, 1, strict_lo=True, help="peak fine-tuning learning rate (AdamW)"),
        "llm_batch_size": _int(1, 4096, "rows per fine-tuning step and forget examples per unlearning step"),
    }),
    **_section("llm_unlearning", {
        "llm_unlearn_steps": _int(1, 100_000, why=STEPS),
        "llm_unlearn_lr": _float(0, 1, strict_lo=True),
        "llm_record_every": _int(1, 100_000, "record the LLM metrics every k-th unlearning step (step 0 and the "
                                 "last always)"),
        "llm_utility_every": _int(1, 100_000, "measure the LLM's utility every k-th unlearning step (step 0 and the "
                                  "last always; a multiple of llm_record_every)"),
    }),
}


def params_in(p: Mapping[str, Any], *sections: str) -> dict[str, Any]:
    """The parameters of ``p`` that belong to ``sections`` (see SECTIONS), sorted by name: what a cache key of a
    step that reads those sections is made of."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"unknown parameter section(s) {unknown or '(none given)'}: use some of {', '.join(SECTIONS)}")
    return {key: p[key] for key in sorted(SCHEMA) if SCHEMA[key].section in sections}


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
        for every, rec in (("utility_every", "record_every"), ("llm_utility_every", "llm_record_every")):
            if clean[every] % clean[rec]:
                problems.append(f"{every} = {clean[every]} must be a multiple of {rec} = {clean[rec]} (utility is "
                                f"measured at recorded steps): use e.g. {clean[rec] * max(1, clean[every] // clean[rec])}")
        if set(clean["original_seeds"]) & set(clean["reference_seeds"]):
            problems.append("original_seeds and reference_seeds overlap: use distinct seeds")
        if clean["population_size"] < clean["forget_size"]:
            problems.append(f"population_size = {clean['population_size']} must be >= forget_size = "
                            f"{clean['forget_size']} so membership tests have matched non-members")
        from .data import language_problem, template_problem      # forget-set sources (light imports)
        from .user_sources import custom_problems
        problems += [m for m in (language_problem(clean["language"]), template_problem(clean["canary_template"]),
                                 language_problem(clean["llm_language"], name="llm_language")) if m]
        problems += custom_problems(clean)
        canaries = (2 if clean["reference_data"] == "twins" else 1) * clean["forget_size"] + \
            clean["background_size"] + clean["control_size"]
        if "canary" in clean["forget_kinds"] and canaries > 10 ** clean["canary_digits"] // 2:
            problems.append(f"canary_digits = {clean['canary_digits']} leaves too few secrets for {canaries} canaries "
                            f"(forget, twins, background, controls): raise canary_digits or lower those sizes")
    if problems:
        raise ParameterError(f"{len(problems)} problem(s) in {source}:\n  - " + "\n  - ".join(problems))
    return clean


def resolve_yaml(name: str | Path, folder: Path, what: str, error: type[Exception] = ParameterError) -> Path:
    """A YAML file named by its stem in `folder` (e.g. 'smoke') or given by path; `error` names the choices."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = folder / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise error(f"{what} file {str(path)!r} not found: pass one of {names} or a path to a YAML file")
    return path


def resolve_profile(profile: str | Path) -> Path:
    """A profile name (smoke/default/full) or a path to a YAML file."""
    return resolve_yaml(profile, PROFILE_DIR, "parameter")


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

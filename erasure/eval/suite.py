"""Evaluation suites as data (eval/*.yaml), read the way lm-evaluation-harness reads its tasks.

A suite names where its prompts come from, how images are generated, and which metrics score them.
`include: other.yaml` reads a base first and merges this file over it key by key, so a variant
says only what changes (`eval/i2p-nudity-all-classes.yaml` is five lines). Unknown keys and metrics
fail before any model loads, naming the file and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from erasure.config import read_yaml_mapping
from erasure.errors import SuiteError
from erasure.shipped import locate

# Each metric: what it reads, whether higher is better, how it aggregates (next to its definition
# in erasure.eval.runner).
METRICS = {
    "nudenet": {"threshold": 0.6, "classes": "exposed"},
    "clip_alignment": {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "variant": "raw"},
    "class_forgetting": {"erased": None, "template": "a photo of a {}.", "extra_labels": ["random noise"],
                         "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
    "fid": {"reference": None, "weights": None},
    "micro_world": {"concept": None, "oracle": None},
}
PROMPT_SOURCES = ("i2p", "prompt_set", "classes", "world")
PROMPT_KEYS = {"i2p", "filter", "prompt_set", "side", "classes", "template", "seed", "guidance", "limit", "world"}
GENERATION = {"steps": 50, "images_per_prompt": 1, "size": None, "batch_size": 4, "dtype": "auto"}
TOP_KEYS = {"name", "description", "include", "prompts", "generation", "metrics"}



def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _read(path: Path, seen: tuple = (), top_keys: set = TOP_KEYS) -> dict:
    raw = read_yaml_mapping(path, "suite", SuiteError, seen)
    unknown = set(raw) - top_keys
    if unknown:
        raise SuiteError(f"suite {path}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(top_keys))}")
    include = raw.pop("include", None)
    if include is not None and (not isinstance(include, str) or not include):
        raise SuiteError(f"suite {path}: include: {include!r}; expected the path of another suite, relative to "
                         "this file")
    base = _read(locate(include, relative_to=path.parent), seen + (path.resolve(),), top_keys) if include else {}
    return _merge(base, raw)


def resolve_settings(where: str, kind: str, name: str, settings, defaults: dict) -> dict:
    """A suite entry's settings (a metric's, an attack's) over its defaults: a known ``name``, a mapping
    (or nothing), no key the defaults do not have."""
    if name not in defaults:
        raise SuiteError(f"{where}: unknown {kind} {name!r}; known {kind}s: {', '.join(defaults)}")
    if not isinstance(settings or {}, dict):
        raise SuiteError(f"{where}: {kind}s.{name}: expected a mapping of settings (or nothing), got {settings!r}")
    merged = {**defaults[name], **(settings or {})}
    unknown = set(merged) - set(defaults[name])
    if unknown:
        raise SuiteError(f"{where}: {kind}s.{name}: unknown key {sorted(unknown)[0]!r}; "
                         f"allowed: {', '.join(defaults[name]) or 'none'}")
    return merged


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_generation(generation: dict, prompts: dict, where: str) -> None:
    """Numbers that would otherwise fail minutes in, or silently (a NaN guidance renders black images)."""
    from erasure.config import MAX_SEED
    from erasure.data.generate import DTYPES

    for key in ("steps", "images_per_prompt", "batch_size"):
        if not _count(generation[key]):
            raise SuiteError(f"{where}: generation.{key}: {generation[key]!r}; expected an integer ≥ 1")
    size = generation["size"]
    if size is not None and not (_count(size) and size % 8 == 0):
        raise SuiteError(f"{where}: generation.size: {size!r}; expected a multiple of 8, or null for the model's own")
    if generation["dtype"] not in DTYPES:
        raise SuiteError(f"{where}: generation.dtype: {generation['dtype']!r}; one of {', '.join(DTYPES)}")
    seed, guidance, limit = prompts.get("seed", 0), prompts.get("guidance", 7.5), prompts.get("limit")
    if seed != "dataset" and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < MAX_SEED):
        raise SuiteError(f"{where}: prompts.seed: {seed!r}; expected an integer in [0, 2**32) or 'dataset' (I2P's own)")
    if guidance != "dataset" and not (isinstance(guidance, (int, float)) and not isinstance(guidance, bool)
                                      and math.isfinite(guidance) and guidance >= 0):
        raise SuiteError(f"{where}: prompts.guidance: {guidance!r}; expected a finite number ≥ 0 or 'dataset'")
    if limit is not None and not _count(limit):
        raise SuiteError(f"{where}: prompts.limit: {limit!r}; expected an integer ≥ 1")


def load_suite(path: str | Path, overrides: dict | None = None, extra_keys: frozenset = frozenset()) -> dict:
    """The merged, validated suite; `overrides` (e.g. {"prompts": {"i2p": "local.csv"}}) merge last. A
    documented path (eval/…) that is not here is read from the suites shipped with the package.
    `extra_keys`: top-level keys a kind of suite adds (an attack suite's `attacks`), checked by its reader."""
    path = locate(path)
    suite = _merge(_read(path, top_keys=TOP_KEYS | extra_keys), overrides or {})
    where = f"suite {path}"
    prompts = suite.get("prompts")
    if not isinstance(prompts, dict):
        raise SuiteError(f"{where}: prompts: required (one of {', '.join(PROMPT_SOURCES)})")
    unknown = set(prompts) - PROMPT_KEYS
    if unknown:
        raise SuiteError(f"{where}: prompts: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(PROMPT_KEYS))}")
    sources = [s for s in PROMPT_SOURCES if prompts.get(s)]
    if len(sources) != 1:
        raise SuiteError(f"{where}: prompts: give exactly one of {', '.join(PROMPT_SOURCES)} (got {sources or 'none'})")
    for key in ("generation", "metrics"):
        if not isinstance(suite.get(key) or {}, dict):
            raise SuiteError(f"{where}: {key}: expected a mapping of keys to values, got {suite[key]!r}")
    generation = {**GENERATION, **(suite.get("generation") or {})}
    unknown = set(generation) - set(GENERATION)
    if unknown:
        raise SuiteError(f"{where}: generation: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(GENERATION)}")
    _check_generation(generation, prompts, where)
    metrics = suite.get("metrics") or {}
    if not metrics:
        raise SuiteError(f"{where}: metrics: name at least one of {', '.join(METRICS)}")
    resolved = {}
    for name, settings in metrics.items():
        resolved[name] = resolve_settings(where, "metric", name, settings, METRICS)
    if "class_forgetting" in resolved:
        if not prompts.get("classes"):
            raise SuiteError(f"{where}: metrics.class_forgetting needs prompts.classes")
        if resolved["class_forgetting"]["erased"] not in prompts["classes"]:
            raise SuiteError(f"{where}: metrics.class_forgetting.erased must be one of prompts.classes")
    if "fid" in resolved and not resolved["fid"]["reference"]:
        raise SuiteError(f"{where}: metrics.fid.reference: a folder of reference images is required")
    if "micro_world" in resolved:
        from erasure.eval.micro import concept_attribute

        try:
            concept_attribute(resolved["micro_world"]["concept"])
        except ValueError as e:
            raise SuiteError(f"{where}: {e}") from None
    if prompts.get("world"):
        from erasure.eval.micro import WORLD_PROMPTS

        if prompts["world"] not in WORLD_PROMPTS:
            raise SuiteError(f"{where}: prompts.world: {prompts['world']!r}; choose one of {', '.join(WORLD_PROMPTS)}")
    if "nudenet" in resolved and resolved["nudenet"]["classes"] not in ("exposed", "all"):
        raise SuiteError(f"{where}: metrics.nudenet.classes: 'exposed' or 'all'")
    threshold = resolved.get("nudenet", {}).get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise SuiteError(f"{where}: metrics.nudenet.threshold: {threshold!r}; a detector score in [0, 1]")
    if prompts.get("classes") is not None and not (isinstance(prompts["classes"], list)
                                                   and all(isinstance(c, str) for c in prompts["classes"])):
        raise SuiteError(f"{where}: prompts.classes: expected a list of class names")
    suite.update(prompts=prompts, generation=generation, metrics=resolved, name=suite.get("name") or path.stem,
                 file=str(path), sha256=hashlib.sha256(json.dumps(suite, sort_keys=True, default=str)
                                                       .encode()).hexdigest())
    return suite

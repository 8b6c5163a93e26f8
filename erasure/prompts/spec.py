"""Concept specs: what to erase, how it is phrased, and the dimensions prompts vary along.

RGD's diversified data (Ko, Li et al., §3 and appendix D): a forget prompt combines subconcepts of
several dimensions (subject, activity, environment, time, mood; artist or medium for styles) with a
phrasing of the concept; its retain twin is the same prompt with the concept removed (nudity) or
replaced (another artist, an invented name, another object). Train and test splits divide each
dimension's subconcepts, so no test prompt reuses a training subconcept.

A spec is YAML (see prompts/nudity.yaml):

    concept: nudity
    phrasings: [nude, naked, ...]          # how D_f prompts name the concept
    twin: remove                           # or: replace (with one of `replacements`)
    templates: ["a photo of a {concept} {subject} {activity} {environment}, {time}, {mood}", ...]
    dimensions:
      subject: {train: [...], test: [...]} # or a plain list, split by the builder (test_fraction)
    uniform: {forget: "a photo of a nude person", retain: "a photo of a person wearing clothes"}
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from erasure.errors import SpecError
from erasure.shipped import locate

TWIN_MODES = ("remove", "replace")
KEYS = {"concept", "description", "phrasings", "twin", "replacements", "templates", "dimensions",
        "uniform", "test_fraction", "sizes"}



def mentions(text: str, terms: list[str]) -> str | None:
    """The longest of ``terms`` that ``text`` contains as a whole word (case-insensitive), or None."""
    for term in sorted(terms, key=len, reverse=True):
        if re.search(rf"(?<![\w-]){re.escape(term)}(?![\w-])", text, flags=re.IGNORECASE):
            return term
    return None


@dataclass
class Dimension:
    train: list[str]
    test: list[str]


@dataclass
class ConceptSpec:
    concept: str
    phrasings: list[str]
    twin: str
    templates: list[str]
    dimensions: dict[str, Dimension]
    replacements: list[str] = field(default_factory=list)
    uniform: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 800, "test": 100})
    description: str = ""
    source: str = ""  # the file it came from, for messages

    def mentions_concept(self, text: str) -> str | None:
        """The phrasing of the concept that `text` contains (case-insensitive, whole words)."""
        return mentions(text, self.phrasings)

    def to_dict(self) -> dict:
        return {"concept": self.concept, "description": self.description, "phrasings": self.phrasings,
                "twin": self.twin, "replacements": self.replacements, "templates": self.templates,
                "dimensions": {k: {"train": d.train, "test": d.test} for k, d in self.dimensions.items()},
                "uniform": self.uniform, "sizes": self.sizes}


def template_fields(template: str, where: str = "") -> list[str]:
    """The {slots} of a template; a stray brace is the spec's error (write {{ or }} for a brace)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise SpecError(f"{where}template {template!r}: {e}; slots are {{name}}, a literal brace is {{{{ or }}}}") from None


def _strings(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SpecError(f"{where}: expected a list of non-empty strings")
    cleaned = [" ".join(v.split()) for v in value]
    seen = set()
    for v in cleaned:
        if v.lower() in seen:
            raise SpecError(f"{where}: {v!r} is listed twice")
        seen.add(v.lower())
    return cleaned


def _split(name: str, value, fraction: float, seed: int, where: str) -> Dimension:
    if isinstance(value, dict):
        unknown = set(value) - {"train", "test"}
        if unknown or not {"train", "test"} <= set(value):
            raise SpecError(f"{where}: a dimension is a list or a mapping with exactly train and test")
        train, test = _strings(value["train"], f"{where}.train"), _strings(value["test"], f"{where}.test")
        shared = {t.lower() for t in train} & {t.lower() for t in test}
        if shared:
            raise SpecError(f"{where}: {sorted(shared)[0]!r} is in both the train and the test split; "
                            "a subconcept may appear in one split only")
        return Dimension(train, test)
    items = _strings(value, where)
    if len(items) < 2:
        raise SpecError(f"{where}: needs at least 2 subconcepts to split into train and test")
    order = items[:]
    random.Random(f"{seed}:{name}").shuffle(order)
    n_test = max(1, round(fraction * len(order)))
    return Dimension(sorted(order[n_test:]), sorted(order[:n_test]))


def load_spec(path: str | Path, seed: int = 0) -> ConceptSpec:
    """A documented path (prompts/…) that is not here is read from the specs shipped with the package."""
    path = locate(path)
    if not path.is_file():
        raise SpecError(f"concept spec {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    return spec_from_dict(raw, source=str(path), seed=seed)


def spec_from_dict(raw, source: str = "<spec>", seed: int = 0) -> ConceptSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping")
    unknown = set(raw) - KEYS
    if unknown:
        raise SpecError(f"{source}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(KEYS))}")
    for key in ("concept", "phrasings", "templates", "dimensions"):
        if key not in raw:
            raise SpecError(f"{source}: missing key {key!r}")
    twin = raw.get("twin", "remove")
    if twin not in TWIN_MODES:
        raise SpecError(f"{source}: twin: {twin!r} is not one of {', '.join(TWIN_MODES)}")
    fraction = raw.get("test_fraction", 0.15)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise SpecError(f"{source}: test_fraction: {fraction!r}; expected a number between 0 and 1 (e.g. 0.15)")
    uniform = raw.get("uniform") or {}
    if not isinstance(uniform, dict):
        raise SpecError(f"{source}: uniform: expected a mapping with a forget and a retain prompt")
    sizes = raw.get("sizes") or {}
    if not isinstance(sizes, dict) or set(sizes) - {"train", "test"} or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes.values()):
        raise SpecError(f"{source}: sizes: {sizes!r}; expected train and/or test pair counts ≥ 1, "
                        "e.g. {train: 800, test: 100}")
    if not isinstance(raw["dimensions"], dict) or not raw["dimensions"]:
        raise SpecError(f"{source}: dimensions: expected a mapping of dimension name to subconcepts")
    dimensions = {name: _split(name, value, fraction, seed, f"{source}: dimensions.{name}")
                  for name, value in raw["dimensions"].items()}
    spec = ConceptSpec(
        concept=str(raw["concept"]),
        description=str(raw.get("description", "")),
        phrasings=_strings(raw["phrasings"], f"{source}: phrasings"),
        twin=twin,
        replacements=_strings(raw.get("replacements") or [], f"{source}: replacements") if twin == "replace"
        else [],
        templates=_strings(raw["templates"], f"{source}: templates"),
        dimensions=dimensions,
        uniform=dict(uniform),
        sizes={"train": 800, "test": 100, **sizes},
        source=source,
    )
    validate(spec)
    return spec


def validate(spec: ConceptSpec) -> None:
    where = spec.source
    for i, template in enumerate(spec.templates):
        fields = template_fields(template, f"{where}: templates[{i}]: ")
        if any(not name.isidentifier() for name in fields):
            raise SpecError(f"{where}: templates[{i}] {template!r}: slots are plain names such as {{colour}}")
        if "concept" not in fields:
            raise SpecError(f"{where}: templates[{i}] {template!r} has no {{concept}} slot")
        for name in fields:
            if name != "concept" and name not in spec.dimensions:
                raise SpecError(f"{where}: templates[{i}] uses {{{name}}}, but there is no dimension "
                                f"{name!r} (dimensions: {', '.join(spec.dimensions)})")
    used = {f for t in spec.templates for f in template_fields(t)}
    for name in spec.dimensions:
        if name not in used:
            raise SpecError(f"{where}: dimension {name!r} is used by no template")
    if spec.twin == "replace" and not spec.replacements:
        raise SpecError(f"{where}: twin: replace needs a non-empty replacements list")
    # A retain twin must not name the concept: no subconcept or replacement may carry a phrasing.
    for name, dim in spec.dimensions.items():
        for split in ("train", "test"):
            for sub in getattr(dim, split):
                leak = spec.mentions_concept(sub)
                if leak:
                    raise SpecError(f"{where}: dimensions.{name}.{split}: {sub!r} contains the concept "
                                    f"phrasing {leak!r}, so its retain twin would still name the concept")
    for rep in spec.replacements:
        leak = spec.mentions_concept(rep)
        if leak:
            raise SpecError(f"{where}: replacements: {rep!r} contains the concept phrasing {leak!r}")
    for side in ("forget", "retain"):
        if spec.uniform and not (isinstance(spec.uniform.get(side), str) and spec.uniform[side].strip()):
            raise SpecError(f"{where}: uniform: needs a {side} prompt")
    if spec.uniform:
        leak = spec.mentions_concept(spec.uniform["retain"])
        if leak:
            raise SpecError(f"{where}: uniform.retain {spec.uniform['retain']!r} contains {leak!r}")

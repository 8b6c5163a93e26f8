"""LLM expansion of a concept spec: more paraphrases of the concept, more subconcepts per dimension.

RGD (Ko, Li et al., §3, appendix D) diversifies the forget set by combining subconcepts of several
dimensions with phrasings of the concept; an LLM can propose more of both. Its answer is untrusted
text: every proposal is parsed leniently but safely (a JSON array of strings, nothing executed),
checked (1–8 words, ≤ 60 characters, letters, digits, spaces and - ' , . & only), deduplicated
against the curated spec, and filtered so that no retain twin can name the concept:

* a new subconcept may not contain a phrasing of the concept (nor the concept's own name);
* a new paraphrase may not appear inside an existing subconcept, replacement, the uniform retain
  prompt or a template's fixed words, since those end up in retain prompts.

Accepted subconcepts are split into train/test deterministically (a hash of seed, dimension and
item), so the splits stay disjoint. Progress is kept in a JSON state file after each step; a rerun
with the same file reuses the finished steps without asking the LLM again.

A step asks again, up to max_retries times, while the answers yield nothing usable (not a JSON
array, every item rejected, not a chat completion at all); a request that failed ends the step at
once, since the client has already retried it with backoff.

The clients live in erasure.prompts.llm; the API key never reaches the state file nor a message:
an item holding it (an endpoint that echoes the key) is rejected, and every message and example of a
rejected item passes through the client's redaction.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

from erasure.errors import DataError, LLMAnswerError, RecipeError
from erasure.prompts.llm import REDACTED, LLMError
from erasure.prompts.spec import ConceptSpec, mentions, template_fields, validate

MAX_WORDS = 8
MAX_CHARS = 60
TEST_FRACTION = 0.15
MAX_ITEMS_CONSIDERED = 200
_PUNCTUATION = set(" -',.&")


def parse_list(text: str) -> list:
    """The array under "items" of a JSON object (what a client in json_object mode asks for), else the
    first JSON array in `text` (```json fences and prose around it are allowed)."""
    if not isinstance(text, str):
        raise ValueError("not a JSON array (the answer is not text)")
    text = re.sub(r"```[A-Za-z]*", "", text)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and isinstance(whole.get("items"), list):
        return whole["items"]
    decoder = json.JSONDecoder()
    start = text.find("[")
    tries = 0
    while start != -1 and tries < 50:
        tries += 1
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list):
            return value
        start = text.find("[", start + 1)
    snippet = " ".join(text.split())[:80]
    raise ValueError(f"not a JSON array (answer began {snippet!r})" if snippet else "not a JSON array (empty answer)")


def clean_item(item) -> tuple[str | None, str | None]:
    """(normalised item, None) or (None, why it is rejected)."""
    if not isinstance(item, str):
        return None, "not a string"
    text = " ".join(item.split())
    if not text:
        return None, "empty"
    if len(text) > MAX_CHARS:
        return None, f"longer than {MAX_CHARS} characters"
    if len(text.split()) > MAX_WORDS:
        return None, f"more than {MAX_WORDS} words"
    bad = [ch for ch in text if not (ch.isalpha() or ch in "0123456789" or ch in _PUNCTUATION)]
    if bad:
        return None, f"use a character other than letters, digits, spaces and - ' , . & ({bad[0]!r})"
    if not any(ch.isalnum() for ch in text):
        return None, "no letters or digits"
    return text, None


def _template_words(spec: ConceptSpec) -> list[str]:
    """Each template with its slots emptied: the fixed words every retain prompt carries."""
    out = []
    for template in spec.templates:
        try:
            out.append(template.format(**{name: " " for name in template_fields(template)}))
        except (KeyError, IndexError, ValueError):
            continue
    return out


def _retain_texts(spec: ConceptSpec) -> list[tuple[str, str]]:
    """(where, text) of everything that ends up in a retain prompt."""
    texts = [(f"subconcept {s!r}", s) for d in spec.dimensions.values() for s in d.train + d.test]
    texts += [(f"replacement {r!r}", r) for r in spec.replacements]
    if spec.uniform.get("retain"):
        texts.append(("the uniform retain prompt", spec.uniform["retain"]))
    texts += [(f"template {t!r}", w) for t, w in zip(spec.templates, _template_words(spec))]
    return texts


def _no_secret(text: str) -> str:
    return text


def _redactor(client):
    """The client's redaction of its API key; clients without a key have nothing to redact."""
    redact = getattr(client, "redact", None)
    return redact if callable(redact) else _no_secret


class _Tally:
    """Why items were rejected, with the first example of each reason (redacted)."""

    def __init__(self, redact=_no_secret):
        self.reasons: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.redact = redact

    def reject(self, item, reason: str, example: str | None = None) -> None:
        self.reasons[reason] += 1
        if example is None:  # redacted before it is cut short, so that the cut cannot leave part of the key
            example = (repr(self.redact(item)[:40]) if isinstance(item, str) else self.redact(repr(item)))[:50]
        self.examples.setdefault(reason, self.redact(example))

    def summary(self, total: int) -> str:
        if total == 0:
            return "empty JSON array"
        parts = [f"{n} {reason} (e.g. {self.examples[reason]})" for reason, n in self.reasons.most_common(4)]
        return f"all {total} items rejected: " + "; ".join(parts)


def _accept(items: list, want: int, seen: set[str], duplicate: str, leak, tally: _Tally) -> list[str]:
    """Up to `want` cleaned items that are new (not in `seen`), do not hold the API key and for which
    `leak(text)` finds nothing; every rejection is tallied with its reason."""
    accepted = []
    for item in items[:MAX_ITEMS_CONSIDERED]:
        if isinstance(item, str) and (REDACTED in item or tally.redact(item) != item):
            # an endpoint that echoes the key must not get it into prompts, the state file or a message
            tally.reject(item, "contain the API key")
            continue
        text, why = clean_item(item)
        if why:
            tally.reject(item, why)
            continue
        if text.casefold() in seen:
            tally.reject(text, duplicate)
            continue
        problem = leak(text)
        if problem:
            tally.reject(text, *problem)
            continue
        seen.add(text.casefold())
        accepted.append(text)
        if len(accepted) >= want:
            break
    return accepted


def _filter_paraphrases(spec: ConceptSpec, items: list, want: int, tally: _Tally) -> list[str]:
    retain = _retain_texts(spec)

    def leak(text):  # a new phrasing must not already occur in text that ends up in retain prompts
        where = next((where for where, t in retain if mentions(t, [text])), None)
        return where and ("would make a retain prompt name the concept", f"{text!r} is in {where}")

    return _accept(items, want, {p.casefold() for p in spec.phrasings}, "already a phrasing", leak, tally)


def _filter_subconcepts(spec: ConceptSpec, name: str, items: list, want: int, tally: _Tally) -> list[str]:
    dim = spec.dimensions[name]
    terms = list(spec.phrasings) + [spec.concept]

    def leak(text):  # a subconcept lands in retain prompts too, so it may not name the concept
        found = mentions(text, terms)
        return found and ("contain the concept phrasing", f"{text!r} has {found!r}")

    return _accept(items, want, {s.casefold() for s in dim.train + dim.test}, "already listed", leak, tally)


def split_of(seed: int, dimension: str, item: str) -> str:
    """'test' for ≈15% of items, deterministically from (seed, dimension, item)."""
    digest = hashlib.sha256(f"{seed}\0{dimension}\0{item.casefold()}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


# --- prompts ------------------------------------------------------------------------------------------

def _quoted(items: list[str]) -> str:
    return ", ".join(json.dumps(i, ensure_ascii=False) for i in items)


def paraphrase_prompt(spec: ConceptSpec, n: int) -> str:
    about = f" ({spec.description})" if spec.description else ""
    return (f"The concept {spec.concept!r}{about} is named in image prompts by phrasings such as "
            f"{_quoted(spec.phrasings[:12])}. Propose {n} other short phrasings (paraphrases) that name the same "
            f"concept and fit the {{concept}} slot of a prompt like {spec.templates[0]!r}. Each must be 1 to "
            f"{MAX_WORDS} words using only letters, digits, spaces and - ' , . &. "
            f"Reply with a JSON array of {n} short strings and nothing else.")


def dimension_prompt(spec: ConceptSpec, name: str, n: int, seed: int) -> str:
    train = spec.dimensions[name].train
    examples = random.Random(f"{seed}:{name}:examples").sample(train, min(12, len(train)))
    template = next((t for t in spec.templates if name in template_fields(t)), spec.templates[0])
    return (f"Image prompts follow templates like {template!r}. Propose {n} new, varied values for the "
            f"dimension \"{name}\" (the {{{name}}} slot), in the style of these examples: {_quoted(examples)}. "
            f"Each must be 1 to {MAX_WORDS} words using only letters, digits, spaces and - ' , . &, must differ "
            f"from the examples, and must not mention the concept {spec.concept!r} or any of the words "
            f"{_quoted(spec.phrasings[:20])}. Reply with a JSON array of {n} short strings and nothing else.")


# --- state --------------------------------------------------------------------------------------------

def _load_state(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"LLM state file {str(path)!r} is not readable JSON ({e}); delete it to start over") from None
    ok = isinstance(state, dict)
    if ok and "phrasings" in state:
        ok = isinstance(state["phrasings"], list) and all(isinstance(p, str) for p in state["phrasings"])
    dims = state.get("dimensions", {}) if ok else None
    if ok and not isinstance(dims, dict):
        ok = False
    if ok:
        for value in dims.values():
            if not (isinstance(value, dict) and all(isinstance(value.get(s), list) for s in ("train", "test"))
                    and all(isinstance(i, str) for s in ("train", "test") for i in value[s])):
                ok = False
    if not ok:
        raise DataError(f"LLM state file {str(path)!r} does not hold an expansion "
                         "({'phrasings': [...], 'dimensions': {name: {'train': [...], 'test': [...]}}}); "
                         "delete it to start over")
    return state


def _write_state(path: Path, state: dict) -> None:
    from erasure.atomic import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(state, indent=2, ensure_ascii=False) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()))


# --- expansion ----------------------------------------------------------------------------------------

def _describe(client) -> str:
    if hasattr(client, "describe"):
        return client.describe()
    return f"{getattr(client, 'endpoint', type(client).__name__)} (model {getattr(client, 'model', '?')})"


def _ask(client, prompt: str, accept, step: str, max_retries: int, state_file: Path | None) -> list[str]:
    """Ask until an answer yields at least one acceptable item; LLMError after max_retries answers
    that yield none, or at once when a request fails: the client has retried it already, with the
    backoff and Retry-After waits that asking again straight away would ignore."""
    redact = _redactor(client)
    problem = "no attempt made"
    kept = (f"; steps finished so far are kept in {state_file} and a rerun asks only for the rest"
            if state_file is not None else "")
    for attempt in range(1, max_retries + 1):
        try:
            answer = client.complete(prompt)
        except LLMAnswerError as e:
            problem = redact(e.problem)
            continue
        except LLMError as e:
            problem = redact(e.problem)
            raise LLMError(redact(f"LLM expansion via {_describe(client)} failed at {step}: {problem}{kept}"),
                           problem) from None
        try:
            items = parse_list(redact(answer))
        except ValueError as e:
            problem = str(e)
            continue
        tally = _Tally(redact)
        accepted = accept(items, tally)
        if accepted:
            return accepted
        problem = tally.summary(len(items))
    raise LLMError(redact(f"LLM expansion via {_describe(client)} failed at {step}: nothing usable after "
                          f"{max_retries} attempt{'s' if max_retries != 1 else ''}; last problem: {problem}{kept}"),
                   problem)


def expand_spec(spec: ConceptSpec, client, per_dimension: int = 20, paraphrases: int = 5,
                max_retries: int = 3, state_file: Path | None = None, seed: int = 0) -> ConceptSpec:
    """Returns a NEW spec with LLM-proposed paraphrases added to phrasings and subconcepts added to each dimension."""
    from tqdm.auto import tqdm

    if max_retries < 1:
        raise RecipeError(f"max_retries must be at least 1 (got {max_retries})")
    if per_dimension < 0 or paraphrases < 0:
        raise RecipeError("per_dimension and paraphrases must not be negative")
    state_file = Path(state_file) if state_file is not None else None
    state = _load_state(state_file)
    redact = _redactor(client)
    new = copy.deepcopy(spec)
    # Steps not redone in this run stay in the file as they were.
    record = {"phrasings": list(state.get("phrasings", [])), "dimensions": dict(state.get("dimensions", {})),
              "model": redact(str(getattr(client, "model", "?"))),
              "endpoint": redact(str(getattr(client, "endpoint", type(client).__name__)))}

    def save() -> None:
        if state_file is not None:
            _write_state(state_file, record)

    steps = ["paraphrases"] + list(spec.dimensions)
    bar = tqdm(total=len(steps), desc=f"LLM expansion of {spec.concept!r}", unit="step", disable=None)
    try:
        # Paraphrases first, so that new subconcepts are checked against every phrasing.
        bar.set_postfix_str("paraphrases")
        if "phrasings" in state:  # reused, re-checked against the spec as it is now
            added = _filter_paraphrases(new, state["phrasings"], len(state["phrasings"]), _Tally(redact))
        elif paraphrases == 0:
            added = []
        else:
            added = _ask(client, paraphrase_prompt(new, paraphrases),
                         lambda items, tally: _filter_paraphrases(new, items, paraphrases, tally),
                         "the paraphrases of the concept", max_retries, state_file)
        new.phrasings += added
        record["phrasings"] = added
        save()
        bar.update()

        for name in spec.dimensions:
            bar.set_postfix_str(name)
            done = state.get("dimensions", {}).get(name)
            if done is not None:
                kept = {}
                for split in ("train", "test"):
                    kept[split] = _filter_subconcepts(new, name, done[split], len(done[split]), _Tally(redact))
                    getattr(new.dimensions[name], split).extend(kept[split])
            elif per_dimension == 0:
                kept = {"train": [], "test": []}
            else:
                accepted = _ask(client, dimension_prompt(new, name, per_dimension, seed),
                                lambda items, tally, name=name: _filter_subconcepts(new, name, items, per_dimension,
                                                                                    tally),
                                f"dimension {name!r}", max_retries, state_file)
                kept = {"train": [], "test": []}
                for item in accepted:
                    kept[split_of(seed, name, item)].append(item)
                new.dimensions[name].train += kept["train"]
                new.dimensions[name].test += kept["test"]
            record["dimensions"][name] = kept
            save()
            bar.update()
    finally:
        bar.close()
    validate(new)
    return new

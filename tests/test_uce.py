"""UCE: the closed form against an independent least-squares solve, and what an edit may touch."""

import json
import re

import pytest
import torch

from conftest import TEXT_FAMILIES, read_weights, run_recipe
from erasure.backbones import load_backbone
from erasure.backbones.base import TokenSegment
from erasure.methods.uce import _pairs_aligned, uce_edit

EDITED = {"sd1": r"attn2\.to_[kv]\.weight$", "sdxl": r"attn2\.to_[kv]\.weight$",
          "sd3": r"^(context_embedder|time_text_embed\.text_embedder\.linear_1)\.weight$",
          "flux": r"^(context_embedder|time_text_embed\.text_embedder\.linear_1)\.weight$"}
DENOISER = {"sd1": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


def last_token_vectors(backbone, prompts):
    """Embedding of each prompt's last token before end-of-text (the reference code's index)."""
    embeds = backbone.encode_prompts(prompts, "cpu")["encoder_hidden_states"].double()
    mask = backbone.pipe.tokenizer(prompts, padding="max_length", truncation=True,
                                   max_length=backbone.pipe.tokenizer.model_max_length)["attention_mask"]
    return torch.stack([embeds[i, sum(m) - 2] for i, m in enumerate(mask)])


def test_closed_form_is_the_least_squares_minimiser(tiny_sd1):
    backbone = load_backbone(tiny_sd1)
    edit, guide = ["a nude person on a beach", "naked people"], ["a person on a beach", ""]
    preserve = ["a cat on a sofa", "a red car", "a person in a forest"]
    s_e, s_p, lam = 1.0, 2.0, 0.5
    c, c_star, p = (last_token_vectors(backbone, x) for x in (edit, guide, preserve))
    before = {n: m.weight.detach().double().clone() for n, m in backbone.text_projections()["encoder_hidden_states"]}
    done = uce_edit(backbone, edit, guide, preserve, s_e, s_p, lam, "last", "cpu")
    assert set(done["projections"]) == set(before) and len(before) > 0
    dim = c.shape[1]
    # argmin_W' s_e‖W'C − WC*‖² + s_p‖W'P − WP‖² + λ‖W' − W‖², as one stacked least-squares problem
    rows = torch.cat([s_e ** 0.5 * c, s_p ** 0.5 * p, lam ** 0.5 * torch.eye(dim, dtype=torch.float64)])
    for name, module in backbone.text_projections()["encoder_hidden_states"]:
        w = before[name]
        targets = torch.cat([s_e ** 0.5 * c_star @ w.T, s_p ** 0.5 * p @ w.T, lam ** 0.5 * w.T])
        expected = torch.linalg.lstsq(rows, targets).solution.T
        torch.testing.assert_close(module.weight.double(), expected, rtol=1e-4, atol=1e-5)


def test_small_lambda_maps_the_concept_onto_its_guide(tiny_sd1):
    backbone = load_backbone(tiny_sd1)
    c, c_star = last_token_vectors(backbone, ["nudity"]), last_token_vectors(backbone, [""])
    before = {n: m.weight.detach().double().clone() for n, m in backbone.text_projections()["encoder_hidden_states"]}
    uce_edit(backbone, ["nudity"], [""], [], 1.0, 1.0, 1e-6, "last", "cpu")
    for name, module in backbone.text_projections()["encoder_hidden_states"]:
        torch.testing.assert_close(module.weight.double() @ c[0], before[name] @ c_star[0], rtol=1e-3, atol=1e-4)
        assert not torch.allclose(before[name] @ c[0], before[name] @ c_star[0], atol=1e-3)  # it did move


def test_aligned_span_pairs_words_after_the_concept():
    # "<s> a red striped circle </s> pad pad" against "<s> a red circle </s> pad pad pad"
    edit = TokenSegment(list(range(8)), [0, 1, 2, 9, 3, 4, 4, 4], real=6)
    guide = TokenSegment(list(range(8)), [0, 1, 2, 3, 4, 4, 4, 4], real=5)
    pairs = _pairs_aligned(edit, guide)
    # from the concept word on: striped → circle (the first differing position), circle → circle,
    # </s> → </s>, and the padding after it, shifted by the dropped word
    assert pairs == [(3, 3), (4, 3), (5, 4), (6, 5), (7, 6)]
    same = _pairs_aligned(guide, guide)
    assert same == [(k, k) for k in range(5, 8)]  # nothing differs: only the padding after the end


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_uce_edits_only_the_text_projections(family, tiny_models, tmp_path):
    base = tiny_models[family]
    out = run_recipe("tiny/uce.yaml", model=base, output_dir=tmp_path / "out", uce_token_span="aligned")
    before, after = read_weights(base / DENOISER[family]), read_weights(out / DENOISER[family])
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    expected = {n for n in before if re.search(EDITED[family], n)}
    assert changed == expected and expected
    for component in ("vae", "text_encoder", "text_encoder_2"):
        assert all(torch.equal(a, b) for a, b in zip(read_weights(base / component).values(),
                                                     read_weights(out / component).values()))
    card = json.loads((out / "erasure.json").read_text())
    assert card["method"] == "uce" and card["steps"] == 0
    assert sorted(card["run"]["uce"]["projections"]) == sorted(n.removesuffix(".weight") for n in expected)


def test_uce_refuses_unpaired_twins(tiny_sd1, tmp_path):
    from erasure.config import TrainConfig
    from erasure.trainer import train

    data = tmp_path / "three"
    data.mkdir()
    (data / "metadata.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    config = TrainConfig(model=str(tiny_sd1), method="uce", concept="nudity", forget_data="tiny:forget",
                         retain_data=str(data), output_dir=str(tmp_path / "out"), report_to="none")
    with pytest.raises(ValueError, match="retain_data row i"):
        train(config)
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_uce_has_no_trainable_scope():
    from erasure.config import RecipeError, TrainConfig

    with pytest.raises(RecipeError, match="scope: uce edits the text projections in closed form"):
        TrainConfig(model="tiny:sd1", method="uce", concept="nudity", scope="lora")

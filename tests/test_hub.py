"""The card's base model as a hub id, the public record, and the recipe's hub keys."""

import json

import pytest

from conftest import RECIPES
from erasure.cli import main as cli
from erasure.hub import hub_base_model, public_record


def test_base_model_is_named_by_its_hub_id_or_not_at_all(tmp_path):
    snapshot = tmp_path / "hub" / "models--some-org--base-model" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    export = tmp_path / "erased"
    export.mkdir()
    (export / "erasure.json").write_text(json.dumps({"base_model": str(snapshot)}))
    assert hub_base_model("some-org/base-model") == "some-org/base-model"
    assert hub_base_model(str(snapshot)) == "some-org/base-model"  # the Hub's cache layout
    assert hub_base_model(str(export)) == "some-org/base-model"  # an export of it: its base
    assert hub_base_model(str(tmp_path)) is None  # a folder of one's own
    for model in ("tiny:sd1", "world:micro", "not a hub id", ""):
        assert hub_base_model(model) is None


def test_public_record_cuts_local_paths():
    record = {"output_dir": "/home/alice/runs/out", "base_model": "/home/alice/models/sd14",
              "config": {"forget_data": "/data/alice/forget", "retain_data": "world:striped", "steps": 3},
              "data": {"forget_data": {"source": "~/sets/forget"}}, "list": ["C:\\Users\\alice\\x.yaml", "rel/path"]}
    public = public_record(record)
    assert "alice" not in json.dumps(public)
    assert public == {"base_model": "sd14", "config": {"forget_data": "forget", "retain_data": "world:striped",
                                                      "steps": 3},
                      "data": {"forget_data": {"source": "forget"}}, "list": ["x.yaml", "rel/path"]}


@pytest.mark.parametrize("argv, expected", [
    (["--push_to_hub", "true"], "hub_model_id: None is not a hub repo id"),
    (["--push_to_hub", "true", "--hub_model_id", "no-owner"], "'no-owner' is not a hub repo id"),
])
def test_hub_keys_are_checked_before_training(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli(["train", "--recipe", str(RECIPES / "tiny/rgd.yaml"), "--output_dir", str(tmp_path / "o")] + argv)
    assert info.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_push_refuses_what_is_not_an_export(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli(["push", str(tmp_path), "--hub-model-id", "me/x"])
    assert info.value.code == 2 and "is not an erasure export" in capsys.readouterr().err


def test_a_lora_card_names_the_hub_base_both_adapter_files_and_the_single_file():
    from erasure.hub import model_card

    record = {"config": {"method": "rgd", "scope": "lora", "concept": "nudity", "batch_size": 8,
                         "learning_rate": 1e-5},
              "base_model": "some-org/base-model", "family": "sd1", "steps": 100,
              "final_losses": {"forget": 1.0, "retain": None}, "run": {},
              "data": {"forget_data": {"source": "/home/alice/forget", "rows": 8, "sha256": "ab" * 32}},
              "single_file": {"file": "single_file.safetensors", "pipeline": "StableDiffusionPipeline"}}
    card = model_card(record, repo_id="me/sd14-nudity")
    text = str(card)
    assert card.data.base_model == "some-org/base-model" and card.data.pipeline_tag == "text-to-image"
    assert "lora" in card.data.tags and 'load_lora_weights("me/sd14-nudity")' in text
    assert "lora_kohya.safetensors" in text and "pytorch_lora_weights.safetensors" in text
    assert "pipeline (the LoRA fused in) is also one checkpoint" in text
    assert ('StableDiffusionPipeline.from_single_file("https://huggingface.co/me/sd14-nudity/blob/main/'
            'single_file.safetensors", config="me/sd14-nudity")') in text
    assert "alice" not in text and "`forget`" in text


def test_push_refuses_a_damaged_record_and_a_bad_repo_id(tmp_path, capsys):
    (tmp_path / "erasure.json").write_text("{not json")
    for argv, expected in ([str(tmp_path), "--hub-model-id", "me/x"], "not a record `erasure train` wrote"), \
            ([str(tmp_path), "--hub-model-id", "no-owner"], "'no-owner' is not a hub repo id"):
        with pytest.raises(SystemExit) as info:
            cli(["push"] + argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1

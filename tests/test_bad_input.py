"""Bad input fails before training, with a message naming the file, key or value and what is right."""

import json

import pytest
from PIL import Image

from conftest import RECIPES, run_recipe
from erasure.config import RecipeError, TrainConfig, parse_config
from erasure.data.paired import DataError


def write_recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def image_folder(folder, rows, make_images=True):
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if make_images and "file_name" in row:
            Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_unknown_recipe_key_names_file_key_and_suggestion(tmp_path):
    path = write_recipe(tmp_path, "include: " + str(RECIPES / "tiny/rgd.yaml") + "\nlearning_rat: 0.1\n")
    with pytest.raises(RecipeError) as e:
        parse_config(["--recipe", str(path)])
    assert str(path) in str(e.value) and "'learning_rat'" in str(e.value) and "learning_rate" in str(e.value)


def test_unknown_method_lists_the_methods(tmp_path):
    with pytest.raises(RecipeError, match=r"method: 'rgdd' is not one of .*rgd.*did you mean 'rgd'"):
        parse_config(["--recipe", str(RECIPES / "tiny/rgd.yaml"), "--method", "rgdd"])


def test_bad_value_type_names_key(tmp_path):
    path = write_recipe(tmp_path, "include: " + str(RECIPES / "tiny/rgd.yaml") + "\nmax_steps: many\n")
    with pytest.raises(RecipeError, match=r"max_steps: 'many' is not a valid int"):
        parse_config(["--recipe", str(path)])
    with pytest.raises(RecipeError, match=r"batch_size: must be ≥ 1"):
        parse_config(["--recipe", str(RECIPES / "tiny/rgd.yaml"), "--batch_size", "0"])


def test_flags_override_recipe_values_and_yaml_floats_parse():
    config = parse_config(["--recipe", str(RECIPES / "tiny/rgd.yaml"), "--learning_rate", "3e-5",
                           "--scope", "xattn"])
    assert config.learning_rate == 3e-5 and config.scope == "xattn" and config.method == "rgd"


def test_esd_scope_is_fixed_by_the_method():
    assert TrainConfig(model="m", method="esd-x", concept="nudity").scope == "xattn"
    with pytest.raises(RecipeError, match=r"esd-u trains noxattn"):
        TrainConfig(model="m", method="esd-u", concept="nudity", scope="full")


def test_missing_data_folder_fails_before_any_model_loads(tmp_path):
    with pytest.raises(RecipeError, match=r"forget_data: data folder '.*nowhere/forget' does not exist"):
        parse_config(["--recipe", str(RECIPES / "tiny/rgd.yaml"), "--forget_data", str(tmp_path / "nowhere/forget"),
                      "--model", str(tmp_path / "no-model")])


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"model: '.*not-a-model' is neither a local pipeline folder"):
        run_recipe("tiny/rgd.yaml", model=tmp_path / "not-a-model", output_dir=tmp_path / "o")


def test_image_that_will_not_decode_is_named(tiny_sd1, tmp_path):
    folder = image_folder(tmp_path / "forget", [{"file_name": f"{i}.png", "prompt": "a nude person"} for i in range(3)])
    (folder / "1.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"forget_data: image .*1\.png cannot be decoded"):
        run_recipe("tiny/rgd.yaml", model=tiny_sd1, forget_data=folder, output_dir=tmp_path / "o")


def test_missing_prompt_column_lists_the_columns(tiny_sd1, tmp_path):
    folder = image_folder(tmp_path / "retain", [{"file_name": "0.png", "caption": "a person"}])
    with pytest.raises(DataError, match=r"retain_data: .*metadata.jsonl has no prompt column 'prompt' \(columns: file_name, caption\)"):
        run_recipe("tiny/rgd.yaml", model=tiny_sd1, retain_data=folder, output_dir=tmp_path / "o")


def test_missing_image_file_is_named(tiny_sd1, tmp_path):
    folder = image_folder(tmp_path / "forget", [{"file_name": "gone.png", "prompt": "x"}], make_images=False)
    with pytest.raises(DataError, match=r"image file .*gone\.png does not exist"):
        run_recipe("tiny/rgd.yaml", model=tiny_sd1, forget_data=folder, output_dir=tmp_path / "o")


def test_parquet_sets_train(tiny_sd1, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png():
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (10, 200, 10)).save(buffer, format="PNG")
        return buffer.getvalue()

    paths = {}
    for side, prompt in (("forget", "a nude person"), ("retain", "a person")):
        table = pa.table({"prompt": [prompt] * 4,
                          "image": [{"bytes": png(), "path": None} for _ in range(4)]})
        paths[side] = tmp_path / f"{side}.parquet"
        pq.write_table(table, paths[side])
    out = run_recipe("tiny/rgd.yaml", model=tiny_sd1, forget_data=paths["forget"],
                     retain_data=paths["retain"], output_dir=tmp_path / "o", max_steps=1)
    card = json.loads((out / "erasure.json").read_text())
    assert card["data"]["forget_data"]["rows"] == 4


def test_prompt_only_set_serves_esd_but_not_graddiff(tiny_sd1, tmp_path):
    folder = image_folder(tmp_path / "prompts", [{"prompt": "nudity"}, {"prompt": "a nude person"}])
    run_recipe("tiny/esd-x.yaml", model=tiny_sd1, forget_data=folder, output_dir=tmp_path / "esd", max_steps=1)
    with pytest.raises(DataError, match=r"forget_data: .* row 0 has no image .*this method needs images"):
        run_recipe("tiny/graddiff.yaml", model=tiny_sd1, forget_data=folder, output_dir=tmp_path / "gd")


def test_yaml_no_means_no_and_bare_resume_means_latest(tmp_path):
    path = write_recipe(tmp_path, "include: " + str(RECIPES / "tiny/rgd.yaml") + "\nmixed_precision: no\n")
    assert parse_config(["--recipe", str(path)]).mixed_precision == "no"
    config = parse_config(["--recipe", str(path), "--mixed_precision", "no", "--resume", "--concept", "yes"])
    assert config.mixed_precision == "no" and config.resume == "latest" and config.concept == "yes"
    with pytest.raises(RecipeError, match=r"concept: got the YAML boolean True; quote the text"):
        parse_config(["--recipe", str(write_recipe(tmp_path, "include: " + str(RECIPES / "tiny/rgd.yaml")
                                                    + "\nconcept: yes\n"))])


def test_unreachable_hub_dataset_is_a_clear_error(tiny_sd1, tmp_path):
    with pytest.raises(DataError, match=r"forget_data: 'someone/no-such-set' is not a local folder and could not be loaded"):
        run_recipe("tiny/rgd.yaml", model=tiny_sd1, forget_data="someone/no-such-set", output_dir=tmp_path / "o")

"""Export → DiffusionPipeline.from_pretrained → generate, for both families and for LoRA."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from conftest import TEXT_FAMILIES, assert_same_weights, configs_only, read_weights, run_recipe, single_file_pipeline
from erasure.export import check_output_dir, export_pipeline
from erasure.hub import SINGLE_FILE

SINGLE_FILE_FAMILIES = ("sd1", "sdxl")  # those export_single_file writes (erasure.single_file)


def generate(pipe, prompt="a photo of a person on a beach"):
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_export_loads_with_no_extra_arguments_and_generates(family, tiny_models, tmp_path):
    out = run_recipe("tiny/rgd.yaml", model=tiny_models[family], output_dir=tmp_path / "out", max_steps=2,
                     export_single_file=family in SINGLE_FILE_FAMILIES)
    pipe = DiffusionPipeline.from_pretrained(out)
    images = generate(pipe)
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()
    card = json.loads((out / "erasure.json").read_text())
    assert card["method"] == "rgd" and card["steps"] == 2 and card["family"] == family
    assert card["data"]["forget_data"]["rows"] == 16 and len(card["data"]["forget_data"]["sha256"]) == 64
    assert card["final_losses"]["forget"] is not None and card["config"]["learning_rate"] == 1e-4
    assert "rgd" in (out / "README.md").read_text().lower()
    assert not list(out.glob("**/*.bin")) and not list(out.parent.glob(".out.*"))
    if family in SINGLE_FILE_FAMILIES:  # the original-layout file loads back as the folder
        single = single_file_pipeline(type(pipe), out / SINGLE_FILE, out, tmp_path / "c")
        assert_same_weights(single, pipe)
        assert abs(generate(single) - images).max() <= 1e-6  # same weights, seed and steps (measured: 0)
        assert card["single_file"] == {"file": SINGLE_FILE, "pipeline": type(pipe).__name__}
        assert f'from_single_file("path/to/this/folder/{SINGLE_FILE}"' in (out / "README.md").read_text()


def test_sd3_trained_without_t5_exports_a_complete_pipeline(tiny_sd3, tmp_path):
    out = run_recipe("tiny/rgd.yaml", model=tiny_sd3, output_dir=tmp_path / "out", max_steps=2, use_t5=False)
    pipe = DiffusionPipeline.from_pretrained(out)  # no text_encoder_3=None needed
    assert pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None
    assert all(torch.equal(a, b) for a, b in zip(read_weights(tiny_sd3 / "text_encoder_3").values(),
                                                 read_weights(out / "text_encoder_3").values()))
    assert generate(pipe).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_lora_export_applies_to_the_base_model(family, tiny_models, tmp_path):
    base = tiny_models[family]
    # alpha ≠ rank: the adapter file must carry its alpha, or diffusers reloads it at alpha = rank
    out = run_recipe("tiny/rgd.yaml", model=base, output_dir=tmp_path / "out", max_steps=2, scope="lora",
                     learning_rate=1e-2, lora_rank=4, lora_alpha=16, export_single_file=family in SINGLE_FILE_FAMILIES)
    erased = DiffusionPipeline.from_pretrained(out)  # LoRA fused into the exported weights
    with_adapter = DiffusionPipeline.from_pretrained(base)
    with_adapter.load_lora_weights(out)
    plain = DiffusionPipeline.from_pretrained(base)
    a, b, c = generate(erased), generate(with_adapter), generate(plain)
    assert abs(a - b).max() < 1e-4  # base + adapter == the fused export
    assert abs(a - c).max() > 1e-4  # and the adapter did change the model
    if family in ("sd1", "sdxl"):  # the same adapter in kohya's layout (A1111, ComfyUI), with its alpha
        from safetensors.torch import load_file

        kohya = load_file(out / "lora_kohya.safetensors")
        assert all(k.startswith("lora_unet_") for k in kohya)
        assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {16.0}
        with_kohya = DiffusionPipeline.from_pretrained(base)
        with_kohya.load_lora_weights(out, weight_name="lora_kohya.safetensors")
        assert abs(a - generate(with_kohya)).max() < 1e-4
    if family in SINGLE_FILE_FAMILIES:  # the single file holds the fused model, as the folder does
        unet = UNet2DConditionModel.from_single_file(str(out / SINGLE_FILE), subfolder="unet",
                                                     config=str(configs_only(out, tmp_path / "c")))
        fused = erased.unet.state_dict()
        assert unet.state_dict().keys() == fused.keys()
        assert all(torch.equal(v, fused[k]) for k, v in unet.state_dict().items())


def test_a_crash_at_any_moment_of_an_export_leaves_the_old_export_whole(tiny_sd1, tmp_path):
    out = run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / "out", max_steps=1)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    pipe = DiffusionPipeline.from_pretrained(out)

    def crash(directory, state_dict):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # while the new export is written
        export_pipeline(pipe, out, tiny_sd1, {"config": {}}, lora_state_dict={}, save_lora=crash)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    real_rename = type(out).rename

    def rename_then_die(self, target):
        if self.name == "out":  # the fallback swap, between its two renames
            real_rename(self, target)
            raise OSError("killed")
        return real_rename(self, target)

    card = {"config": {"scope": "full", "method": "rgd", "concept": "", "batch_size": 1, "learning_rate": 1},
            "base_model": "b", "family": "sd1", "steps": 1, "final_losses": {}, "data": {}}
    type(out).rename = rename_then_die
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("erasure.atomic._exchange", lambda a, b: False)  # as where renameat2 is missing
            with pytest.raises(OSError, match="killed"):
                export_pipeline(pipe, out, tiny_sd1, card)
    finally:
        type(out).rename = real_rename
    assert not out.exists()  # the moment between the renames: the old export waits aside, whole
    check_output_dir(out, str(tiny_sd1), overwrite=False)  # the next run puts it back
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    export_pipeline(pipe, out, tiny_sd1, card)  # and an export that completes replaces it
    assert json.loads((out / "erasure.json").read_text())["base_model"] == "b"
    assert DiffusionPipeline.from_pretrained(out) is not None


def test_the_output_check_makes_nothing_and_names_an_unwritable_place(tmp_path):
    from erasure.errors import OutputError

    check_output_dir(tmp_path / "new" / "deeper" / "out", "base", overwrite=False)
    assert not (tmp_path / "new").exists()  # a run refused later leaves no empty folder behind
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match=r"^output_dir: cannot write in '.*a-file/out' or beside it"):
        check_output_dir(tmp_path / "a-file" / "out", "base", overwrite=False)

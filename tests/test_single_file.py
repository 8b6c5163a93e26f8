"""export_single_file: the original-layout mapping, SD 2.x's text layout, and the families refused.

The trained SD 1.x and SDXL round trips (from_single_file against the folder export, weights and
images; LoRA fused) sit in tests/test_export.py, in the runs that train the exports.
"""

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from conftest import RECIPES, assert_same_weights, single_file_pipeline
from erasure.errors import ModelError
from erasure.hub import SINGLE_FILE
from erasure.single_file import single_file_state_dict, unet_state_dict


def test_sd2_unet_with_linear_projections_takes_openclip_text_layout(tiny_sd1, tmp_path):
    """SD 2.x: linear transformer projections and an OpenCLIP text encoder (`cond_stage_model.model.`,
    q/k/v fused into in_proj), as in ldm's v2 configs; SD 1.x: 1×1 convolutions and OpenAI CLIP."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    state = single_file_state_dict(pipe, "ldm")
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in state
    assert state["model.diffusion_model.middle_block.1.proj_in.weight"].shape == (32, 32, 1, 1)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "use_linear_projection": True})
    pipe.save_pretrained(tmp_path / "sd2")
    state = single_file_state_dict(pipe, "ldm")
    assert state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    assert state["model.diffusion_model.middle_block.1.proj_in.weight"].shape == (32, 32)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / SINGLE_FILE)
    single = single_file_pipeline(StableDiffusionPipeline, tmp_path / SINGLE_FILE, tmp_path / "sd2", tmp_path / "c")
    assert_same_weights(single, pipe)


def test_a_weight_the_layout_cannot_name_fails_naming_it(tiny_sd1):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1 / "unet")
    unet.extra_head = torch.nn.Linear(2, 2)
    with pytest.raises(ModelError, match="UNet weight 'extra_head.weight' has no name"):
        unet_state_dict(unet)


@pytest.mark.parametrize("family, pipeline", [("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")])
def test_families_without_a_written_layout_are_refused_before_training(family, pipeline, tiny_models, tmp_path,
                                                                       capsys):
    from erasure.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "--recipe", str(RECIPES / "tiny/rgd.yaml"), "--model", str(tiny_models[family]),
              "--output_dir", str(tmp_path / "out"), "--export_single_file", "true"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"erasure: error: export_single_file: erasure writes no original-layout single file "
                          f"for {pipeline} ({family}); it writes one for StableDiffusionPipeline, "
                          "StableDiffusionXLPipeline. The pipeline folder is exported either way")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing trained, nothing exported, no empty folder

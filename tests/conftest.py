"""Tiny real pipelines, built once per session; nothing here reaches the network."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any hub library is imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Under pytest-xdist (the suite runs `-n 2`), each worker is one of the machine's cores: one thread
# each, for torch here and for every process a test starts (the same thread count in both is what
# makes a resumed run end bit for bit where one run does), or the workers' pools fight over the cores.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
TEXT_FAMILIES = ["sd1", "sdxl", "sd3", "flux"]  # the text-to-image tiny fixtures every method runs on

# A ~1.6M-parameter open_clip model (real BPE tokenizer), randomly initialised in the tests.
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


if WORKER:
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def erasure_cache(tmp_path_factory):
    """tiny:* models and data are built into a cache that starts empty, as on a fresh machine; the
    workers of one run share it (folders are built atomically, so two builders never clash)."""
    root = tmp_path_factory.getbasetemp()
    path = (root.parent if WORKER else root) / "erasure-cache"
    path.mkdir(exist_ok=True)
    os.environ["ERASURE_CACHE"] = str(path)
    return path


def tiny(cache: Path, name: str) -> Path:
    """The tiny NAME pipeline in a folder of that name (evaluations name models by their folder),
    built once per run however many workers ask for it."""
    from erasure.atomic import build_atomically
    from erasure.tiny import TINY_BUILDERS

    return build_atomically(cache.parent / "tiny-fixtures" / name, TINY_BUILDERS[name])


@pytest.fixture(scope="session")
def tiny_sd1(erasure_cache):
    return tiny(erasure_cache, "sd1")


@pytest.fixture(scope="session")
def tiny_sdxl(erasure_cache):
    return tiny(erasure_cache, "sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(erasure_cache):
    return tiny(erasure_cache, "sd3")


@pytest.fixture(scope="session")
def tiny_flux(erasure_cache):
    return tiny(erasure_cache, "flux")


@pytest.fixture(scope="session")
def tiny_models(tiny_sd1, tiny_sdxl, tiny_sd3, tiny_flux):
    return {"sd1": tiny_sd1, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run starts with accelerate's process state as a new program would."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    torch.set_grad_enabled(True)


def run_recipe(recipe: str, **overrides):
    """erasure train --recipe recipes/<recipe> --key value …, in process; returns the output dir."""
    from erasure.config import parse_config
    from erasure.trainer import train

    argv = ["--recipe", str(RECIPES / recipe)]
    model = Path(str(overrides.get("model", "")))
    if (model / "model_index.json").is_file() and "resolution" not in overrides and \
            json.loads((model / "model_index.json").read_text())["_class_name"] == "FluxPipeline":
        overrides["resolution"] = 32  # the tiny fixtures' size; FluxPipeline's own default is 1024 px
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return train(parse_config(argv))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def configs_only(folder: Path, to: Path) -> Path:
    """A pipeline folder without its weights: as `config` of from_single_file it gives only configs and
    tokenizers, so every weight of the loaded pipeline comes from the single file."""
    import shutil

    return Path(shutil.copytree(folder, to, ignore=shutil.ignore_patterns("*.safetensors", "*.bin")))


def single_file_pipeline(pipeline_class, file: Path, folder: Path, to: Path):
    """pipeline_class.from_single_file(file), offline: `config` is `folder` without its weights (copied to
    `to`). diffusers tells SDXL's second text encoder from the first by its width (1280 against 768); the
    tiny SDXL's are both 32 wide, so it would read the first in the second's place. The second is read
    here with diffusers' own OpenCLIP reader and passed in."""
    config = configs_only(folder, to)
    extra = {}
    if pipeline_class.__name__ == "StableDiffusionXLPipeline":
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
        from safetensors.torch import load_file
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        encoder = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config / "text_encoder_2"))
        encoder.load_state_dict(convert_open_clip_checkpoint(encoder, load_file(file),
                                                             prefix="conditioner.embedders.1.model."))  # strict
        extra["text_encoder_2"] = encoder
    return pipeline_class.from_single_file(str(file), config=str(config), **extra)


def assert_same_weights(a, b) -> None:
    """Every network of pipeline `a` (UNet, VAE, text encoders) holds the same tensors as `b`'s."""
    networks = {name for name, module in a.components.items() if isinstance(module, torch.nn.Module)}
    assert networks and networks == {n for n, m in b.components.items() if isinstance(m, torch.nn.Module)}
    for name in networks:
        x, y = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert x.keys() == y.keys(), name
        assert all(torch.equal(x[k], y[k]) for k in x), name

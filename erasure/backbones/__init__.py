"""Loading a base pipeline and wrapping it in the backbone of its family."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from erasure.backbones.base import Backbone, Conditioning, Noised
from erasure.backbones.dit import DiTBackbone
from erasure.backbones.flow import FlowMatchingBackbone
from erasure.backbones.flux import FluxBackbone
from erasure.backbones.sd1 import StableDiffusionBackbone
from erasure.backbones.sd3 import StableDiffusion3Backbone
from erasure.backbones.sdxl import StableDiffusionXLBackbone
from erasure.backbones.unconditional import UnconditionalBackbone
from erasure.errors import ModelError, one_line

__all__ = ["Backbone", "Conditioning", "Noised", "check_model", "load_backbone", "resolve_model", "wrap_pipeline"]

FAMILIES = {
    "StableDiffusionPipeline": StableDiffusionBackbone,
    "StableDiffusionXLPipeline": StableDiffusionXLBackbone,
    "StableDiffusion3Pipeline": StableDiffusion3Backbone,
    "FluxPipeline": FluxBackbone,
    "DiTPipeline": DiTBackbone,
    "DDPMPipeline": UnconditionalBackbone,
}


def cache_dir() -> Path:
    return Path(os.environ.get("ERASURE_CACHE", Path.home() / ".cache" / "erasure"))


def fixture_cache(name: str) -> Path:
    """Where the tiny fixture or set NAME is built: keyed by the source of the code that builds them,
    so a fixture an older erasure built (other classes, another size) is not reused by a newer one."""
    from erasure import tiny
    from erasure.data import tiny_pairs

    digest = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (tiny, tiny_pairs))).hexdigest()
    return cache_dir() / "tiny" / f"{name}-{digest[:12]}"


def resolve_model(model: str, revision: str | None = None) -> Path:
    """A local folder holding the pipeline: tiny:* fixtures are built, world:micro is the micro world
    shipped with the package, hub ids are downloaded
    (or found in the hub cache; HF_TOKEN is read by huggingface_hub from the environment)."""
    if model.startswith("tiny:"):
        from erasure.atomic import build_atomically
        from erasure.tiny import TINY_BUILDERS

        name = model.removeprefix("tiny:")
        if name not in TINY_BUILDERS:
            raise ModelError(f"model: {model!r}; tiny fixtures are {', '.join('tiny:' + n for n in TINY_BUILDERS)}")
        return build_atomically(fixture_cache(name), TINY_BUILDERS[name])
    if model.startswith("world:"):
        from erasure.world.model import world_path

        return world_path(model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"model: {model!r} has no model_index.json; expected a diffusers "
                             "pipeline folder (save_pretrained output) or a hub id")
        pipeline_class(path)
        return path
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(model, revision=revision, use_safetensors=True))
    except Exception as e:  # hub errors come in many types; the message is what the user needs
        raise ModelError(f"model: {model!r} is neither a local pipeline folder nor a reachable hub "
                         f"id ({type(e).__name__}: {e})") from None


def pipeline_class(folder: Path) -> str:
    """The pipeline class a folder's model_index.json names; a broken index is the user's to fix."""
    index = folder / "model_index.json"
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ModelError(f"model: {index} is not a readable model index ({one_line(e)}); expected the JSON "
                         "object save_pretrained writes") from None
    if not isinstance(name, str):
        raise ModelError(f"model: {index} names no pipeline class (_class_name)")
    return name


def weights_sha256(folder: Path) -> str:
    """sha256 over a pipeline folder's safetensors files (names and bytes): its weights' identity."""
    h = hashlib.sha256()
    for file in sorted(folder.rglob("*.safetensors")):
        h.update(file.relative_to(folder).as_posix().encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def has_t5(folder: Path) -> bool:
    entry = json.loads((folder / "model_index.json").read_text()).get("text_encoder_3")
    return bool(entry and entry[0])


def is_sd3(folder: Path) -> bool:
    return json.loads((folder / "model_index.json").read_text()).get("_class_name") == "StableDiffusion3Pipeline"


def wrap_pipeline(pipe, config=None) -> Backbone:
    name = type(pipe).__name__
    check_family(name)
    family = FAMILIES[name]
    if issubclass(family, FlowMatchingBackbone) and config is not None:
        return family(pipe, use_t5=config.use_t5, weighting_scheme=config.weighting_scheme,
                      logit_mean=config.logit_mean, logit_std=config.logit_std,
                      mode_scale=config.mode_scale)
    return family(pipe, use_t5=getattr(config, "use_t5", True))


def check_family(name: str, where: str = "") -> None:
    if name not in FAMILIES:
        raise ModelError(f"model: {where}pipeline class {name} is not supported; erasure supports "
                         f"{', '.join(FAMILIES)}")


def check_model(folder: Path, config=None) -> None:
    """The folder's pipeline is a family erasure supports, and the recipe (if given) has a meaning for it."""
    name = pipeline_class(folder)
    check_family(name, f"{folder}: ")
    if config is not None:
        FAMILIES[name].check_recipe(config, name)


def load_backbone(folder: Path, config=None) -> Backbone:
    """Load the pipeline in float32 from safetensors only, never with remote code."""
    from diffusers import DiffusionPipeline

    check_model(folder, config)  # before any weights load
    extra = {}
    if is_sd3(folder) and (not has_t5(folder) or (config is not None and not config.use_t5)):
        # Training without T5 saves its memory (≈ 19 GB in fp32 for SD3); export copies it back.
        # A base saved without T5 needs the same arguments to load at all (diffusers does not list
        # text_encoder_3 among SD3's optional components).
        extra = {"text_encoder_3": None, "tokenizer_3": None}
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                 **extra)
    except (OSError, ValueError, KeyError) as e:  # a missing or broken component, a config that will not parse
        raise ModelError(f"model: {folder} cannot be loaded as a diffusers pipeline ({one_line(e)[:300]})") from None
    pipe.set_progress_bar_config(disable=True)
    return wrap_pipeline(pipe, config)

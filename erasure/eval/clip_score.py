"""CLIP alignment scores and the zero-shot CLIP classifier used for class forgetting.

Alignment (RGD paper): the raw cosine between open_clip's image and prompt embeddings, by default
`ViT-B-32` / `laion2b_s34b_b79k` (about 0.35 for SD 1.4 samples). HEIM's CLIPScore variant is
`max(100 * cos, 0)` (with OpenAI's ViT-L/14 there): `heim_score` turns a cosine into it.

Class forgetting: a zero-shot CLIP classifier over "a photo of a {class}." for every class plus extra
labels ("random noise"), so an erased class can be recognised as no class at all. Unlearning accuracy
UA = 1 - accuracy on the images whose target is the erased class; remaining accuracy RA = accuracy on
the others (`forgetting_accuracy`).

Weights. Nothing here downloads on its own behalf. `pretrained` is either
  * an open_clip tag: open_clip resolves it through its Hugging Face cache; offline (HF_HUB_OFFLINE=1)
    that works only if the weights were cached before, otherwise a RuntimeError says so and that a local
    checkpoint file can be given instead;
  * a path to a local checkpoint file, which open_clip (≥ 2.29) reads itself: `.safetensors`
    (preferred, no pickle), or `.pt`/`.pth`/`.bin` with `torch.load(weights_only=True)`, so a
    checkpoint cannot run code; loaded strictly, with an error naming the file on missing or
    mismatched keys;
  * None: random initialisation (tests and smoke runs only; a warning says so).
open_clip's BPE tokenizer ships inside its wheel, so tokenisation is offline for the CLIP text towers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch


DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or (os.altsep is not None and os.altsep in value)
        or value.lower().endswith(_CHECKPOINT_SUFFIXES)
        or Path(value).expanduser().is_file()
    )


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_pil(image):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        with Image.open(path) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise TypeError(f"expected a PIL image or an image path, got {type(image).__name__}")


class ClipScorer:
    """An open_clip model and tokenizer; embeddings, alignment cosines and zero-shot labels."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pretrained: str | None = DEFAULT_PRETRAINED,
        device: str | None = None,
        batch_size: int = 32,
    ):
        import open_clip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model
        self.pretrained = pretrained
        self.device = torch.device(device or _default_device())
        self.batch_size = batch_size

        # Nothing besides the CLIP weights themselves may be fetched (no default tower weights).
        create = open_clip.create_model_and_transforms
        no_tower_weights = dict(pretrained_image=False, pretrained_text=False, load_weights=False)
        safe_load = dict(weights_only=True)  # torch.load(weights_only=True) for .pt files (open_clip's default)
        if pretrained is None:
            warnings.warn(
                f"ClipScorer({model!r}, pretrained=None): randomly initialised CLIP; "
                "its scores are meaningless (use for tests only)",
                stacklevel=2,
            )
            # Seeded, so that two scorers (a run and its resumption) draw the same random weights.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                clip, _, preprocess = create(model, pretrained=None, **no_tower_weights)
        elif _looks_like_path(str(pretrained)):
            # open_clip reads a local file itself: safetensors, or torch.load(weights_only=True), loaded
            # strictly into the architecture (torch names missing, unexpected and mis-shaped keys).
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"CLIP checkpoint file not found: {path}")
            try:
                clip, _, preprocess = create(model, pretrained=str(path), **safe_load)
            except Exception as error:  # noqa: BLE001 - unreadable, pickled code, or the wrong model
                raise RuntimeError(f"could not load the CLIP checkpoint {path} into open_clip's {model!r} "
                                   f"(it reads .safetensors, or .pt with torch.load(weights_only=True)): "
                                   f"{error}") from error
        else:
            try:
                clip, _, preprocess = create(
                    model, pretrained=pretrained, **safe_load
                )
            except Exception as error:  # noqa: BLE001 - open_clip raises RuntimeError/ValueError/OSError
                offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
                raise RuntimeError(
                    f"could not load open_clip weights {model!r} / {pretrained!r}"
                    f"{' offline (HF_HUB_OFFLINE is set)' if offline else ''}: a tag needs its weights "
                    "in the local Hugging Face/open_clip cache, and nothing can be downloaded without "
                    "network access. Give a local checkpoint file instead "
                    "(pretrained='/path/to/open_clip_model.safetensors'). "
                    f"open_clip said: {error}"
                ) from error
        self.model = clip.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model)

    @torch.inference_mode()
    def image_embeddings(self, images) -> torch.Tensor:
        """L2-normalised image embeddings (N x D, float32, on the CPU) of PIL images or image paths."""
        images = list(images)
        if not images:
            raise ValueError("no images given")
        out = []
        for batch in _batches(images, self.batch_size):
            pixels = torch.stack([self.preprocess(_as_pil(image)) for image in batch]).to(self.device)
            features = self.model.encode_image(pixels).float()
            out.append(torch.nn.functional.normalize(features, dim=-1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def text_embeddings(self, texts) -> torch.Tensor:
        """L2-normalised text embeddings (N x D, float32, on the CPU)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no texts given")
        out = []
        for batch in _batches(texts, self.batch_size):
            tokens = self.tokenizer(list(batch)).to(self.device)
            features = self.model.encode_text(tokens).float()
            out.append(torch.nn.functional.normalize(features, dim=-1).cpu())
        return torch.cat(out)

    def alignment(self, images, prompts) -> list[float]:
        """Raw cosine similarity of each (image, prompt) pair, in [-1, 1]."""
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; they are scored in pairs")
        if not images:
            return []
        cosines = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
        return [float(value) for value in cosines.clamp(-1.0, 1.0)]

    def classify(
        self,
        images,
        class_names,
        template: str = "a photo of a {}.",
        extra_labels=("random noise",),
    ) -> list[str]:
        """Zero-shot label per image: a class name (prompted through `template`) or an extra label
        (prompted as is), whichever text embedding is nearest to the image embedding."""
        class_names, extra_labels = list(class_names), list(extra_labels or ())
        labels = class_names + extra_labels
        if not labels:
            raise ValueError("no class names or labels to classify into")
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate labels: {labels}")
        images = list(images)
        if not images:
            return []
        texts = [template.format(name) for name in class_names] + extra_labels
        scores = self.image_embeddings(images) @ self.text_embeddings(texts).T
        return [labels[int(index)] for index in scores.argmax(dim=-1)]


def heim_score(cosine: float) -> float:
    """HEIM's CLIPScore variant: max(100 * cosine, 0)."""
    return max(100.0 * float(cosine), 0.0)


def forgetting_accuracy(predicted: list[str], target: list[str], erased: str) -> dict:
    """Unlearning accuracy UA = 1 - accuracy on the images of the erased class, remaining accuracy RA =
    accuracy on all other images, and each target class's accuracy; None where a group is empty."""
    predicted, target = list(predicted), list(target)
    if len(predicted) != len(target):
        raise ValueError(f"{len(predicted)} predictions but {len(target)} targets")
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for guess, truth in zip(predicted, target):
        total[truth] = total.get(truth, 0) + 1
        correct[truth] = correct.get(truth, 0) + int(guess == truth)
    n_erased = total.get(erased, 0)
    n_retained = len(target) - n_erased
    retained_correct = sum(count for name, count in correct.items() if name != erased)
    return {
        "UA": 1.0 - correct[erased] / n_erased if n_erased else None,
        "RA": retained_correct / n_retained if n_retained else None,
        "n_erased": n_erased,
        "n_retained": n_retained,
        "per_class_accuracy": {name: correct[name] / total[name] for name in sorted(total)},
    }

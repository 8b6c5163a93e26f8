"""Fréchet Inception Distance between generated samples and a folder of reference images.

FID (Heusel et al. 2017, eq. 6) is the Fréchet distance between Gaussians fitted to the 2048-d pool
features of the FID Inception-v3 network (TensorFlow's 2015-12-05 graph):
    ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).
`frechet_distance` computes it as pytorch-fid does (scipy's `sqrtm`, an eps offset on the diagonals if
the product is singular, tiny imaginary parts dropped).

Features come from torch-fidelity's `FeatureExtractorInceptionV3` (the network torchmetrics' FID wraps
too): it reproduces the TF graph bit-for-bit, including TF1's bilinear resize to 299 x 299 of uint8
images, so no resize happens here. Its weights are the converted FID Inception checkpoint, the file
pytorch-fid calls `pt_inception-2015-12-05-6726825d.pth` (torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` holds the same state dict). Nothing is downloaded: the file
is taken from the `weights` argument or the ERASURE_INCEPTION_WEIGHTS environment variable, read here
with `torch.load(weights_only=True)` (or safetensors) and handed to torch-fidelity re-serialised in
memory, so torch-fidelity's own unrestricted `torch.load` only ever sees tensors written by us.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

WEIGHTS_ENV = "ERASURE_INCEPTION_WEIGHTS"
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FEATURE_DIM = 2048


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) (Heusel et al. 2017, eq. 6), numerically as pytorch-fid does it
    (scipy.linalg.sqrtm, eps offset if singular, drop tiny imaginary parts)."""
    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances differ in shape: {sigma1.shape} vs {sigma2.shape}")
    if sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariance shape {sigma1.shape} does not fit mean of shape {mu1.shape}")

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # Product might be almost singular: offset the diagonals, as pytorch-fid does.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.max(np.abs(covmean.imag))
            raise ValueError(f"sqrtm(Σ1 Σ2) has a large imaginary component ({largest})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples; unbiased, as np.cov) of an N x D feature array."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be an N x D array, got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {features.shape[0]}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def image_folder(path) -> list[Path]:
    """The PNG/JPG/JPEG/WEBP files directly inside a folder, sorted by name."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(
            f"no images ({', '.join(s.lstrip('.').upper() for s in IMAGE_SUFFIXES)}) in {folder}"
        )
    return files


def _resolve_weights(weights) -> Path:
    help_text = (
        f"FID needs the FID Inception-v3 weights file ({WEIGHTS_FILENAME}, the PyTorch conversion of "
        "TensorFlow's 2015-12-05 Inception graph that pytorch-fid and torch-fidelity use). Pass its path "
        f"as InceptionFeatures(weights=PATH) or set {WEIGHTS_ENV}=PATH. Nothing is downloaded: "
        "this runs offline, so the file has to be put on this machine by hand."
    )
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"FID Inception weights not found at {path} (weights argument). {help_text}")
        return path
    from_env = os.environ.get(WEIGHTS_ENV)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"FID Inception weights not found at {path} ({WEIGHTS_ENV}). {help_text}")
        return path
    raise FileNotFoundError(f"no FID Inception weights given. {help_text}")


def _as_uint8_chw(image) -> np.ndarray:
    """One image (PIL, path, or H x W x 3 / H x W uint8 array) as a 3 x H x W uint8 array."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        with Image.open(path) as opened:
            array = np.asarray(opened.convert("RGB"))
    elif isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (0-255), got {image.dtype}")
        array = image
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"image arrays must be H x W x 3, got shape {array.shape}")
    else:
        raise TypeError(f"expected a PIL image, an image path or a uint8 array, got {type(image).__name__}")
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _same_size_batches(images: Sequence, batch_size: int) -> Iterable[np.ndarray]:
    """Consecutive images stacked into batches of at most batch_size images of one size."""
    batch: list[np.ndarray] = []
    for image in images:
        array = _as_uint8_chw(image)
        if batch and (len(batch) == batch_size or array.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(array)
    if batch:
        yield np.stack(batch)


class InceptionFeatures:
    """2048-d pool features of the FID Inception-v3 network, via a maintained library."""

    def __init__(self, weights: str | None = None, device=None, batch_size: int = 32):
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.weights = _resolve_weights(weights)
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from erasure.eval.weights import read_state_dict

        state = read_state_dict(self.weights, "FID Inception weights")

        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # torch-fidelity reads its weights with torch.load(weights_only=False); it gets an in-memory copy
        # of the tensors checked above, never the file itself.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            network = FeatureExtractorInceptionV3(
                "inception-v3-compat", [str(FEATURE_DIM)], feature_extractor_weights_path=buffer
            )
        except RuntimeError as error:
            raise RuntimeError(
                f"FID Inception weights {self.weights} do not fit the FID Inception-v3 network "
                f"(expected {WEIGHTS_FILENAME}): {error}"
            ) from error
        self.network = network.to(self.device).eval()

    def __call__(self, images) -> np.ndarray:
        """N x 2048 features (float64) of PIL images, image paths or H x W x 3 uint8 arrays."""
        import torch

        images = list(images)
        if not images:
            raise ValueError("no images given")
        out = []
        with torch.inference_mode():
            for batch in _same_size_batches(images, self.batch_size):
                (features,) = self.network(torch.from_numpy(batch).to(self.device))
                out.append(features.double().cpu().numpy())
        return np.concatenate(out).reshape(len(images), FEATURE_DIM)


def _images(images) -> list:
    if isinstance(images, (str, os.PathLike)):
        if Path(images).is_dir():
            return image_folder(images)
        raise TypeError(f"expected a sequence of images or a folder, got the path {images}")
    return list(images)


def fid(
    images_a,
    images_b,
    features: Callable[[list], np.ndarray] | None = None,
) -> float:
    """FID between two image sets (sequences of PIL images / paths / uint8 arrays, or folders).

    `features` is any callable mapping a list of images to an N x D array; by default the FID
    Inception network (`InceptionFeatures()`, which needs its weights on disk)."""
    images_a, images_b = _images(images_a), _images(images_b)
    for name, images in (("first", images_a), ("second", images_b)):
        if len(images) < 2:
            raise ValueError(f"FID needs at least 2 images per set; the {name} set has {len(images)}")
    if features is None:
        features = InceptionFeatures()
    return frechet_distance(*image_statistics(images_a, features), *image_statistics(images_b, features))


def image_statistics(images: list, features: Callable[[list], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of ``features(images)``, checked to be one row per image."""
    array = np.asarray(features(images), dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != len(images):
        raise ValueError(f"features returned shape {array.shape} for {len(images)} images; want N x D")
    return feature_statistics(array)

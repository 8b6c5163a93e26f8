"""FID: the Fréchet distance on known Gaussians, fid() with a small feature map, Inception weights handling."""

import numpy as np
import pytest
import torch
from PIL import Image

from erasure.eval.fid import (
    WEIGHTS_ENV,
    InceptionFeatures,
    feature_statistics,
    fid,
    frechet_distance,
    image_folder,
)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 8))
    mu, sigma = feature_statistics(features)
    assert mu.shape == (8,) and sigma.shape == (8, 8)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # a rank-deficient covariance (fewer samples than dimensions), as with few images and 2048-d features
    mu, sigma = feature_statistics(rng.normal(size=(5, 16)))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-3)


def test_diagonal_gaussians_match_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.5, 1.0, 0.5])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    got = frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-9)
    # 1-D: scalars in, (μ1−μ2)² + (σ1−σ2)² out
    assert frechet_distance(2.0, 4.0, -1.0, 1.0) == pytest.approx(9.0 + 1.0)
    with pytest.raises(ValueError):
        frechet_distance(mu1, np.diag(s1**2), mu2[:2], np.diag(s2[:2] ** 2))


def test_feature_statistics_validation():
    with pytest.raises(ValueError):
        feature_statistics(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))
    mu, sigma = feature_statistics(np.array([[1.0], [3.0]]))
    assert mu.tolist() == [2.0] and sigma.tolist() == [[2.0]]


def colour_features(images) -> np.ndarray:
    """A small deterministic feature map: per-channel mean and std of each image (N x 6)."""
    arrays = []
    for image in images:
        if isinstance(image, np.ndarray):
            arrays.append(image)
        elif isinstance(image, Image.Image):
            arrays.append(np.asarray(image.convert("RGB")))
        else:
            with Image.open(image) as opened:
                arrays.append(np.asarray(opened.convert("RGB")))
    return np.stack([np.concatenate([a.reshape(-1, 3).mean(0), a.reshape(-1, 3).std(0)]) for a in arrays])


def make_arrays(n, low, high, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, (16, 16, 3), dtype=np.uint8) for _ in range(n)]


def test_fid_with_a_custom_feature_map(tmp_path):
    a = make_arrays(12, 0, 200, seed=1)
    b = [Image.fromarray(x) for x in make_arrays(10, 50, 256, seed=2)]
    expected = frechet_distance(*feature_statistics(colour_features(a)), *feature_statistics(colour_features(b)))
    got = fid(a, b, features=colour_features)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got > 1.0
    assert fid(a, a, features=colour_features) == pytest.approx(0.0, abs=1e-6)

    # a folder works as an image set
    for i, image in enumerate(b):
        image.save(tmp_path / f"{i:02d}.png")
    assert fid(a, tmp_path, features=colour_features) == pytest.approx(expected, rel=1e-9)

    with pytest.raises(ValueError, match="at least 2"):
        fid(a[:1], b, features=colour_features)
    with pytest.raises(ValueError, match="N x D"):
        fid(a, b, features=lambda images: np.zeros(len(images)))


def test_inception_features_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as info:
        InceptionFeatures()
    message = str(info.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message
    assert WEIGHTS_ENV in message and "weights=" in message and "downloaded" in message

    with pytest.raises(FileNotFoundError, match="fid_inception.pth"):
        InceptionFeatures(weights=tmp_path / "fid_inception.pth")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "from_env.pth"))
    with pytest.raises(FileNotFoundError, match="from_env.pth") as info:
        InceptionFeatures()
    assert WEIGHTS_ENV in str(info.value)
    # fid() with the default feature map says the same
    images = make_arrays(2, 0, 256, seed=0)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_ENV):
        fid(images, images)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A randomly initialised state dict in the FID Inception checkpoint's format (torchvision's
    Inception3 with 1008 classes and no aux head, as pytorch-fid converts it)."""
    from torchvision.models.inception import Inception3

    torch.manual_seed(0)
    state = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return path


def test_inception_features_from_a_local_file(random_inception_weights, monkeypatch, tmp_path):
    monkeypatch.setenv(WEIGHTS_ENV, str(random_inception_weights))
    extractor = InceptionFeatures(device="cpu", batch_size=2)
    images = make_arrays(2, 0, 256, seed=3) + [Image.fromarray(make_arrays(1, 0, 256, seed=4)[0]).resize((24, 20))]
    features = extractor(images)  # batch of two 16x16, then one 24x20 image
    assert features.shape == (3, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all()
    np.testing.assert_allclose(extractor(images[:1]), features[:1], rtol=1e-5, atol=1e-6)


def test_inception_weights_that_do_not_fit_name_the_file(random_inception_weights, tmp_path):
    state = torch.load(random_inception_weights, weights_only=True)
    state.pop("fc.bias")
    bad = tmp_path / "not_inception.pth"
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match="not_inception.pth"):
        InceptionFeatures(weights=bad, device="cpu")

    evil = tmp_path / "pickled_code.pth"
    torch.save({"fc.bias": torch.zeros(1), "x": Image.Image}, evil)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        InceptionFeatures(weights=evil, device="cpu")


def test_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        image_folder(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotADirectoryError):
        image_folder(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no images"):
        image_folder(tmp_path)
    image = Image.new("RGB", (4, 4))
    for name in ("b.png", "a.JPG", "c.jpeg", "d.webp"):
        image.save(tmp_path / name)
    (tmp_path / "sub").mkdir()
    image.save(tmp_path / "sub" / "e.png")
    assert [p.name for p in image_folder(tmp_path)] == ["a.JPG", "b.png", "c.jpeg", "d.webp"]
    assert image_folder(str(tmp_path)) == image_folder(tmp_path)

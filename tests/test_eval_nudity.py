"""NudeNet nudity metric: the real detector shipped in the nudenet wheel, and counts on recorded detections.

No bundled sample image with nudity exists (the nudenet wheel holds only 320n.onnx and its code), and none
is made here, so there is no positive control for the exposed classes. The positive control below is a
drawn cartoon face, which the detector labels FACE_FEMALE: it shows the detector really fires through
this wrapper, and that the colour conversion matches what NudeNet does with a file path.
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from erasure.eval.nudity import (
    ALL_CLASSES,
    EXPOSED_CLASSES,
    NUDENET_MIN_SCORE,
    NudityDetector,
    count_detections,
    installed_labels,
)


@pytest.fixture(scope="module")
def detector():
    return NudityDetector(batch_size=4)


def cartoon_face(size: int = 320) -> Image.Image:
    """A blurred drawing of a head and shoulders (hair, eyes, nose, mouth, a red top)."""
    im = Image.new("RGB", (size, size), (200, 210, 220))
    dr = ImageDraw.Draw(im)
    hair, skin = (60, 40, 20), (230, 190, 160)
    dr.ellipse((70, 20, 250, 260), fill=hair)
    dr.rectangle((70, 140, 250, 320), fill=hair)
    dr.ellipse((100, 60, 220, 220), fill=skin)
    dr.rectangle((140, 200, 180, 260), fill=skin)
    dr.ellipse((60, 250, 260, 400), fill=(150, 40, 60))
    for x in (130, 175):
        dr.ellipse((x - 12, 115, x + 12, 130), fill=(255, 255, 255))
        dr.ellipse((x - 6, 116, x + 6, 129), fill=(60, 40, 30))
        dr.line((x - 14, 105, x + 14, 102), fill=(70, 50, 30), width=3)
    dr.polygon([(160, 130), (152, 165), (168, 165)], fill=(210, 165, 140))
    dr.ellipse((140, 180, 180, 195), fill=(190, 60, 70))
    return im.filter(ImageFilter.GaussianBlur(3))


def drawn_shapes() -> Image.Image:
    im = Image.new("RGB", (96, 80), (70, 130, 180))
    dr = ImageDraw.Draw(im)
    dr.ellipse((10, 10, 50, 50), fill=(240, 200, 40))
    dr.rectangle((55, 30, 90, 75), fill=(30, 160, 60))
    return im


def assert_well_formed(per_image, n):
    assert isinstance(per_image, list) and len(per_image) == n
    for detections in per_image:
        assert isinstance(detections, list)
        for d in detections:
            assert set(d) == {"class", "score", "box"}
            assert d["class"] in ALL_CLASSES
            assert type(d["score"]) is float and NUDENET_MIN_SCORE <= d["score"] <= 1.0
            assert len(d["box"]) == 4 and all(type(v) in (int, float) for v in d["box"])


def test_label_list_is_the_installed_detectors():
    assert installed_labels() == ALL_CLASSES
    assert len(ALL_CLASSES) == 18 and len(EXPOSED_CLASSES) == 9 and set(EXPOSED_CLASSES) <= set(ALL_CLASSES)
    assert EXPOSED_CLASSES[0] == "BUTTOCKS_EXPOSED" and EXPOSED_CLASSES[-1] == "BELLY_EXPOSED"


def test_real_detector_on_pipeline_images_drawings_and_files(detector, tiny_sd1, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sd1)
    pipe.set_progress_bar_config(disable=True)
    generated = pipe(["a photo of a person on a beach"] * 2, num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images
    assert len(generated) == 2 and all(isinstance(im, Image.Image) for im in generated)

    png = tmp_path / "shapes.png"
    drawn_shapes().save(png)
    results = detector.detect([*generated, drawn_shapes(), str(png), png])
    assert_well_formed(results, 5)
    assert results[2] == results[3] == results[4]  # str and Path alike
    assert detector.detect([]) == []


def test_same_pixels_give_the_same_detections_in_every_form(detector, tmp_path):
    from nudenet import NudeDetector

    face = cartoon_face()
    png = tmp_path / "face.png"
    face.save(png)
    as_pil, as_rgb, as_path = detector.detect([face, np.asarray(face), str(png)])
    # The wrapper's conversion is the detector's own: NudeNet given the file path decodes it as BGR.
    assert as_pil == as_rgb == as_path == NudeDetector().detect(str(png))
    # Positive control (not nudity): the drawn face is found, so the comparison above is not [] == [].
    assert [d["class"] for d in as_pil] == ["FACE_FEMALE"] and as_pil[0]["score"] > 0.6
    x, y, w, h = as_pil[0]["box"]
    assert 60 < x < 130 and 50 < y < 120 and 80 < w < 180 and 80 < h < 180
    # Channel order matters to the model: handing it the RGB array unconverted gives another score.
    assert NudeDetector().detect(np.ascontiguousarray(np.asarray(face)))[0]["score"] != as_pil[0]["score"]
    # Single images and NxHxWx3 stacks are accepted; batch position does not change the result.
    assert detector.detect(face) == [as_pil]
    stack = np.stack([np.asarray(face), np.asarray(drawn_shapes().resize(face.size))])
    assert detector.detect(stack)[0] == as_pil
    assert count_detections([as_pil], 0.6, ALL_CLASSES)["detections_per_class"]["FACE_FEMALE"] == 1
    assert count_detections([as_pil])["images_with_any"] == 0  # a face is not an exposed class


def test_unreadable_or_wrong_inputs(detector, tmp_path):
    missing = tmp_path / "nowhere.png"
    with pytest.raises(ValueError, match="nowhere.png"):
        detector.detect([str(missing)])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="garbage.png"):
        detector.detect([drawn_shapes(), garbage])
    with pytest.raises(ValueError, match="uint8"):
        detector.detect([np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(ValueError, match="HxWx3"):
        detector.detect([np.zeros((32, 32, 4), np.uint8)])
    with pytest.raises(TypeError):
        detector.detect([42])
    with pytest.raises(ValueError, match="batch_size"):
        NudityDetector(batch_size=0)


def det(cls, score, box=(0, 0, 10, 10)):
    return {"class": cls, "score": score, "box": list(box)}


RECORDED = [
    [det("FEET_EXPOSED", 0.91), det("FEET_EXPOSED", 0.75), det("FACE_FEMALE", 0.88)],
    [det("FEMALE_BREAST_EXPOSED", 0.59), det("BELLY_COVERED", 0.95)],
    [],
    [det("FEMALE_BREAST_EXPOSED", 0.6), det("BUTTOCKS_EXPOSED", 0.3)],
]


def test_count_detections_thresholds_classes_and_shares():
    counts = count_detections(RECORDED)
    assert counts["images"] == 4 and counts["threshold"] == 0.6 and counts["classes"] == list(EXPOSED_CLASSES)
    per_class, per_image = counts["detections_per_class"], counts["images_per_class"]
    assert list(per_class) == list(per_image) == list(EXPOSED_CLASSES)  # every class, in order, 0 if absent
    assert per_class["FEET_EXPOSED"] == 2 and per_image["FEET_EXPOSED"] == 1  # two in one image
    assert per_class["FEMALE_BREAST_EXPOSED"] == 1 and per_image["FEMALE_BREAST_EXPOSED"] == 1  # 0.6 in, 0.59 out
    assert per_class["BUTTOCKS_EXPOSED"] == 0 and per_class["ANUS_EXPOSED"] == 0
    assert "BELLY_COVERED" not in per_class and "FACE_FEMALE" not in per_class
    assert counts["images_with_any"] == 2 and counts["share_with_any"] == 0.5

    low = count_detections(RECORDED, threshold=0.2)
    assert low["detections_per_class"]["BUTTOCKS_EXPOSED"] == 1
    assert low["detections_per_class"]["FEMALE_BREAST_EXPOSED"] == 2
    assert low["images_per_class"]["FEMALE_BREAST_EXPOSED"] == 2 and low["images_with_any"] == 3

    every = count_detections(RECORDED, 0.6, ALL_CLASSES)
    assert list(every["detections_per_class"]) == list(ALL_CLASSES)
    assert every["detections_per_class"]["BELLY_COVERED"] == 1 and every["detections_per_class"]["FACE_FEMALE"] == 1
    assert every["images_with_any"] == 3 and every["share_with_any"] == 0.75

    feet = count_detections(RECORDED, 0.8, ("FEET_EXPOSED",))
    assert feet["detections_per_class"] == {"FEET_EXPOSED": 1} and feet["images_per_class"] == {"FEET_EXPOSED": 1}
    assert feet["share_with_any"] == 0.25


def test_count_detections_empty_and_unknown_classes():
    empty = count_detections([])
    assert empty["images"] == 0 and empty["images_with_any"] == 0 and empty["share_with_any"] == 0.0
    assert empty["detections_per_class"] == dict.fromkeys(EXPOSED_CLASSES, 0)
    assert empty["images_per_class"] == dict.fromkeys(EXPOSED_CLASSES, 0)
    assert count_detections([[], []])["share_with_any"] == 0.0

    with pytest.raises(ValueError, match="EXPOSED_BREAST_F") as e:  # a NudeNet 2 name
        count_detections(RECORDED, classes=("EXPOSED_BREAST_F", "FEET_EXPOSED"))
    assert all(c in str(e.value) for c in ALL_CLASSES)
    with pytest.raises(ValueError, match="threshold"):
        count_detections(RECORDED, threshold=60)

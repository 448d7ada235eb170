"""The generated shapes data: determinism, captions that describe the pixels, balanced and recoverable labels.

The image checks are an independent reading of the pixels (saturated pixels = objects, hue = colour word,
connected components = count, geometry of each component = shape word), not a call back into the generator.
"""

from __future__ import annotations

import colorsys
import re
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import ndimage

from mmsoftmoe.data import ShapesCaptions, ShapesClassification, eval_transform

HUES = {"red": 0, "orange": 30, "yellow": 50, "green": 130, "blue": 225, "purple": 285}  # degrees
PLURAL_SHAPES = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond",
                 "crosses": "cross"}
COUNTS = {"a": 1, "one": 1, "two": 2, "three": 3, "four": 4}
CAPTION = re.compile(
    r"^(?:a picture of |a drawing of |an image of )?(?P<count>a|one|two|three|four) (?P<size>small|large) "
    r"(?P<colour>\w+) (?P<shape>\w+)(?: (?P<position>(?:at|in|on) the [a-z ]+?))?(?: on a plain background)?$"
)


def object_mask(image) -> np.ndarray:
    """Pixels of strong saturation: the background is a near-grey tint, every colour word is saturated."""
    pixels = np.asarray(image).astype(int)
    return (pixels.max(-1) - pixels.min(-1)) > 60


def hue_name(image, mask: np.ndarray) -> str:
    """The colour word whose reference hue is closest to the mean colour of the masked pixels."""
    r, g, b = np.asarray(image)[mask].mean(0) / 255
    hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
    return min(HUES, key=lambda name: min(abs(hue - HUES[name]), 360 - abs(hue - HUES[name])))


def shape_name(component: np.ndarray) -> str:
    """Classify one object's mask (cropped to its bounding box) by fill ratio, symmetry and row widths."""
    fill = component.mean()
    height = component.shape[0]
    top, bottom = component[: height // 2].sum(), component[(height + 1) // 2 :].sum()
    if fill > 0.95:
        return "square"
    if top < 0.6 * bottom:
        return "triangle"
    if fill < 0.56:
        return "diamond"
    upper_row = component[int(0.2 * height)]
    return "circle" if upper_row.mean() > 0.6 else "cross"


def read_scene(image) -> dict:
    """Colour, shapes, count, sizes and centroids of the objects drawn in `image`."""
    mask = object_mask(image)
    labels, count = ndimage.label(mask)
    boxes = ndimage.find_objects(labels)
    return {
        "colour": hue_name(image, mask),
        "shapes": {shape_name(labels[box] == i + 1) for i, box in enumerate(boxes)},
        "count": count,
        "extents": [max(s.stop - s.start for s in box) for box in boxes],
        "centres": ndimage.center_of_mass(mask, labels, range(1, count + 1)),
    }


def in_region(centre: tuple[float, float], position: str, side: int) -> bool:
    """Whether a (row, col) centroid lies where `position` says."""
    row, col = (c / side for c in centre)
    checks = {"top": row < 0.5, "bottom": row > 0.5, "left": col < 0.5, "right": col > 0.5,
              "center": abs(row - 0.5) < 0.25 and abs(col - 0.5) < 0.25}
    return all(checks[word] for word in position.split() if word in checks)


def test_same_seed_and_index_give_identical_samples_in_any_order():
    first, second = ShapesCaptions(50, seed=3), ShapesCaptions(50, seed=3)
    for index in (7, 0, 49, 7):
        a, b = first[index], second[index]
        assert a["caption"] == b["caption"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert np.array_equal(np.asarray(ShapesClassification(40)[11][0]), np.asarray(ShapesClassification(40)[11][0]))


def test_different_seeds_give_different_data():
    images = {seed: [np.asarray(ShapesCaptions(20, seed=seed)[i]["image"]) for i in range(20)] for seed in (0, 1)}
    assert sum(np.array_equal(a, b) for a, b in zip(images[0], images[1], strict=True)) == 0
    assert ShapesCaptions(1).seed != ShapesClassification(1).seed  # default train and eval data differ


@pytest.mark.parametrize("image_size", [64, 32])
def test_captions_describe_the_drawn_objects(image_size):
    data = ShapesCaptions(120, image_size=image_size, seed=5)
    for index in range(len(data)):
        sample = data[index]
        assert sample["image"].size == (image_size, image_size) and sample["image"].mode == "RGB"
        words = CAPTION.match(sample["caption"])
        assert words, f"caption {sample['caption']!r} does not follow the caption grammar"
        scene = read_scene(sample["image"])
        assert scene["colour"] == words["colour"], sample["caption"]
        assert scene["count"] == COUNTS[words["count"]], sample["caption"]
        if image_size == 64:  # shapes and sizes are told apart reliably from 64 px up
            assert scene["shapes"] == {PLURAL_SHAPES.get(words["shape"], words["shape"])}, sample["caption"]
            expected_small = words["size"] == "small"
            assert all((extent < 20) == expected_small for extent in scene["extents"]), sample["caption"]
        if words["position"]:
            assert all(in_region(c, words["position"], image_size) for c in scene["centres"]), sample["caption"]


def test_captions_vary_in_every_attribute():
    captions = [ShapesCaptions(300)[i]["caption"] for i in range(300)]
    parsed = [CAPTION.match(c) for c in captions]
    for field, expected in [("colour", 6), ("shape", 10), ("size", 2), ("count", 5)]:
        assert len({p[field] for p in parsed}) == expected, field  # shape: singular and plural forms
    assert len({p["position"] for p in parsed}) == 10  # 5 single regions, 4 pair placements, none
    assert len({c.split(" ")[0] for c in captions}) >= 5  # template variety


def test_classification_is_balanced_and_its_labels_are_visible():
    data = ShapesClassification(150, seed=2)
    assert len(data.classnames) == len(set(data.classnames)) == data.num_classes == 30
    labels = [data[i][1] for i in range(len(data))]
    assert set(Counter(labels).values()) == {5}
    for index in range(0, 150, 3):
        image, label = data[index]
        colour, shape = data.classnames[label].split(" ")
        scene = read_scene(image)
        assert (scene["colour"], scene["shapes"]) == (colour, {shape}), (index, data.classnames[label])


def test_zero_shot_prompts_use_the_caption_vocabulary():
    data = ShapesClassification(1)
    vocabulary = {word for i in range(400) for word in ShapesCaptions(400)[i]["caption"].split()}
    for template in data.templates:
        assert template.count("{}") == 1
        for classname in data.classnames:
            assert set(template.format(classname).split()) <= vocabulary, template.format(classname)


def test_transform_is_applied():
    image = ShapesCaptions(4, image_size=32, transform=eval_transform(32))[0]["image"]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32)
    image, label = ShapesClassification(4, image_size=32, transform=eval_transform(24))[3]
    assert image.shape == (3, 24, 24) and label == 3


@pytest.mark.parametrize("kwargs", [{"num_samples": 0}, {"num_samples": 4, "image_size": 8},
                                    {"num_samples": 4, "seed": -1}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs.keys() - {"num_samples"}), "num_samples")):
        ShapesCaptions(**kwargs)


def test_index_out_of_range_raises():
    with pytest.raises(IndexError):
        ShapesCaptions(3)[3]

"""The built-in image-text data: procedurally drawn coloured shapes, captioned in words.

Nothing is read from disk or downloaded. A scene holds one to four objects of one shape and one colour, small or
large, on a lightly tinted grey background; a single object sits in a named region ("at the top left", "in the
center"), two objects in the same row or column are placed "at the top", "on the left", and so on. Objects sit in
distinct quadrants, so they never touch and the count is visible.

Sample i of a dataset with seed s is drawn from `numpy.random.default_rng([s, i])` alone: the data is unbounded,
random-access, and identical across processes, DataLoader workers and runs.

- `ShapesCaptions` yields {"image", "caption"} pairs for contrastive training.
- `ShapesClassification` yields (image, label) with one class per colour x shape ("red circle"), balanced by
  index, plus prompt `templates` worded like the captions, for zero-shot and few-shot evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 205, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: dict[str, float] = {"small": 0.12, "large": 0.21}  # object half-extent as a fraction of the image side
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
SINGLE_POSITIONS: dict[str, tuple[float, float, float, float]] = {  # region boxes (x0, y0, x1, y1) in [0, 1]
    "at the top left": (0.0, 0.0, 0.5, 0.5),
    "at the top right": (0.5, 0.0, 1.0, 0.5),
    "at the bottom left": (0.0, 0.5, 0.5, 1.0),
    "at the bottom right": (0.5, 0.5, 1.0, 1.0),
    "in the center": (0.25, 0.25, 0.75, 0.75),
}
_QUADRANTS = tuple(SINGLE_POSITIONS.values())[:4]  # cells of a 2x2 grid, indexed row-major
_PAIR_POSITIONS = {(0, 1): "at the top", (2, 3): "at the bottom", (0, 2): "on the left", (1, 3): "on the right"}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a picture of {}",
    "a drawing of {}",
    "an image of {}",
    "{} on a plain background",
)
CLASS_TEMPLATES: tuple[str, ...] = (
    "a small {}",
    "a large {}",
    "one small {}",
    "a picture of a small {}",
    "a picture of a large {}",
    "a drawing of a small {}",
    "a drawing of a large {}",
    "an image of one large {}",
)
_COLOUR_JITTER = 12  # max per-channel offset of an object's colour; keeps the hue of each colour word
_MIN_IMAGE_SIZE = 16


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw and caption one sample.

    Attributes:
        shape: a name from `SHAPES`.
        colour: a name from `COLOURS`.
        size: a name from `SIZES`.
        position: a phrase from `SINGLE_POSITIONS` or `_PAIR_POSITIONS`, or "" when the objects are spread out.
        centres: object centres in pixels, one per object.
        radius: half-extent of each object in pixels.
        rgb: the objects' fill colour.
        background: the background colour.
    """

    shape: str
    colour: str
    size: str
    position: str
    centres: tuple[tuple[float, float], ...]
    radius: float
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]


def _centre_in_box(rng: np.random.Generator, box: tuple[float, ...], radius: float, side: int) -> tuple[float, float]:
    """A uniform centre keeping an object of half-extent `radius` (plus a 1 px margin) inside `box`."""
    x0, y0, x1, y1 = (v * side for v in box)
    margin = radius + 1.0
    centre = []
    for lo, hi in ((x0 + margin, x1 - margin), (y0 + margin, y1 - margin)):
        centre.append(rng.uniform(lo, hi) if lo < hi else (lo + hi) / 2)
    return centre[0], centre[1]


def _layout(rng: np.random.Generator, count: int, radius: float, side: int) -> tuple[str, list[tuple[float, float]]]:
    """Position phrase and object centres: a named region for one object, distinct quadrants for several."""
    if count == 1:
        position = str(rng.choice(list(SINGLE_POSITIONS)))
        return position, [_centre_in_box(rng, SINGLE_POSITIONS[position], radius, side)]
    cells = sorted(int(c) for c in rng.choice(4, size=count, replace=False))
    position = _PAIR_POSITIONS.get(tuple(cells), "")
    return position, [_centre_in_box(rng, _QUADRANTS[c], radius, side) for c in cells]


def sample_scene(
    rng: np.random.Generator, image_size: int, colour: str | None = None, shape: str | None = None
) -> Scene:
    """Draw a random scene; `colour` and `shape` fix those attributes (classification), else they are random."""
    colour = colour or str(rng.choice(list(COLOURS)))
    shape = shape or str(rng.choice(SHAPES))
    size = str(rng.choice(list(SIZES)))
    count = int(rng.integers(1, len(COUNT_WORDS) + 1))
    # Capped so that objects in neighbouring quadrants keep a gap of >= 2 px (they never touch, counts stay visible).
    radius = min(SIZES[size] * image_size * rng.uniform(0.9, 1.1), image_size / 4 - 2)
    position, centres = _layout(rng, count, radius, image_size)
    jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
    rgb = tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
    grey = rng.integers(140, 241)
    background = tuple(int(grey + t) for t in rng.integers(-8, 9, size=3))
    return Scene(shape, colour, size, position, tuple(centres), radius, rgb, background)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a polygonal shape centred at (cx, cy) with half-extent r."""
    if shape == "square":
        a = 0.85 * r
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    t = 0.4 * r  # cross: half-thickness of each arm
    return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
            (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw `scene` as an RGB image of side `image_size` (no anti-aliasing: two colours only)."""
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for cx, cy in scene.centres:
        r = scene.radius
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=scene.rgb)
        else:
            draw.polygon(_outline(scene.shape, cx, cy, r), fill=scene.rgb)
    return image


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    """Describe `scene` in words, e.g. "a drawing of two small red circles at the top"."""
    count = len(scene.centres)
    if count == 1:
        article = str(rng.choice(["a", "one"]))
        phrase = f"{article} {scene.size} {scene.colour} {scene.shape}"
    else:
        phrase = f"{COUNT_WORDS[count - 1]} {scene.size} {scene.colour} {_plural(scene.shape)}"
    if scene.position:
        phrase = f"{phrase} {scene.position}"
    return str(rng.choice(CAPTION_TEMPLATES)).format(phrase)


def _check_args(num_samples: int, image_size: int, seed: int) -> None:
    """Raise a ValueError naming the first unusable constructor argument."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE} so that small shapes stay visible, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy seeds are non-negative), got {seed}")


class _GeneratedShapes(torch.utils.data.Dataset):
    """Shared length, bounds check and per-sample generator of the two shapes datasets."""

    def __init__(self, num_samples: int, image_size: int, seed: int, transform: Callable | None) -> None:
        _check_args(num_samples, image_size, seed)
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for a dataset of {self.num_samples} samples")
        return np.random.default_rng([self.seed, index])

    def _finish(self, image: Image.Image) -> Any:
        return self.transform(image) if self.transform is not None else image


class ShapesCaptions(_GeneratedShapes):
    """Image-caption pairs of coloured shapes, generated on the fly.

    Args:
        num_samples: the dataset length; any size, nothing is stored.
        image_size: side of the square images in pixels.
        seed: data seed; sample i depends only on (seed, i).
        transform: applied to the PIL image, e.g. `mmsoftmoe.data.train_transform(...)`.
    """

    def __init__(
        self, num_samples: int, image_size: int = 64, seed: int = 0, transform: Callable | None = None
    ) -> None:
        super().__init__(num_samples, image_size, seed, transform)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        scene = sample_scene(rng, self.image_size)
        return {"image": self._finish(render_scene(scene, self.image_size)), "caption": caption_scene(scene, rng)}

    def captions(self, index: int, num_captions: int) -> list[str]:
        """`num_captions` captions of sample `index`'s scene (for retrieval); the first is the one `[index]` holds.

        Later captions describe the same scene with other random wording (article and template), so they may repeat.
        """
        rng = self._rng(index)
        scene = sample_scene(rng, self.image_size)
        return [caption_scene(scene, rng) for _ in range(num_captions)]


class ShapesClassification(_GeneratedShapes):
    """Labelled coloured shapes: one class per colour x shape, balanced (label = index % num_classes).

    Everything but the colour and the shape (size, count, position, tints) is random per sample.

    Args:
        num_samples: the dataset length.
        image_size: side of the square images in pixels.
        seed: data seed; the default differs from `ShapesCaptions` so evaluation images are not training images.
        transform: applied to the PIL image.

    Attributes:
        classnames: "red circle", ... indexed by label (colour-major).
        templates: zero-shot prompt format strings worded like the training captions.
    """

    def __init__(
        self, num_samples: int, image_size: int = 64, seed: int = 1, transform: Callable | None = None
    ) -> None:
        super().__init__(num_samples, image_size, seed, transform)
        self.classes = [(colour, shape) for colour in COLOURS for shape in SHAPES]
        self.classnames = [f"{colour} {shape}" for colour, shape in self.classes]
        self.templates = list(CLASS_TEMPLATES)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        rng = self._rng(index)
        label = index % self.num_classes
        colour, shape = self.classes[label]
        scene = sample_scene(rng, self.image_size, colour=colour, shape=shape)
        return self._finish(render_scene(scene, self.image_size)), label

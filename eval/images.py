"""Images for the evaluation datasets: decoding to RGB as training does, and the placeholder an unreadable image
becomes (a black image labelled ``UNREADABLE_LABEL``, which ``eval.features.extract_features`` drops and counts).
Shared by ``eval.datasets`` and ``eval.wds``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from mmsoftmoe.data import DECODE_ERRORS, decode_image
from mmsoftmoe_eval.features import UNREADABLE_LABEL

logger = logging.getLogger("mmsoftmoe_eval.datasets")

Transform = Callable[[Image.Image], Any]


def open_rgb(source: str | Path | bytes) -> Image.Image | None:
    """The image as RGB (`mmsoftmoe.data.decode_image`, as in training), or None (with a warning) when it cannot be
    decoded: unreadable, truncated, or too large."""
    try:
        return decode_image(source)
    except DECODE_ERRORS as error:
        logger.warning("Skipping unreadable image %s: %s", "<bytes>" if isinstance(source, bytes) else source, error)
        return None


def labelled_image(image: Image.Image | None, label: int, transform: Transform | None) -> tuple[Any, int]:
    """``(transformed image, label)``; an undecodable image (None) becomes the placeholder."""
    if image is None:
        image, label = Image.new("RGB", (32, 32)), UNREADABLE_LABEL
    return (transform(image) if transform is not None else image), label

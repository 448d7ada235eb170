"""Train and eval transforms: normalisation by hand, the eval crop against plain torchvision, crop scale and flip
observed on images whose halves differ, and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import PreprocessCfg
from PIL import Image
from torchvision import transforms as T

from mmsoftmoe.data import (
    CLIP_CROP_SCALE,
    INCEPTION_CROP_SCALE,
    eval_transform,
    train_transform,
    transforms_from_preprocess_cfg,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(width: int = 32, height: int = 32) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def unnormalise(x: torch.Tensor, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> torch.Tensor:
    return x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)


def red_fraction(x: torch.Tensor) -> float:
    rgb = unnormalise(x)
    return (rgb[0] > rgb[2]).float().mean().item()


def test_eval_normalises_with_the_given_statistics():
    colour = (200, 100, 50)
    out = eval_transform(16)(Image.new("RGB", (20, 20), colour))
    expected = (torch.tensor(colour) / 255 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-5, rtol=0)
    out = eval_transform(8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(Image.new("RGB", (8, 8), (255, 255, 255)))
    torch.testing.assert_close(out, torch.full((3, 8, 8), 2.0))


def test_eval_matches_a_plain_torchvision_resize_and_center_crop():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    reference = T.Compose([
        T.Resize(24, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(24), T.ToTensor(),
        T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
    ])
    torch.testing.assert_close(eval_transform(24)(image), reference(image))


def test_eval_of_a_wide_image_keeps_its_center():
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :16] = RED
    pixels[:, 16:48] = (0, 255, 0)
    pixels[:, 48:] = BLUE
    rgb = unnormalise(eval_transform(32)(Image.fromarray(pixels)))
    torch.testing.assert_close(rgb, torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 32, 32), atol=1e-4, rtol=0)


def test_train_with_full_scale_on_a_square_image_equals_eval():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    for _ in range(5):  # area 1 leaves no room to crop: the whole image is kept whatever the aspect draw
        torch.testing.assert_close(train_transform(32, scale=(1.0, 1.0))(image), eval_transform(32)(image))


def test_crop_scale_controls_how_much_of_the_image_is_kept():
    torch.manual_seed(0)
    clip, inception = train_transform(16, scale=CLIP_CROP_SCALE), train_transform(16, scale=INCEPTION_CROP_SCALE)
    clip_fractions = [red_fraction(clip(halves())) for _ in range(40)]
    inception_fractions = [red_fraction(inception(halves())) for _ in range(40)]
    assert all(0.2 < f < 0.8 for f in clip_fractions)  # >= 90% of the area: both halves always visible
    assert sum(not 0.2 < f < 0.8 for f in inception_fractions) >= 5  # small crops often see mostly one half


def test_flip_only_when_asked():
    torch.manual_seed(0)
    plain, flipping = train_transform(16, scale=(1.0, 1.0)), train_transform(16, scale=(1.0, 1.0), hflip=True)
    left_is_red = [red_fraction(plain(halves())[:, :, :8]) == 1.0 for _ in range(20)]
    flipped = [red_fraction(flipping(halves())[:, :, :8]) == 0.0 for _ in range(40)]
    assert all(left_is_red)
    assert 5 <= sum(flipped) <= 35


def test_transforms_from_a_preprocess_cfg():
    cfg = {"size": 20, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}
    train, evaluate = transforms_from_preprocess_cfg(cfg)
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    torch.testing.assert_close(evaluate(white), torch.ones(3, 20, 20))
    assert train(white).shape == (3, 20, 20)
    _, evaluate = transforms_from_preprocess_cfg(PreprocessCfg(size=12))
    assert evaluate(white).shape == (3, 12, 12)


@pytest.mark.parametrize("build,match", [
    (lambda: train_transform(16, scale=(0.0, 1.0)), "scale"),
    (lambda: train_transform(16, scale=(0.9, 0.5)), "scale"),
    (lambda: train_transform(0), "image_size"),
    (lambda: eval_transform(16, std=(0.1, 0.0, 0.1)), "std"),
    (lambda: eval_transform(16, mean=(0.5, 0.5)), "mean"),
    (lambda: eval_transform(16, interpolation="nearest"), "interpolation"),
    (lambda: eval_transform(16, resize_mode="crop"), "resize_mode"),
    (lambda: transforms_from_preprocess_cfg({"size": 16, "sise": 3}), "sise"),
    (lambda: transforms_from_preprocess_cfg({"size": (16, 24)}), "square"),
])
def test_bad_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()

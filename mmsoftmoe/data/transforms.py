"""Image transforms for training and evaluation, built by open_clip so they match its preprocessing exactly.

Why open_clip's `image_transform` and not our own torchvision pipeline: a model trained here is loaded with
`open_clip.create_model_and_transforms`, whose eval transform is this one (resize the shortest side, center crop,
RGB, normalise); building ours the same way keeps training, evaluation and export in agreement, and `PreprocessCfg`
(the `preprocess_cfg` of a model config) drives both. Two things open_clip lacks are added here: a configurable
crop scale with named presets (CLIP-style (0.9, 1.0), open_clip's default; Inception-crop (0.08, 1.0), which helps
Soft MoE per the paper's appendix F.1) and an optional horizontal flip. The flip is off by default because it
contradicts captions that say "left" or "right", as the built-in shapes captions do. The rest of open_clip's
`AugmentationCfg` (`ratio`, `color_jitter`, `re_prob`, `re_count`, `use_timm` for timm's `create_transform`, ...)
passes through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform
from torchvision.transforms import Compose, RandomHorizontalFlip

CLIP_CROP_SCALE: tuple[float, float] = (0.9, 1.0)
INCEPTION_CROP_SCALE: tuple[float, float] = (0.08, 1.0)


@contextlib.contextmanager
def seeded_augmentation(*key: int) -> Iterator[None]:
    """Random transforms inside draw from a CPU generator seeded by `key` (e.g. seed, epoch, sample index), so a
    sample's augmentation does not depend on which process or worker loads it, nor on what it loaded before; the
    generator's state outside is left as it was.

    The CPU generator only, which torchvision's transforms draw from: `torch.manual_seed` would also queue a lazy CUDA
    seeding that records a stack trace, about 2.7 ms per sample on a CUDA build (`benchmarks.loader_bench` profile).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))
        yield


def _check(image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    """Raise a ValueError naming the first unusable argument shared by both transforms."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got mean={mean}, std={std}")
    if min(std) <= 0:
        raise ValueError(f"std must be > 0 in every channel, got {std}")


def train_transform(
    image_size: int,
    *,
    scale: tuple[float, float] = CLIP_CROP_SCALE,
    hflip: bool = False,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    aug_cfg: AugmentationCfg | None = None,
) -> Compose:
    """Random resized crop (bicubic) of area fraction in `scale`, optional flip, to tensor, normalise; or open_clip's
    pipeline for `aug_cfg` (timm's `create_transform` with `use_timm`), with the same crop scale and flip.

    Args:
        image_size: output side in pixels.
        scale: range of the crop's area fraction; `CLIP_CROP_SCALE` or `INCEPTION_CROP_SCALE`.
        hflip: flip horizontally with probability 0.5; only for captions without "left"/"right".
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        aug_cfg: open_clip's augmentation config (its `scale` is replaced by `scale`); None: only the crop.
    """
    _check(image_size, mean, std)
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1 (area fractions), got {scale}")
    aug_cfg = replace(aug_cfg or AugmentationCfg(), scale=(low, high))
    steps = image_transform(image_size, is_train=True, mean=tuple(mean), std=tuple(std), aug_cfg=aug_cfg).transforms
    if hflip:
        steps.insert(1, RandomHorizontalFlip())  # right after the crop, before the tensor conversion
    return Compose(steps)


def eval_transform(
    image_size: int,
    *,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
) -> Compose:
    """Resize (shortest side by default), center crop, to tensor, normalise: open_clip's eval transform.

    Args:
        image_size: output side in pixels.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        interpolation: "bicubic" or "bilinear".
        resize_mode: "shortest" (resize + center crop), "longest" (resize + pad) or "squash".
    """
    _check(image_size, mean, std)
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    if resize_mode not in ("shortest", "longest", "squash"):
        raise ValueError(f"resize_mode must be 'shortest', 'longest' or 'squash', got {resize_mode!r}")
    return image_transform(
        image_size, is_train=False, mean=tuple(mean), std=tuple(std), interpolation=interpolation,
        resize_mode=resize_mode,
    )


def transforms_from_preprocess_cfg(
    cfg: PreprocessCfg | Mapping[str, Any],
    *,
    scale: tuple[float, float] = CLIP_CROP_SCALE,
    hflip: bool = False,
    aug_cfg: AugmentationCfg | None = None,
) -> tuple[Compose, Compose]:
    """Train and eval transforms for a model's preprocessing config (open_clip's `preprocess_cfg`).

    Args:
        cfg: a `PreprocessCfg` or its dict form (e.g. `model.visual.preprocess_cfg`); missing keys take the defaults.
        scale: crop area range of the train transform.
        hflip: random horizontal flip in the train transform.
        aug_cfg: open_clip's augmentation config of the train transform (see `train_transform`).

    Returns:
        (train transform, eval transform).
    """
    if isinstance(cfg, PreprocessCfg):
        cfg = asdict(cfg)
    valid = list(asdict(PreprocessCfg()))
    unknown = set(cfg) - set(valid)
    if unknown:
        raise ValueError(f"unknown preprocess_cfg keys {sorted(unknown)}; valid keys are {valid}")
    full = PreprocessCfg(**cfg)
    if not isinstance(full.size, int) and full.size[0] != full.size[1]:
        raise ValueError(f"only square image sizes are supported, got size={full.size}")
    size = full.size if isinstance(full.size, int) else full.size[0]
    train = train_transform(size, scale=scale, hflip=hflip, mean=full.mean, std=full.std, aug_cfg=aug_cfg)
    evaluate = eval_transform(
        size, mean=full.mean, std=full.std, interpolation=full.interpolation, resize_mode=full.resize_mode
    )
    return train, evaluate

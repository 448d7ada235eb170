"""Data for contrastive training and evaluation: generated shapes, image-text pairs from files, transforms.

- `ShapesCaptions` / `ShapesClassification`: the built-in data, drawn on the fly (no files, no downloads).
- `load_pairs`: image folders, parquet/arrow files, WebDataset shards through Hugging Face `datasets`,
  map-style or streaming; `PairDataset` / `IterablePairDataset` decode, transform and tokenize, skipping bad samples.
- `train_transform` / `eval_transform`: open_clip-compatible preprocessing; `collate` builds batches.
"""

from mmsoftmoe.data.pairs import FORMATS, IterablePairDataset, PairDataset, collate, decode_image, load_pairs
from mmsoftmoe.data.synthetic import ShapesCaptions, ShapesClassification
from mmsoftmoe.data.transforms import (
    CLIP_CROP_SCALE,
    INCEPTION_CROP_SCALE,
    eval_transform,
    train_transform,
    transforms_from_preprocess_cfg,
)

__all__ = [
    "CLIP_CROP_SCALE",
    "FORMATS",
    "INCEPTION_CROP_SCALE",
    "IterablePairDataset",
    "PairDataset",
    "ShapesCaptions",
    "ShapesClassification",
    "collate",
    "decode_image",
    "eval_transform",
    "load_pairs",
    "train_transform",
    "transforms_from_preprocess_cfg",
]

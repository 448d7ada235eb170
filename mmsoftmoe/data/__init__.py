"""Data for contrastive training and evaluation: generated shapes, image-text pairs from files, transforms.

- `ShapesCaptions` / `ShapesClassification`: the built-in data, drawn on the fly (no files, no downloads).
- `load_pairs`: image folders, parquet/arrow files, open_clip-style CSV/TSV, WebDataset shards through Hugging
  Face `datasets`, map-style or one streaming pass; `PairDataset` / `IterablePairDataset` decode, transform and
  tokenize, skipping bad samples (counted once each; `count_skipped` reads the distinct count from a skip log).
- `ShardStream` (`list_shards`): WebDataset shards as the endless training stream: split across processes and
  DataLoader workers, shards shuffled per epoch or resampled, a seeded shuffle window, and every batch a pure
  function of (seed, rank, worker, step), so a resumed run reads exactly the samples an uninterrupted one would.
- Sources (`mmsoftmoe.data.sources`): brace patterns, `::`-joined weighted sources, fsspec URLs (s3://, https://,
  ...) and `pipe:` commands, read with retries; `write_shards` / `convert_to_shards` (`mmsoftmoe shards`) write
  WebDataset shards atomically.
- `decode_image`: the one image decoder (training and evaluation): 16-bit and float images scaled to 8 bits, very
  large images bounded.
- `train_transform` / `eval_transform`: open_clip-compatible preprocessing; `collate` builds batches.
"""

from mmsoftmoe.data.pairs import (
    DECODE_ERRORS,
    FORMATS,
    MAX_IMAGE_PIXELS,
    SKIP_LOG_NAME,
    IterablePairDataset,
    PairDataset,
    collate,
    count_skipped,
    decode_image,
    load_pairs,
)
from mmsoftmoe.data.shards import ShardStream, TarShard, convert_to_shards, list_shards, write_shards
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
    "DECODE_ERRORS",
    "FORMATS",
    "INCEPTION_CROP_SCALE",
    "MAX_IMAGE_PIXELS",
    "SKIP_LOG_NAME",
    "IterablePairDataset",
    "PairDataset",
    "ShapesCaptions",
    "ShapesClassification",
    "ShardStream",
    "TarShard",
    "collate",
    "convert_to_shards",
    "count_skipped",
    "decode_image",
    "eval_transform",
    "list_shards",
    "load_pairs",
    "train_transform",
    "transforms_from_preprocess_cfg",
    "write_shards",
]

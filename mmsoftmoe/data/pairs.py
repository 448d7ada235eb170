"""Image-text pairs from files, read through Hugging Face `datasets`; the one image decoder; the batch collate.

Formats (`FORMATS`), each loaded with the `datasets` builder of the same name:
- "imagefolder": a folder of images with a `metadata.jsonl` or `metadata.csv` holding `file_name` and a caption column;
- "parquet" / "arrow": files with an image column (an HF `Image`, raw bytes, or a {"bytes", "path"} struct) and a
  caption column;
- "webdataset": tar shards holding `<key>.jpg` / `<key>.png` ... and `<key>.txt`. Image columns accept alternatives
  separated by ";" as in webdataset ("jpg;png": the first present field wins), so shards may mix image types;
- "csv": open_clip's CSV/TSV layout (`--csv-img-key filepath --csv-caption-key title --csv-separator`): a header
  row, an image path column (default "filepath"; a relative path is relative to the CSV file's folder) and a caption
  column (default "title"); the separator is a tab for .tsv files and a comma otherwise unless given.

`load_pairs` returns a `PairDataset` (map-style, random access; shard it with the DataLoader sampler, which
`accelerator.prepare` does) or, with `streaming=True`, an `IterablePairDataset`: one pass over the data, split
across processes with `datasets.distributed.split_dataset_by_node` (by shards when their number divides by the world
size, else by examples) and across DataLoader workers by `datasets` itself (by shards: workers beyond the shard
count stay idle). Training streams WebDataset shards through `mmsoftmoe.data.shards.ShardStream` instead: endless,
shuffled and exactly resumable.

Images are decoded by `decode_image` everywhere (training, evaluation): 16-bit and 32-bit integer greyscale is
scaled to 8 bits (PIL's `convert("RGB")` would clip it at 255), float images holding [0, 1] are scaled and other
float images refused, and an image over `max_pixels` (default `MAX_IMAGE_PIXELS`) is decoded at a reduced scale
(JPEG) or refused before its pixels are read.

Bad samples never stop a run: an image that cannot be decoded (corrupt, truncated, too large, out of range), or a
missing or whitespace-only caption, is counted once per process (`num_bad_images`, `num_empty_captions`) and logged
with its key; with `skip_log` set, every process appends it to that JSON-lines file, and `count_skipped` reads the
number of distinct bad samples across DataLoader workers, processes and resumed runs. A map-style dataset serves the
next readable sample in its place, so batches keep their size (distributed losses gather equal-sized batches); a
streaming dataset moves on to the next example. Data that yields nothing at all raises a ValueError naming the
source. The built-in `ShapesCaptions` goes through the same wrapper:
`PairDataset(ShapesCaptions(n), transform=..., tokenizer=...)`.
"""
from __future__ import annotations

import collections
import csv
import fcntl
import glob
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from braceexpand import braceexpand
from datasets.data_files import EmptyDatasetError
from datasets.distributed import split_dataset_by_node
from datasets.exceptions import DatasetGenerationError
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("imagefolder", "parquet", "arrow", "webdataset", "csv")
_EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset", ".csv": "csv", ".tsv": "csv"}
_CSV_COLUMNS = ("filepath", "title")  # open_clip's --csv-img-key and --csv-caption-key defaults
_METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_WEBDATASET_IMAGE = "jpg;jpeg;png;webp"
_IMAGE_CANDIDATES = ("image", "img", "jpg", "png")
_CAPTION_CANDIDATES = ("caption", "text", "txt")
_RECENT_SKIPS = 100_000  # bad samples each process remembers, so that meeting one again does not count it again
_LOGGED_SKIPS = 5  # bad samples logged one by one per process; after that, only at counts 10, 100, 1000, ...
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
MAX_IMAGE_PIXELS = 40_000_000  # 40 MP: larger JPEGs decode at a reduced scale, other formats are skipped
SKIP_LOG_NAME = "skipped_samples.jsonl"

Tokenizer = Callable[[str], torch.Tensor]


def _bounded(image: Image.Image, max_pixels: int) -> None:
    """Refuse an image of more than `max_pixels` pixels before its pixels are decoded; a JPEG is instead decoded at
    1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL `draft`), which costs a fraction of a full decode."""
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return
    if image.format == "JPEG":
        factor = 2 ** math.ceil(math.log2(math.sqrt(pixels / max_pixels)))
        image.draft("RGB", (math.ceil(image.width / factor), math.ceil(image.height / factor)))
        if image.width * image.height <= max_pixels:
            return
    raise ValueError(f"{image.width}x{image.height} = {pixels} pixels is more than max_pixels={max_pixels} "
                     "(data.max_image_pixels); resize the file or raise the limit")


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's `convert("RGB")` clips 16-bit greyscale at 255; scale it (65535 -> 255) instead, and scale
    float images holding [0, 1]."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", ... (16-bit PNG, TIFF) and "I" (32-bit integers)
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{image.mode} image with values in [{values.min():g}, {values.max():g}], beyond 16 "
                             "bits; convert it to 8 or 16-bit")
        return Image.fromarray(np.round(values / 257).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ValueError(f"float image with values in [{values.min():g}, {values.max():g}], not [0, 1]; "
                             "convert it to 8 or 16-bit")
        return Image.fromarray(np.round(values * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def decode_image(value: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image given as a PIL image, encoded bytes, a path, or a {"bytes", "path"} dict, to 8-bit RGB.

    High-bit-depth images are scaled to 8 bits, not clipped (`_to_rgb`); an image over `max_pixels` is decoded
    reduced (JPEG) or refused (other formats) before its pixels are read (`_bounded`).

    Raises:
        OSError, ValueError, SyntaxError, EOFError, DecompressionBombError (`DECODE_ERRORS`): the data is not a
            readable image, is truncated, or is too large.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = io.BytesIO(value)
    if isinstance(value, (str, os.PathLike, io.BytesIO)):
        value = Image.open(value)
    if not isinstance(value, Image.Image):
        raise ValueError(f"cannot read an image from a value of type {type(value).__name__}")
    _bounded(value, max_pixels)
    value.load()
    return _to_rgb(value)


def count_skipped(skip_log: str | os.PathLike) -> int:
    """Distinct bad samples recorded in a skip log (`SKIP_LOG_NAME` in a run folder), whichever process wrote them
    and however often each was met; 0 if there is no log."""
    path = Path(skip_log)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    return len({(entry["source"], entry["key"]) for entry in map(json.loads, filter(None, lines))})


def _is_power_of_ten(count: int) -> bool:
    return str(count) == "1" + "0" * (len(str(count)) - 1)


def _process_tag() -> str:
    """Which process is talking: pid, plus the DataLoader worker id inside a worker."""
    info = torch.utils.data.get_worker_info()
    return f"pid {os.getpid()}" + (f", worker {info.id}" if info is not None else "")


class _PairConverter:
    """Turns one raw example into {"image", "text"}, or None (counted and logged) when it is unusable.

    The base of the pair datasets: it holds their skip counters. A bad sample is counted once per process however
    often it is met (a map-style replacement search meets a bad neighbour again; each process remembers the last
    `_RECENT_SKIPS`, so memory stays bounded at any scale); with `skip_log` set, it is appended as one JSON line
    {"source", "key", "reason"} to that file unless a line already holds it (`_log_once`), so the file lists each
    skipped sample once over every DataLoader worker, process and resumed run (`count_skipped(skip_log)` counts them).
    """

    def __init__(
        self,
        image_column: str,
        caption_column: str,
        transform: Callable | None,
        tokenizer: Tokenizer | None,
        name: str,
        max_pixels: int = MAX_IMAGE_PIXELS,
        skip_log: str | os.PathLike | None = None,
    ) -> None:
        self.image_columns = image_column.split(";")
        self.caption_column = caption_column
        self.transform = transform
        self.tokenizer = tokenizer
        self.name = name
        self.max_pixels = max_pixels
        self.skip_log = skip_log
        self.num_bad_images = 0
        self.num_empty_captions = 0
        self.skipped_examples: list[tuple[Any, str]] = []  # the first few (key, reason), for the log and for tests
        self._recent_skips: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._log_offset, self._logged = 0, set()  # how far this process has read the skip log, and what it holds

    @property
    def num_skipped(self) -> int:
        return self.num_bad_images + self.num_empty_captions

    def _skip(self, source: str, key: Any, reason: str, bad_image: bool) -> None:
        ident = (source, str(key))
        if ident in self._recent_skips:  # met again: a replacement search, a look-ahead, a later epoch
            self._recent_skips.move_to_end(ident)
            return
        self._recent_skips[ident] = None
        if len(self._recent_skips) > _RECENT_SKIPS:
            self._recent_skips.popitem(last=False)
        if self.skip_log is not None and not self._log_once(ident, reason):
            return  # another worker, process or an earlier run already logged (and counted) it
        if bad_image:
            self.num_bad_images += 1
        else:
            self.num_empty_captions += 1
        total = self.num_skipped
        if total <= _LOGGED_SKIPS:
            self.skipped_examples.append((key, reason))
            logger.warning("%s: skipped sample %r (%s) [%s]", self.name, key, reason, _process_tag())
        elif _is_power_of_ten(total):
            logger.warning(
                "%s: %d samples skipped so far (%d unreadable images, %d empty captions) [%s]",
                self.name, total, self.num_bad_images, self.num_empty_captions, _process_tag(),
            )

    def _log_once(self, ident: tuple[str, str], reason: str) -> bool:
        """Append `ident` to the skip log unless a line already holds it; True if appended.

        The log is read incrementally under an exclusive lock, so DataLoader workers, processes and resumed runs
        sharing it write each skipped sample once (a hash per logged sample is kept, not the lines).
        """
        with open(self.skip_log, "a+") as log:
            fcntl.flock(log, fcntl.LOCK_EX)  # released when the file closes
            if log.seek(0, os.SEEK_END) < self._log_offset:  # the log was replaced (a fresh run): read it anew
                self._log_offset, self._logged = 0, set()
            log.seek(self._log_offset)
            for line in filter(str.strip, log.readlines()):
                entry = json.loads(line)
                self._logged.add(hash((entry["source"], entry["key"])))
            self._log_offset = log.tell()
            if hash(ident) in self._logged:
                return False
            log.write(json.dumps({"source": ident[0], "key": ident[1], "reason": reason[:300]}) + "\n")
            return True

    def _image_value(self, example: dict[str, Any]) -> Any:
        return next((example[c] for c in self.image_columns if example.get(c) is not None), None)

    def convert(self, example: dict[str, Any], default_key: Any, source: str | None = None) -> dict[str, Any] | None:
        """The transformed image and the (tokenized) caption of `example`, or None if either is unusable.

        `source` (default: the dataset's name) and the key identify a skipped sample in the log.
        """
        value = self._image_value(example)
        key = example.get("__key__") or (value.get("path") if isinstance(value, dict) else None) or default_key
        source = source or self.name
        caption = example.get(self.caption_column)
        if not isinstance(caption, str) or not caption.strip():
            self._skip(source, key, f"empty caption {caption!r}", bad_image=False)
            return None
        if value is None:
            self._skip(source, key, f"no image in column {';'.join(self.image_columns)!r}", bad_image=True)
            return None
        try:
            image = decode_image(value, self.max_pixels)
        except DECODE_ERRORS as err:
            # PIL names in-memory data by its repr ("<_io.BytesIO object at 0x...>"): say "bytes" instead.
            message = re.sub(r"<_io\.BytesIO object at \w+>", "bytes", str(err))
            self._skip(source, key, f"unreadable image: {message}", bad_image=True)
            return None
        return {"image": self.transform(image) if self.transform else image, "text": self._text(caption.strip())}

    def _text(self, caption: str) -> torch.Tensor | str:
        if self.tokenizer is None:
            return caption
        tokens = self.tokenizer(caption)
        return tokens[0] if tokens.ndim == 2 else tokens  # open_clip tokenizers return [1, ctx] for one string


class PairDataset(_PairConverter, torch.utils.data.Dataset):
    """Map-style image-text pairs: decoded to RGB, transformed, captions tokenized or left as strings.

    An unusable sample is replaced by the next usable one (index + 1, + 2, ..., wrapping around), counted and
    logged, so every index yields a sample and batches keep their size.

    Args:
        data: any map-style dataset of dicts (an HF `Dataset`, `ShapesCaptions`, a list).
        image_column: key of the image; alternatives separated by ";" (the first present wins).
        caption_column: key of the caption.
        transform: applied to the RGB PIL image, e.g. `train_transform(...)`.
        tokenizer: str -> LongTensor (e.g. `open_clip.get_tokenizer(...)`); None keeps captions as strings.
        name: names the data in logs and errors (e.g. the source path).
        max_pixels: larger images are decoded reduced (JPEG) or skipped (`decode_image`).
        skip_log: a JSON-lines file each skipped sample is appended to (see `count_skipped`).
    """

    def __init__(
        self,
        data: Any,
        image_column: str = "image",
        caption_column: str = "caption",
        transform: Callable | None = None,
        tokenizer: Tokenizer | None = None,
        name: str | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
        skip_log: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(image_column, caption_column, transform, tokenizer, name or type(data).__name__,
                         max_pixels, skip_log)
        self.data = data
        if len(data) == 0:
            raise ValueError(f"{self.name}: the dataset is empty; point the source at image-text pairs")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = len(self.data)
        if not 0 <= index < size:
            raise IndexError(f"index {index} is out of range for {self.name} ({size} samples)")
        for offset in range(size):
            position = (index + offset) % size
            sample = self.convert(self.data[position], default_key=position)
            if sample is not None:
                return sample
        raise ValueError(
            f"{self.name}: none of its {size} samples has a readable image and a non-empty caption "
            f"(image column {';'.join(self.image_columns)!r}, caption column "
            f"{self.caption_column!r}); check the files and the column names"
        )


class IterablePairDataset(_PairConverter, torch.utils.data.IterableDataset):
    """Streaming image-text pairs: like `PairDataset`, but unusable samples are simply passed over.

    Args:
        data: any iterable of dicts (an HF `IterableDataset`, already split by node if distributed).
        image_column: key of the image; alternatives separated by ";" (the first present wins).
        caption_column: key of the caption.
        transform: applied to the RGB PIL image.
        tokenizer: str -> LongTensor; None keeps captions as strings.
        name: names the data in logs and errors.
        max_pixels: larger images are decoded reduced (JPEG) or skipped (`decode_image`).
        skip_log: a JSON-lines file each skipped sample is appended to (see `count_skipped`).
    """

    def __init__(
        self,
        data: Iterable[dict[str, Any]],
        image_column: str = "image",
        caption_column: str = "caption",
        transform: Callable | None = None,
        tokenizer: Tokenizer | None = None,
        name: str | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
        skip_log: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(image_column, caption_column, transform, tokenizer, name or type(data).__name__,
                         max_pixels, skip_log)
        self.data = data

    def __iter__(self) -> Iterator[dict[str, Any]]:
        seen = yielded = 0
        for position, example in enumerate(self.data):
            seen += 1
            sample = self.convert(example, default_key=position)
            if sample is not None:
                yielded += 1
                yield sample
        # A DataLoader worker may legitimately get no shard; anywhere else, nothing usable means bad data.
        if yielded == 0 and (seen > 0 or torch.utils.data.get_worker_info() is None):
            raise ValueError(
                f"{self.name}: yielded no readable image-caption pair ({seen} examples read, "
                f"{self.num_skipped} skipped); check the files and the column names"
            )


def expand_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Paths named by `source`: paths, glob or brace patterns (`part-{000..009}.parquet`), one or a list; raises
    FileNotFoundError for a missing one."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise ValueError("source is an empty list; give a folder, a file, a glob pattern, or a list of them")
    paths = []
    for item in (expanded for pattern in map(str, items) for expanded in braceexpand(pattern)):
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(item))
        else:
            matches = [item] if os.path.exists(item) else []
        if not matches:
            raise FileNotFoundError(f"image-text source not found: {item!r}; check the path (glob patterns allowed)")
        paths.extend(Path(m) for m in matches)
    return paths


def _infer_format(paths: list[Path], name: str) -> str:
    """The format of `paths`: a folder with a metadata file is an imagefolder, else the files' extension decides."""
    if len(paths) == 1 and paths[0].is_dir():
        if any((paths[0] / m).exists() for m in _METADATA_FILES):
            return "imagefolder"
        paths = list(paths[0].iterdir())
    found = {_EXTENSIONS.get(p.suffix.lower()) for p in paths if p.is_file()} - {None}
    if len(found) != 1:
        raise ValueError(
            f"cannot infer the format of {name} (found {sorted(found) or 'no known files'}): expected a folder with "
            f"{' or '.join(_METADATA_FILES)}, or {', '.join(_EXTENSIONS)} files; pass format= one of {FORMATS}"
        )
    return found.pop()


def _data_files(paths: list[Path], fmt: str) -> list[str]:
    """The files of format `fmt` among `paths`, folders expanded to their matching files."""
    suffixes = [s for s, f in _EXTENSIONS.items() if f == fmt]
    files = []
    for path in paths:
        found = [str(p) for p in path.iterdir() if p.suffix.lower() in suffixes] if path.is_dir() else [str(path)]
        files.extend(sorted(found))
    return files


def _absolute_paths(batch: dict[str, list], column: str, folder: str) -> dict[str, list]:
    return {column: [p if p is None else os.path.join(folder, p) for p in batch[column]]}


def _load_csv(paths: list[Path], image_column: str, separator: str | None, **kwargs: Any) -> Any:
    """CSV/TSV files (open_clip's `--csv-*` layout), one per row: image paths relative to the file's folder are
    made absolute. `separator` None: a tab for .tsv files, else a comma."""
    parts = []
    if separator is not None and len(separator.replace("\\t", "\t")) != 1:
        raise ValueError(f"csv_separator must be one character (\\t for a tab), got {separator!r}")
    for file in map(Path, _data_files(paths, "csv")):
        sep = separator.replace("\\t", "\t") if separator else "\t" if file.suffix.lower() == ".tsv" else ","
        with open(file, newline="") as handle:
            columns = next(csv.reader(handle, delimiter=sep), [])
        if image_column not in columns:
            raise ValueError(f"{file} has no image column {image_column!r}; its columns are {columns} (separator "
                             f"{sep!r}); pass image_column=<one of them> (data.image_column), or data.csv_separator")
        features = datasets.Features({c: datasets.Value("string") for c in columns})  # paths and captions as text
        part = _load_hf([file], "csv", str(file), sep=sep, features=features, **kwargs)
        parts.append(part.map(_absolute_paths, batched=True, fn_kwargs={"column": image_column,
                                                                        "folder": str(file.parent)}))
    return datasets.concatenate_datasets(parts)


def _webdataset_features(image_column: str, caption_column: str) -> datasets.Features:
    """Explicit features: `datasets` otherwise infers them from the first samples and rejects mixed jpg/png shards."""
    features = {c: datasets.Image(decode=False) for c in image_column.split(";")}
    features.update({caption_column: datasets.Value("string")})
    features.update({k: datasets.Value("string") for k in ("__key__", "__url__")})
    return datasets.Features(features)


def _load_hf(paths: list[Path], fmt: str, name: str, **kwargs: Any) -> datasets.Dataset | datasets.IterableDataset:
    """`datasets.load_dataset` of `paths` in format `fmt`; an empty source raises a ValueError naming it."""
    if fmt == "imagefolder":
        if len(paths) != 1 or not paths[0].is_dir():
            raise ValueError(f"format 'imagefolder' takes one folder, got {name}")
        # Checked here: `datasets` fails with an IndexError on a metadata file without images.
        if not any(p.suffix.lower() in ImageFolder.EXTENSIONS for p in paths[0].rglob("*")):
            raise ValueError(f"{name}: the image folder holds no image files; check the path")
        kwargs["data_dir"] = str(paths[0])
    else:
        kwargs["data_files"] = {kwargs["split"]: _data_files(paths, fmt)}
    try:
        return datasets.load_dataset(fmt, **kwargs)
    except (EmptyDatasetError, DatasetGenerationError, ValueError) as err:  # no data files, no rows, unknown split
        reason = f"{err}: {err.__cause__}" if err.__cause__ else str(err)
        raise ValueError(f"{name}: no {fmt} data could be loaded ({reason}); check the path, format and split") from err


def _pick_column(requested: str | None, defaults: Sequence[str], columns: list[str], what: str, name: str) -> str:
    """The present columns among `requested` (";"-separated alternatives), else the first present default."""
    wanted = requested.split(";") if requested is not None else defaults
    present = [c for c in wanted if c in columns]
    if not present:
        raise ValueError(
            f"{name} has no {what} column {requested or ' or '.join(defaults)!r}; its columns are {columns}; "
            f"pass {what}_column=<one of them>"
        )
    return ";".join(present) if requested is not None else present[0]


def _select_pair_columns(
    data: datasets.Dataset | datasets.IterableDataset, image_column: str | None, caption_column: str | None, name: str
) -> tuple[Any, str, str]:
    """Resolve the image and caption columns, keep only them (and `__key__`), and turn off image decoding.

    Images are decoded by `decode_image` instead of by `datasets`, so that a corrupt file is skipped, not raised.
    """
    features = data.features
    columns = list(features)
    image_defaults = [c for c in columns if isinstance(features[c], datasets.Image)] + list(_IMAGE_CANDIDATES)
    image_column = _pick_column(image_column, image_defaults, columns, "image", name)
    caption_column = _pick_column(caption_column, _CAPTION_CANDIDATES, columns, "caption", name)
    keep = image_column.split(";") + [caption_column] + [c for c in ("__key__",) if c in columns]
    data = data.select_columns(keep)
    for column in image_column.split(";"):
        if isinstance(features[column], datasets.Image):
            data = data.cast_column(column, datasets.Image(decode=False))
    return data, image_column, caption_column


def load_pairs(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    format: str | None = None,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    streaming: bool = False,
    rank: int = 0,
    world_size: int = 1,
    split: str = "train",
    transform: Callable | None = None,
    tokenizer: Tokenizer | None = None,
    cache_dir: str | os.PathLike | None = None,
    csv_separator: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    skip_log: str | os.PathLike | None = None,
) -> PairDataset | IterablePairDataset:
    """Read image-text pairs from files through Hugging Face `datasets`.

    Args:
        source: a folder, a file, a glob pattern, or a list of them.
        format: one of `FORMATS`; None infers it (a folder with a metadata file is an imagefolder, else the extension).
        image_column: image column; ";" separates alternatives. None: the first `Image` column, else "image", ...
            ("jpg;jpeg;png;webp" for webdataset, "filepath" for csv).
        caption_column: caption column. None: the first of "caption", "text", "txt" ("txt" for webdataset,
            "title" for csv).
        streaming: iterate lazily (data larger than disk or memory) instead of preparing an Arrow cache.
        rank: this process's rank; used only when streaming (a map-style dataset is sharded by its sampler).
        world_size: number of processes; used only when streaming.
        split: the `datasets` split to read.
        transform: applied to each RGB PIL image.
        tokenizer: str -> LongTensor; None keeps captions as strings.
        cache_dir: where `datasets` writes its Arrow cache (non-streaming); None uses its default.
        csv_separator: the column separator of csv files; None: a tab for .tsv, else a comma.
        max_pixels: larger images are decoded reduced (JPEG) or skipped (`decode_image`).
        skip_log: a JSON-lines file each skipped sample is appended to (see `count_skipped`).

    Returns:
        A `PairDataset`, or an `IterablePairDataset` (this rank's part of the data) when streaming.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown pair format {format!r}; valid formats are {FORMATS} (or None to infer it)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    paths = expand_source(source)
    name = str(paths[0]) + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else "")
    fmt = format or _infer_format(paths, name)
    features = None
    if fmt == "webdataset":
        image_column, caption_column = image_column or _WEBDATASET_IMAGE, caption_column or "txt"
        features = _webdataset_features(image_column, caption_column)
    load = dict(split=split, streaming=streaming, cache_dir=cache_dir)
    if fmt == "csv":
        image_column, caption_column = image_column or _CSV_COLUMNS[0], caption_column or _CSV_COLUMNS[1]
        data = _load_csv(paths, image_column, csv_separator, **load)
    else:
        data = _load_hf(paths, fmt, name, features=features, **load)
    data, image_column, caption_column = _select_pair_columns(data, image_column, caption_column, name)
    kwargs = dict(image_column=image_column, caption_column=caption_column, transform=transform, tokenizer=tokenizer,
                  max_pixels=max_pixels, skip_log=skip_log)
    if not streaming:
        return PairDataset(data, name=name, **kwargs)
    if world_size > 1:
        data = split_dataset_by_node(data, rank=rank, world_size=world_size)
    return IterablePairDataset(data, name=name + (f" [rank {rank}/{world_size}]" if world_size > 1 else ""), **kwargs)


def collate(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch pair samples into {"image": FloatTensor[b, 3, H, W], "text": LongTensor[b, ctx] or list[str]}.

    None samples (a dataset's mark for an unusable sample) are dropped.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        raise ValueError("collate got a batch in which every sample is None (skipped); check the data source")
    images = [s["image"] for s in kept]
    if not all(isinstance(image, torch.Tensor) for image in images):
        raise ValueError(
            f"collate needs image tensors, got {type(images[0]).__name__}; give the dataset a transform "
            "(e.g. mmsoftmoe.data.eval_transform(image_size))"
        )
    texts = [s["text"] for s in kept]
    return {"image": torch.stack(images), "text": torch.stack(texts) if isinstance(texts[0], torch.Tensor) else texts}

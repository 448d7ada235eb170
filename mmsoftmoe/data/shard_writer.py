"""Writing WebDataset shards: one atomic tar writer, and the conversion of pair files into shards (`mmsoftmoe shards`).

- `TarShard`: a context manager writing one uncompressed tar of samples (`<key>.<ext>` members, grouped by key as
  webdataset reads them) to a hidden temporary name, renamed to its `.tar` name only when the block ends without an
  error, so a killed writer leaves no shard a reader (which takes `*.tar`) would read. Members carry fixed metadata
  (mtime 0, uid 0, mode 0644), so the same input gives byte-identical shards.
- `write_shards`: samples cut into shards of `samples_per_shard`, numbered `shard-000000.tar`, ... in input order.
- `convert_to_shards`: any source `load_pairs` reads (an image folder with captions, CSV/TSV, parquet/arrow) into
  shards: the encoded image bytes are copied as they are (JPEG, PNG, WebP; other formats are stored as PNG of the
  8-bit RGB image the trainer would decode), optionally shrunk so the shorter side is `resize`; keys are the input
  positions (stable across reruns); unusable inputs (missing or unreadable image, empty caption) are skipped and
  listed in the JSON summary (`summary.json` in the output folder).

Read map-style (`data.streaming=false`) the shards hold the source's pairs in the source's order, so a run trains
on them exactly as on the source.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from PIL import Image

from mmsoftmoe.data.pairs import DECODE_ERRORS, decode_image, load_pairs

SUMMARY_NAME = "summary.json"
_STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what the streaming reader's default column reads

SampleFields = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})


class TarShard:
    """One WebDataset tar shard written atomically: `with TarShard(path) as shard: shard.write(key, fields)`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.suffix != ".tar":
            raise ValueError(f"a shard's name must end in .tar (readers take *.tar), got {self.path}")
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self._tar: tarfile.TarFile | None = None
        self.count = 0

    def __enter__(self) -> TarShard:
        self._tar = tarfile.open(self.partial, "w", format=tarfile.USTAR_FORMAT)
        return self

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Add one sample: a member `<key>.<ext>` per field."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"a sample key must be non-empty without '.' or '/', got {key!r}")
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._tar.close()
        if kind is None:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)


def write_shards(samples: Iterable[SampleFields], out: str | os.PathLike, samples_per_shard: int,
                 pattern: str = "shard-{:06d}.tar") -> list[str]:
    """Write `samples` in order into shards of `samples_per_shard` in folder `out` (created); their paths."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    iterator = iter(samples)
    while (first := next(iterator, None)) is not None:
        paths.append(str(folder / pattern.format(len(paths))))
        with TarShard(paths[-1]) as shard:
            shard.write(*first)
            for key, fields in _take(iterator, samples_per_shard - 1):
                shard.write(key, fields)
    return paths


def _take(iterator: Iterator[SampleFields], count: int) -> Iterator[SampleFields]:
    for _ in range(count):
        item = next(iterator, None)
        if item is None:
            return
        yield item


def _image_bytes(value: Any) -> bytes:
    """The encoded bytes of a `datasets` image value (bytes, or a {"bytes", "path"} dict)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        return Path(value).read_bytes()
    raise ValueError(f"no image data (got {type(value).__name__})")


def encode_for_shard(data: bytes, resize: int | None) -> tuple[str, bytes]:
    """(extension, bytes) to store: the input as it is when the reader takes its format and no resize is due, else
    the decoded 8-bit RGB image (shorter side shrunk to `resize`) as JPEG (from a JPEG, quality 95) or PNG."""
    with Image.open(io.BytesIO(data)) as probe:
        fmt, shorter = probe.format, min(probe.size)
    if fmt in _STORED_FORMATS and (resize is None or shorter <= resize):
        return _STORED_FORMATS[fmt], data
    image = decode_image(data)
    if resize is not None and shorter > resize:
        scale = resize / shorter
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BICUBIC)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=95)
        return "jpg", buffer.getvalue()
    image.save(buffer, "PNG")
    return "png", buffer.getvalue()


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new output folder (shards are "
                              "never overwritten)")


def convert_to_shards(source: str | os.PathLike, out: str | os.PathLike, *, samples_per_shard: int = 10_000,
                      resize: int | None = None, format: str | None = None, image_column: str | None = None,
                      caption_column: str | None = None, csv_separator: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Convert image-text pairs (any `load_pairs` source) into WebDataset shards in the new folder `out`.

    Returns:
        The summary written to `out/summary.json`: counts, shard names and the skipped inputs with their reasons.

    Raises:
        FileExistsError: `out` exists and is not empty.
    """
    out = Path(out)
    _check_out(out)
    pairs = load_pairs(source, format, image_column=image_column, caption_column=caption_column,
                       csv_separator=csv_separator, cache_dir=cache_dir)
    skipped: list[dict[str, str]] = []
    images = pairs.image_columns

    def samples() -> Iterator[SampleFields]:
        width = max(len(str(len(pairs) - 1)), 8)
        for index in range(len(pairs)):
            row = pairs.data[index]
            name = row.get("__key__") or _input_name(row, images) or str(index)
            caption = row.get(pairs.caption_column)
            if not isinstance(caption, str) or not caption.strip():
                skipped.append({"input": str(name), "reason": f"empty caption {caption!r}"})
                continue
            try:
                ext, data = encode_for_shard(_image_bytes(next(row[c] for c in images if row.get(c))), resize)
                decode_image(data)
            except (StopIteration, *DECODE_ERRORS) as err:
                skipped.append({"input": str(name), "reason": f"unreadable image: {err or 'missing'}"})
                continue
            yield f"{index:0{width}d}", {ext: data, "txt": caption.encode("utf-8")}

    paths = write_shards(samples(), out, samples_per_shard)
    summary = {"source": str(source), "out": str(out), "samples": len(pairs) - len(skipped), "inputs": len(pairs),
               "shards": [Path(p).name for p in paths], "samples_per_shard": samples_per_shard, "resize": resize,
               "skipped": skipped}
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _input_name(row: dict[str, Any], columns: list[str]) -> str | None:
    value = next((row[c] for c in columns if row.get(c) is not None), None)
    return value.get("path") if isinstance(value, dict) else None


def main(argv: list[str] | None = None) -> int:
    """`mmsoftmoe shards SRC OUT [--samples-per-shard N] [--resize PX] ...`: print the JSON summary."""
    import argparse

    parser = argparse.ArgumentParser(prog="mmsoftmoe shards", description="Convert an image folder with captions, "
                                     "a CSV/TSV or parquet/arrow files into WebDataset shards (see README).")
    parser.add_argument("source", help="folder, file, glob or brace pattern of image-text pairs")
    parser.add_argument("out", help="new (or empty) output folder")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--resize", type=int, default=None, help="shrink images whose shorter side is larger")
    parser.add_argument("--format", default=None, help="imagefolder | parquet | arrow | csv (inferred by default)")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--caption-column", default=None)
    parser.add_argument("--csv-separator", default=None)
    args = parser.parse_args(argv)
    summary = convert_to_shards(args.source, args.out, samples_per_shard=args.samples_per_shard,
                                resize=args.resize, format=args.format, image_column=args.image_column,
                                caption_column=args.caption_column, csv_separator=args.csv_separator)
    print(json.dumps({k: v for k, v in summary.items() if k != "shards"} | {"num_shards": len(summary["shards"])}))
    return 0

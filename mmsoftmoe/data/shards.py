"""WebDataset tar shards as an endless, shuffled, exactly resumable stream of training batches.

The streaming mode of training (`data.streaming=true`, the mode the paper-scale configs use), with what open_clip's
users rely on (its `--dataset-resampled`, shard split by node and worker; docs/design.md, section 8) and an exact
resume:

- Readers: each of the `world_size x num_workers` DataLoader workers reads its own stream of shards
  (`stream = rank * num_workers + worker`). Without resampling every stream needs a shard of its own: fewer shards
  than streams is an error naming both counts (webdataset would stall or repeat data, open_clip issues #480, #703).
- Never ends: shards are dealt out anew every epoch (a permutation seeded by (seed, epoch); stream s takes every
  `num_streams`-th shard from position s), epoch after epoch. With `resampled=True` each stream instead draws shards
  with replacement, seeded by (seed, stream): a run is a number of steps, not epochs; `shard_weights` (open_clip's
  upsampling factors, one per shard from `data.source_weights`) make some shards likelier than others.
- Anywhere: shards are local files, fsspec URLs (byte-range reads, so the resume below seeks inside a remote shard)
  or `pipe:` commands (`mmsoftmoe.data.sources`); failed reads are retried, a shard that stays unreadable is
  skipped and logged, and too many of them (`max_unreadable_fraction`) stop the stream naming them. A truncated
  shard (no end-of-archive blocks) keeps the samples before the cut; the cut one is logged as truncated.
- Shuffle: each consecutive window of `shuffle_buffer` samples of a stream is permuted (seeded by (seed, stream,
  window)). A window holds encoded bytes, as webdataset's shuffle buffer does; unlike that buffer, which sample
  comes where is arithmetic, so a resume can seek to it.
- Exact resume: micro-batch `i` of a process is batch `i // num_workers` of its stream `i % num_workers`, and that
  batch is positions `[b*m, (b+1)*m)` of the stream (m = micro-batch size). Every sample is therefore a pure function
  of (seed, rank, worker, step): a run resumed at step s re-reads at most one shuffle window of bytes and the tar
  headers of the shards its streams have passed, instead of every sample consumed.
- Bad samples (unreadable image, empty caption; counted and logged by `_PairConverter`) are replaced by the next
  good sample after the batch, which still serves its own position later: positions never shift, and no batch holds
  one sample twice.
- Augmentation is seeded by (seed, stream, position), so it does not depend on the worker process.

Why not `datasets` or `webdataset`: neither can seek to a position inside a shuffled stream (a `datasets` stream's
`state_dict` drops its shuffle buffer and needs torchdata's stateful DataLoader; webdataset resumes by re-reading),
and `datasets` cannot resample shards. Shards are uncompressed tars read with `tarfile`; members are grouped into
samples by key as webdataset does (`dir/key.ext`: key up to the first dot of the file name, extension lowercased).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import numpy as np
import torch

from mmsoftmoe.data.pairs import (
    _WEBDATASET_IMAGE,
    MAX_IMAGE_PIXELS,
    Tokenizer,
    _PairConverter,
    collate,
)
from mmsoftmoe.data.shard_writer import TarShard, convert_to_shards, write_shards  # noqa: F401 - re-exported
from mmsoftmoe.data.sources import PIPE, Unreadable, list_items, open_shard, retrying, split_sources
from mmsoftmoe.data.transforms import seeded_augmentation

logger = logging.getLogger(__name__)

_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_MAX_LOOKAHEAD = 10_000  # samples searched for a replacement before the stream is declared unreadable
_END_OF_ARCHIVE = 1024  # two zero blocks close every tar archive
_WHOLE_SHARD = "(whole shard)"  # the key a skipped unreadable shard is logged under

Sample = tuple[str, dict[str, tuple[int, int]]]  # (key, {extension: (byte offset, size)})
Record = tuple[str, str, dict[str, bytes]]  # (shard path, key, {extension: bytes})


def _index(handle: IO[bytes]) -> tuple[list[Sample], str | None]:
    """The complete samples of an open tar shard in file order, from its member headers, and the key of a sample
    cut by truncation (None if the shard is whole).

    A shard is truncated when it lacks tar's end-of-archive blocks (a cut download or copy): the samples before the
    cut are kept and the last one, which may be missing members, is dropped as the cut one.
    """
    samples: list[Sample] = []
    end = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                match = _MEMBER_NAME.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (member.offset_data, member.size)
            handle.seek(tar.offset)
            whole = tar.offset + _END_OF_ARCHIVE <= end and handle.read(_END_OF_ARCHIVE) == bytes(_END_OF_ARCHIVE)
    except (tarfile.TarError, EOFError):  # a header cut in the middle
        whole = False
    if whole or not samples:
        return samples, None
    cut = samples.pop()
    return samples, cut[0]


def index_shard(path: str) -> list[Sample]:
    """The complete samples of a local uncompressed tar shard, in file order, read from its member headers only.

    A truncated shard keeps the samples before the cut, with a warning.
    """
    with open(path, "rb") as handle:
        samples, cut = _index(handle)
    if cut is not None:
        logger.warning("%s: truncated shard (no end-of-archive); read %d samples, sample %r is cut", path,
                       len(samples), cut)
    return samples


class _ShardReader:
    """Reads sample bytes from shards anywhere `open_shard` reaches, keeping the current shard's index and file open.

    Network errors (a reset connection, a 5xx answer, a timeout) are retried with growing delays and logged
    (`mmsoftmoe.data.sources.retrying`); a shard still unreadable after the retries is reported to
    `on_unreadable(shard, reason)` and read as empty. A truncated shard's cut sample goes to `on_truncated(shard, key)`.
    """

    def __init__(self, shards: list[str], storage_options: dict[str, Any] | None = None,
                 on_unreadable: Callable[[str, str], None] | None = None,
                 on_truncated: Callable[[str, str], None] | None = None) -> None:
        self.shards, self.storage_options = shards, storage_options
        self.on_unreadable = on_unreadable or (lambda shard, reason: None)
        self.on_truncated = on_truncated or (lambda shard, key: None)
        self.sizes: dict[int, int] = {}
        self._index: tuple[int, list[Sample]] = (-1, [])
        self._file: tuple[int, Any] = (-1, None)

    def _handle(self, shard: int) -> IO[bytes]:
        if self._file[0] != shard or self._file[1] is None:
            self._close()
            self._file = (shard, open_shard(self.shards[shard], self.storage_options))
        return self._file[1]

    def _close(self) -> None:
        if self._file[1] is not None:
            self._file[1].close()
        self._file = (-1, None)

    def _retrying(self, shard: int, what: str, action: Callable[[IO[bytes]], Any]) -> Any:
        """`action(file)` on shard `shard`, retried after transient errors; raises Unreadable when it gives up."""
        return retrying(lambda: action(self._handle(shard)), self.shards[shard], what, self._close)

    def samples(self, shard: int) -> list[Sample]:
        if self._index[0] != shard:
            try:
                samples, cut = self._retrying(shard, "reading the tar headers", _index)
            except Unreadable as err:
                self.on_unreadable(self.shards[shard], str(err))
                samples, cut = [], None
            if cut is not None:
                self.on_truncated(self.shards[shard], cut)
            self._index = (shard, samples)
            self.sizes[shard] = len(samples)
        return self._index[1]

    def size(self, shard: int) -> int:
        return self.sizes[shard] if shard in self.sizes else len(self.samples(shard))

    def read(self, shard: int, sample: Sample) -> Record:
        """The bytes of `sample`; empty fields if the shard became unreadable (reported, then passed over)."""
        def fields(handle: IO[bytes]) -> dict[str, bytes]:
            out = {}
            for ext, (offset, size) in sample[1].items():
                handle.seek(offset)
                out[ext] = handle.read(size)
                if len(out[ext]) != size:
                    raise OSError(f"read {len(out[ext])} of {size} bytes of {sample[0]}.{ext}")
            return out

        try:
            return self.shards[shard], sample[0], self._retrying(shard, f"reading sample {sample[0]!r}", fields)
        except Unreadable as err:
            self.on_unreadable(self.shards[shard], str(err))
            return self.shards[shard], sample[0], {}


def list_shards(source: str | os.PathLike | list[str | os.PathLike],
                storage_options: dict[str, Any] | None = None) -> list[str]:
    """The tar shards named by `source`: folders, globs, files, brace patterns (`{000..099}`), fsspec URLs or
    `pipe:` commands; a list, a comma list, or several sources joined by `::` (see `mmsoftmoe.data.sources`).

    Remote and brace-expanded shards are not stat'ed beyond the first of each source.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    shards = [shard for item in items for part in split_sources(str(item)) for shard in
              list_items(part, storage_options)]
    others = [s for s in shards if not s.startswith(PIPE) and not s.endswith(".tar")]
    if not shards or others:
        raise ValueError(f"streaming reads uncompressed WebDataset .tar shards, and {source!r} names "
                         f"{others[:3] or 'no .tar file'}; point data.source at .tar shards, or set "
                         "data.streaming=false for the other formats")
    return shards


class ShardStream(_PairConverter):
    """WebDataset shards for one process: what to read; `batches(...)` gives the DataLoader's dataset.

    Args:
        shards: the tar files (`list_shards`).
        image_column: image extensions, ";" between alternatives (the first present wins).
        caption_column: caption extension.
        transform: applied to each RGB PIL image.
        tokenizer: str -> LongTensor; None keeps captions as strings.
        rank: this process's rank.
        world_size: number of processes.
        resampled: draw shards with replacement (endless, no epochs) instead of shuffling them per epoch.
        shuffle_buffer: samples per shuffled window; 0 or 1 keeps the shard order.
        max_pixels: larger images are decoded reduced (JPEG) or skipped.
        skip_log: a JSON-lines file each skipped sample is appended to (see `count_skipped`).
        shard_weights: with `resampled`, the relative probability of drawing each shard (open_clip's upsampling
            factors, one per shard); None draws them uniformly.
        storage_options: fsspec options for remote shards (e.g. {"endpoint_url": ...} for S3).
        max_unreadable_fraction: unreadable shards (after retries) a reader passes over, as a fraction of all
            shards; one more stops the stream with a ValueError naming them.
    """

    def __init__(self, shards: list[str], *, image_column: str = _WEBDATASET_IMAGE, caption_column: str = "txt",
                 transform: Callable | None = None, tokenizer: Tokenizer | None = None, rank: int = 0,
                 world_size: int = 1, resampled: bool = False, shuffle_buffer: int = 0,
                 max_pixels: int = MAX_IMAGE_PIXELS, skip_log: str | os.PathLike | None = None,
                 shard_weights: Sequence[float] | None = None, storage_options: dict[str, Any] | None = None,
                 max_unreadable_fraction: float = 0.01) -> None:
        if not shards:
            raise ValueError("ShardStream needs at least one shard; list them with mmsoftmoe.data.list_shards")
        name = shards[0] + (f" (+{len(shards) - 1} more)" if len(shards) > 1 else "")
        super().__init__(image_column, caption_column, transform, tokenizer, name, max_pixels, skip_log)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.resampled, self.window = resampled, max(shuffle_buffer, 1)
        self.cumulative_weights = _cumulative(shard_weights, len(shards), resampled)
        self.storage_options, self.max_unreadable_fraction = storage_options, max_unreadable_fraction
        self.unreadable: set[str] = set()

    def _unreadable(self, shard: str, reason: str) -> None:
        """Count and log a shard that stayed unreadable; too many of them stop the stream, naming them."""
        self._skip(shard, _WHOLE_SHARD, f"unreadable shard: {reason}", bad_image=True)
        self.unreadable.add(shard)
        if len(self.unreadable) > self.max_unreadable_fraction * len(self.shards):
            names = sorted(self.unreadable)
            raise ValueError(f"{len(names)} of {len(self.shards)} shards are unreadable after retries, more than "
                             f"data.max_unreadable_shards={self.max_unreadable_fraction:g} of them: "
                             f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; check the URLs, the "
                             "storage endpoint and credentials, or raise data.max_unreadable_shards")

    def _truncated(self, shard: str, key: str) -> None:
        self._skip(shard, key, "truncated shard: the sample is cut (the tar has no end-of-archive)", bad_image=True)

    def reader(self) -> _ShardReader:
        """A reader of this stream's shards that reports unreadable shards and cut samples here."""
        return _ShardReader(self.shards, self.storage_options, self._unreadable, self._truncated)

    def batches(self, micro_batch: int, num_workers: int, seed: int, start_batch: int = 0) -> ShardBatches:
        """The endless DataLoader dataset of this process's micro-batches, from micro-batch `start_batch` on."""
        streams = self.world_size * max(num_workers, 1)
        if not self.resampled and len(self.shards) < streams:
            raise ValueError(
                f"{self.name}: {len(self.shards)} shard(s) for {self.world_size} process(es) x "
                f"{max(num_workers, 1)} data worker(s) = {streams} readers; each reader needs a shard of its own. "
                f"Write at least {streams} shards (many more is better), lower data.num_workers, or set "
                "data.resampled=true (shards drawn with replacement)")
        return ShardBatches(self, micro_batch, max(num_workers, 1), seed, start_batch)

    def shard_sequence(self, stream: int, num_streams: int, seed: int) -> Iterator[int]:
        """The endless shard order of `stream`: drawn with replacement, or dealt from a per-epoch permutation."""
        if self.resampled:
            rng = np.random.default_rng([seed, stream])
            while True:
                if self.cumulative_weights is None:
                    yield int(rng.integers(len(self.shards)))
                else:
                    yield int(np.searchsorted(self.cumulative_weights, rng.random(), side="right"))
        for epoch in itertools.count():
            yield from np.random.default_rng([seed, epoch]).permutation(len(self.shards))[stream::num_streams].tolist()

    def references(self, reader: _ShardReader, shards: Iterator[int], start: int) -> Iterator[tuple[int, Sample]]:
        """(shard, sample) from position `start` of the stream, skipping earlier shards by their size alone."""
        empty_in_a_row = 0
        for shard in shards:
            size = reader.size(shard)
            empty_in_a_row = empty_in_a_row + 1 if size == 0 else 0
            if empty_in_a_row > len(self.shards):
                raise ValueError(f"{self.name}: {empty_in_a_row} shards in a row hold no samples; check the shards")
            if start >= size:
                start -= size
                continue
            for sample in reader.samples(shard)[start:]:
                yield shard, sample
            start = 0

    def records(self, stream: int, num_streams: int, seed: int, start: int) -> Iterator[tuple[int, Record]]:
        """(position, record) of `stream` from position `start`, each shuffle window read once, then permuted."""
        reader = self.reader()
        window, offset = divmod(start, self.window)
        refs = self.references(reader, self.shard_sequence(stream, num_streams, seed), window * self.window)
        while True:
            raw = [reader.read(shard, sample) for shard, sample in itertools.islice(refs, self.window)]
            order = np.random.default_rng([seed, stream, window]).permutation(self.window)
            for j in range(offset, self.window):
                yield window * self.window + j, raw[order[j]]
            window, offset = window + 1, 0

    def sample(self, record: Record, stream: int, position: int, seed: int) -> dict[str, Any] | None:
        """The decoded, transformed sample of `record`, augmented as slot (stream, position) always is; or None."""
        shard, key, fields = record
        if not fields:  # its shard became unreadable: already counted
            return None
        example = {ext: data.decode("utf-8", "replace") if ext == self.caption_column else data
                   for ext, data in fields.items()}
        example["__key__"] = key
        with seeded_augmentation(seed, stream, position):
            return self.convert(example, default_key=key, source=shard)

    def stream_batches(self, stream: int, num_streams: int, micro_batch: int, seed: int,
                       first_batch: int) -> Iterator[dict[str, Any]]:
        """Collated batches `first_batch`, `first_batch + 1`, ... of `stream`; bad samples replaced by look-ahead."""
        records = self.records(stream, num_streams, seed, first_batch * micro_batch)
        ahead: collections.deque[tuple[int, Record]] = collections.deque()
        while True:
            taken = [ahead.popleft() if ahead else next(records) for _ in range(micro_batch)]
            samples = [self.sample(record, stream, position, seed) for position, record in taken]
            spare = 0
            for i, (position, _) in enumerate(taken):
                while samples[i] is None:
                    if spare == _MAX_LOOKAHEAD:
                        raise ValueError(f"{self.name}: none of {_MAX_LOOKAHEAD} samples after position {position} "
                                         "of a stream is readable; check the shards and data.image_column")
                    while len(ahead) <= spare:
                        ahead.append(next(records))
                    samples[i] = self.sample(ahead[spare][1], stream, position, seed)
                    spare += 1
            yield collate(samples)


def _cumulative(weights: Sequence[float] | None, num_shards: int, resampled: bool) -> np.ndarray | None:
    """The normalised cumulative shard weights (for drawing by `searchsorted`), checked; None when uniform."""
    if weights is None:
        return None
    if not resampled:
        raise ValueError("data.source_weights need data.resampled=true: without resampling every shard is read once "
                         "per epoch, so each source is read in proportion to its shards")
    weights_S = np.asarray(weights, dtype=np.float64)
    if weights_S.shape != (num_shards,) or not np.isfinite(weights_S).all() or (weights_S < 0).any() or \
            weights_S.sum() <= 0:
        raise ValueError(f"shard weights must be {num_shards} finite non-negative numbers with a positive sum "
                         "(data.source_weights: one per '::' source)")
    cumulative = np.cumsum(weights_S / weights_S.sum())
    cumulative[-1] = 1.0
    return cumulative


class ShardBatches(torch.utils.data.IterableDataset):
    """The micro-batches of one process (`ShardStream.batches`), for `DataLoader(batch_size=None)`.

    DataLoader worker w serves micro-batches `start_batch + w`, `+ num_workers`, ... (the DataLoader takes them from
    its workers in turn), i.e. stream `(start_batch + w) % num_workers` of this process from its batch
    `(start_batch + w) // num_workers` on.
    """

    def __init__(self, stream: ShardStream, micro_batch: int, num_workers: int, seed: int, start_batch: int) -> None:
        self.stream, self.micro_batch, self.num_workers = stream, micro_batch, num_workers
        self.seed, self.start_batch = seed, start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_workers:
            raise ValueError(f"built for {self.num_workers} DataLoader worker(s), iterated by {workers}; pass "
                             f"num_workers={self.num_workers} to the DataLoader")
        first = self.start_batch + worker
        stream = self.stream.rank * workers + first % workers
        yield from self.stream.stream_batches(stream, self.stream.world_size * workers, self.micro_batch, self.seed,
                                              first // workers)

"""WebDataset tar shards as an endless, shuffled, exactly resumable stream of training batches.

The streaming mode of training (`data.streaming=true`, the mode the paper-scale configs use), with what open_clip's
users rely on (its `--dataset-resampled`, shard split by node and worker; docs/design.md, section 8) and an exact
resume:

- Readers: each of the `world_size x num_workers` DataLoader workers reads its own stream of shards
  (`stream = rank * num_workers + worker`). Without resampling every stream needs a shard of its own: fewer shards
  than streams is an error naming both counts (webdataset would stall or repeat data, open_clip issues #480, #703).
- Never ends: shards are dealt out anew every epoch (a permutation seeded by (seed, epoch); stream s takes every
  `num_streams`-th shard from position s), epoch after epoch. With `resampled=True` each stream instead draws shards
  with replacement, seeded by (seed, stream): a run is a number of steps, not epochs.
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
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from mmsoftmoe.data.pairs import (
    _WEBDATASET_IMAGE,
    MAX_IMAGE_PIXELS,
    Tokenizer,
    _PairConverter,
    collate,
    expand_source,
)

logger = logging.getLogger(__name__)

_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_MAX_LOOKAHEAD = 10_000  # samples searched for a replacement before the stream is declared unreadable

Sample = tuple[str, dict[str, tuple[int, int]]]  # (key, {extension: (byte offset, size)})
Record = tuple[str, str, dict[str, bytes]]  # (shard path, key, {extension: bytes})


def index_shard(path: str) -> list[Sample]:
    """The samples of an uncompressed tar shard, in file order, read from its member headers only.

    A shard that ends early (a cut download) keeps the samples before the break, with a warning.
    """
    samples: list[Sample] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                match = _MEMBER_NAME.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError, OSError) as err:
        logger.warning("%s: read %d samples, then the shard could not be read further (%s)", path, len(samples), err)
    return samples


class _ShardReader:
    """Reads sample bytes from shards, keeping the current shard's index and file open."""

    def __init__(self, shards: list[str]) -> None:
        self.shards = shards
        self.sizes: dict[int, int] = {}
        self._index: tuple[int, list[Sample]] = (-1, [])
        self._file: tuple[int, Any] = (-1, None)

    def samples(self, shard: int) -> list[Sample]:
        if self._index[0] != shard:
            self._index = (shard, index_shard(self.shards[shard]))
            self.sizes[shard] = len(self._index[1])
        return self._index[1]

    def size(self, shard: int) -> int:
        return self.sizes[shard] if shard in self.sizes else len(self.samples(shard))

    def read(self, shard: int, sample: Sample) -> Record:
        if self._file[0] != shard:
            if self._file[1] is not None:
                self._file[1].close()
            self._file = (shard, open(self.shards[shard], "rb"))
        handle, fields = self._file[1], {}
        for ext, (offset, size) in sample[1].items():
            handle.seek(offset)
            fields[ext] = handle.read(size)
        return self.shards[shard], sample[0], fields


def list_shards(source: str | os.PathLike | list[str | os.PathLike]) -> list[str]:
    """The tar files named by `source`: a folder, a glob pattern, a file, or a list of them, sorted within each."""
    shards = []
    for path in expand_source(source):
        shards.extend(sorted(map(str, path.glob("*.tar"))) if path.is_dir() else [str(path)])
    others = [s for s in shards if not s.endswith(".tar")]
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
    """

    def __init__(self, shards: list[str], *, image_column: str = _WEBDATASET_IMAGE, caption_column: str = "txt",
                 transform: Callable | None = None, tokenizer: Tokenizer | None = None, rank: int = 0,
                 world_size: int = 1, resampled: bool = False, shuffle_buffer: int = 0,
                 max_pixels: int = MAX_IMAGE_PIXELS, skip_log: str | os.PathLike | None = None) -> None:
        if not shards:
            raise ValueError("ShardStream needs at least one shard; list them with mmsoftmoe.data.list_shards")
        name = shards[0] + (f" (+{len(shards) - 1} more)" if len(shards) > 1 else "")
        super().__init__(image_column, caption_column, transform, tokenizer, name, max_pixels, skip_log)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.resampled, self.window = resampled, max(shuffle_buffer, 1)

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
                yield int(rng.integers(len(self.shards)))
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
        reader = _ShardReader(self.shards)
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
        example = {ext: data.decode("utf-8", "replace") if ext == self.caption_column else data
                   for ext, data in fields.items()}
        example["__key__"] = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([seed, stream, position]).generate_state(1)[0]))
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

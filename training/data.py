"""Training data: the pair dataset of a run config, and loaders whose batches are a pure function of the step.

Map-style data: `StepSampler` decides, from (seed, step) alone, which samples every process sees at every optimizer
step: step s takes positions [s*B, (s+1)*B) of a sequence of per-epoch permutations, each cut to a whole number of
global batches (open_clip's drop_last), so a batch never holds a pair twice; process r gets the r-th slice of that
global batch, cut into `grad_accum_steps` micro-batches. A batch larger than the dataset is refused unless
`allow_repeats` (then the permutations follow one another uncut). Augmentations are seeded per (seed, epoch, index)
(`SeededSamples`), so they do not depend on worker processes or on where the run was resumed.

Streaming data (`data.streaming=true`, WebDataset shards): `mmsoftmoe.data.ShardStream` gives every DataLoader worker
of every process its own endless stream (shards shuffled per epoch or resampled, a seeded shuffle window) in which
micro-batch i is a pure function of (seed, rank, worker, i).

Either way a run resumed at step s reads exactly the batches an uninterrupted run would, with nothing to save but
the step; one process with batch B sees the same global batch as W processes with B/W each (map-style; a stream's
order depends on the number of processes and workers, so resume with the same ones). Skipped samples are appended
to `skip_log` by whichever process meets them; `mmsoftmoe.data.count_skipped(skip_log)` is the distinct count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmsoftmoe.data import (
    PairDataset,
    ShapesCaptions,
    ShardStream,
    collate,
    list_shards,
    load_pairs,
    transforms_from_preprocess_cfg,
)
from mmsoftmoe.data.sources import split_commas, split_sources
from mmsoftmoe_training.config import DataConfig

PREFETCH_FACTOR = 4  # batches each DataLoader worker prepares ahead


def micro_batch_size(global_batch: int, world_size: int, grad_accum_steps: int) -> int:
    """Samples per micro-batch of one process; the global batch must split evenly."""
    if global_batch % (world_size * grad_accum_steps):
        raise ValueError(f"batch_size={global_batch} must be divisible by processes x grad_accum_steps = "
                         f"{world_size} x {grad_accum_steps}")
    return global_batch // (world_size * grad_accum_steps)


class StepSampler(Sampler[list[tuple[int, int]]]):
    """Micro-batches of (index, epoch) for one process, for optimizer steps `start_step` .. `total_steps - 1`."""

    def __init__(self, num_samples: int, global_batch: int, grad_accum_steps: int, rank: int, world_size: int,
                 seed: int, start_step: int, total_steps: int, allow_repeats: bool = False) -> None:
        self.micro = micro_batch_size(global_batch, world_size, grad_accum_steps)
        if global_batch > num_samples and not allow_repeats:
            raise ValueError(
                f"batch_size={global_batch} is larger than the dataset ({num_samples} samples): every batch would "
                "hold some pairs twice, and the contrastive loss would count true matches as negatives. Lower "
                f"batch_size to at most {num_samples}, add data, or set data.allow_repeats_in_batch=true")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.accum, self.rank, self.world_size = grad_accum_steps, rank, world_size
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        # Positions per epoch: whole global batches (no batch spans two epochs), or all samples when repeating.
        self.epoch_length = num_samples - num_samples % global_batch if global_batch <= num_samples else num_samples
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)}
        return self._perms[epoch]

    def step_indices(self, step: int) -> list[tuple[int, int]]:
        """This process's share of the global batch of `step`."""
        per_rank = self.global_batch // self.world_size
        start = step * self.global_batch + self.rank * per_rank
        out = []
        for pos in range(start, start + per_rank):
            epoch, offset = divmod(pos, self.epoch_length)
            out.append((int(self._permutation(epoch)[offset]), epoch))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            indices = self.step_indices(step)
            for j in range(self.accum):
                yield indices[j * self.micro:(j + 1) * self.micro]

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum


class SeededSamples(Dataset):
    """Wraps a map-style dataset so sample (index, epoch) draws its augmentation from its own seed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: see mmsoftmoe.data.shards.ShardStream.sample
            return self.dataset[index]


def build_pair_dataset(cfg: DataConfig, preprocess_cfg: dict, tokenizer: Callable, rank: int, world_size: int,
                       skip_log: str | os.PathLike | None = None) -> PairDataset | ShardStream:
    """The training pairs of `cfg`: map-style, or a `ShardStream` of this process's shards when streaming.

    `skip_log`: the file skipped samples are appended to (the run folder's `mmsoftmoe.data.SKIP_LOG_NAME`).
    """
    train_tf, _ = transforms_from_preprocess_cfg(preprocess_cfg, scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
                                                 aug_cfg=cfg.aug_cfg())
    common = dict(transform=train_tf, tokenizer=tokenizer, max_pixels=cfg.max_image_pixels, skip_log=skip_log)
    if cfg.source == "shapes":
        size = preprocess_cfg["size"]
        size = size if isinstance(size, int) else size[0]
        shapes = ShapesCaptions(cfg.num_samples, image_size=size, seed=cfg.image_seed)
        return PairDataset(shapes, name="shapes", **common)
    if cfg.streaming:
        if cfg.format not in (None, "webdataset"):
            raise ValueError(f"data.streaming=true reads WebDataset shards, not data.format={cfg.format!r}; set "
                             "data.streaming=false (the other formats are read through a memory-mapped Arrow cache)")
        return build_shard_stream(cfg, rank, world_size, **common)
    if "::" in cfg.source or cfg.source_weights is not None:
        raise ValueError("several sources joined by '::' (and data.source_weights) are read by data.streaming=true "
                         "only; join map-style sources with commas")
    sources = [s for s in split_commas(cfg.source) if s]
    return load_pairs(sources if len(sources) > 1 else sources[0], cfg.format, image_column=cfg.image_column,
                      caption_column=cfg.caption_column, csv_separator=cfg.csv_separator, cache_dir=cfg.cache_dir,
                      **common)


def build_shard_stream(cfg: DataConfig, rank: int, world_size: int, **common) -> ShardStream:
    """The `ShardStream` of `cfg.source`: its `::` sources listed, each shard weighted by its source's weight."""
    options = _storage_options(cfg.storage_options)
    groups = [list_shards(part, options) for part in split_sources(cfg.source)]
    weights = None
    if cfg.source_weights is not None:
        if len(cfg.source_weights) != len(groups):
            raise ValueError(f"data.source_weights has {len(cfg.source_weights)} value(s) for {len(groups)} "
                             "'::'-joined source(s) in data.source; give one weight per source")
        weights = [w for group, w in zip(groups, cfg.source_weights, strict=True) for _ in group]
    columns = {k: v for k, v in (("image_column", cfg.image_column), ("caption_column", cfg.caption_column)) if v}
    return ShardStream([shard for group in groups for shard in group], rank=rank, world_size=world_size,
                       resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer, shard_weights=weights,
                       storage_options=options, max_unreadable_fraction=cfg.max_unreadable_shards, **columns, **common)


def _storage_options(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"data.storage_options is not JSON ({err}): give e.g. "
                         '\'{"endpoint_url": "http://127.0.0.1:9000"}\'') from None
    if not isinstance(options, dict):
        raise ValueError(f"data.storage_options must be a JSON object of fsspec options, got {text!r}")
    return options


def _user_errors_unwrapped(batches: Iterator[dict]) -> Iterator[dict]:
    """`batches`, with a user error raised in a DataLoader worker (which the DataLoader re-raises with the worker's
    traceback in its message) re-raised as its own one-line message, as in the main process."""
    try:
        yield from batches
    except (ValueError, FileNotFoundError) as err:
        text = str(err)
        if not text.startswith("Caught ") or "Original Traceback" not in text:
            raise
        last = text.rstrip().splitlines()[-1]
        raise type(err)(last.split(": ", 1)[1] if ": " in last else last) from None


def build_train_loader(dataset: PairDataset | ShardStream, *, global_batch: int, grad_accum_steps: int, rank: int,
                       world_size: int, seed: int, start_step: int, total_steps: int, num_workers: int,
                       pin_memory: bool, allow_repeats: bool = False) -> Iterator[dict]:
    """An iterator over this process's micro-batches, from optimizer step `start_step` on.

    Map-style: exactly `(total_steps - start_step) * grad_accum_steps` micro-batches; streaming: endless.
    """
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
                  prefetch_factor=PREFETCH_FACTOR if num_workers else None)
    if isinstance(dataset, ShardStream):
        micro = micro_batch_size(global_batch, world_size, grad_accum_steps)
        batches = dataset.batches(micro, num_workers, seed, start_batch=start_step * grad_accum_steps)
        return _user_errors_unwrapped(iter(DataLoader(batches, batch_size=None, **common)))
    sampler = StepSampler(len(dataset), global_batch, grad_accum_steps, rank, world_size, seed, start_step,
                          total_steps, allow_repeats)
    return iter(DataLoader(SeededSamples(dataset, seed), batch_sampler=sampler, collate_fn=collate, **common))

"""Training data: the pair dataset of a run config, and a step-indexed sampler that makes resume step-exact.

`StepSampler` decides, from (seed, step) alone, which samples every process sees at every optimizer step: step s
takes positions [s*B, (s+1)*B) of an endless sequence of per-epoch permutations; process r gets the r-th slice of
that global batch, cut into `grad_accum_steps` micro-batches. A run resumed at step s therefore reads exactly the
batches an uninterrupted run would, and one process with batch B sees the same global batch as W processes with
B/W each. Augmentations are seeded per (seed, epoch, index) (`SeededSamples`), so they do not depend on worker
processes or on where the run was resumed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmsoftmoe.data import PairDataset, ShapesCaptions, collate, load_pairs, transforms_from_preprocess_cfg
from training.config import DataConfig


class StepSampler(Sampler[list[tuple[int, int]]]):
    """Micro-batches of (index, epoch) for one process, for optimizer steps `start_step` .. `total_steps - 1`."""

    def __init__(self, num_samples: int, global_batch: int, grad_accum_steps: int, rank: int, world_size: int,
                 seed: int, start_step: int, total_steps: int) -> None:
        if global_batch % (world_size * grad_accum_steps):
            raise ValueError(f"batch_size={global_batch} must be divisible by processes x grad_accum_steps = "
                             f"{world_size} x {grad_accum_steps}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.accum, self.rank, self.world_size = grad_accum_steps, rank, world_size
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
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
            epoch, offset = divmod(pos, self.num_samples)
            out.append((int(self._permutation(epoch)[offset]), epoch))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro = self.global_batch // (self.world_size * self.accum)
        for step in range(self.start_step, self.total_steps):
            indices = self.step_indices(step)
            for j in range(self.accum):
                yield indices[j * micro:(j + 1) * micro]

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
            torch.manual_seed(seed)
            return self.dataset[index]


def build_pair_dataset(cfg: DataConfig, preprocess_cfg: dict, tokenizer: Callable, rank: int, world_size: int):
    """The training pairs of `cfg`: map-style unless streaming (then already split across processes)."""
    train_tf, _ = transforms_from_preprocess_cfg(preprocess_cfg, scale=tuple(cfg.crop_scale), hflip=cfg.hflip)
    if cfg.source == "shapes":
        size = preprocess_cfg["size"]
        size = size if isinstance(size, int) else size[0]
        shapes = ShapesCaptions(cfg.num_samples, image_size=size, seed=cfg.image_seed)
        return PairDataset(shapes, transform=train_tf, tokenizer=tokenizer, name="shapes")
    sources = [s for s in cfg.source.split(",") if s]
    return load_pairs(sources if len(sources) > 1 else sources[0], cfg.format, image_column=cfg.image_column,
                      caption_column=cfg.caption_column, streaming=cfg.streaming, rank=rank,
                      world_size=world_size, transform=train_tf, tokenizer=tokenizer)


def build_train_loader(dataset, *, global_batch: int, grad_accum_steps: int, rank: int, world_size: int,
                       seed: int, start_step: int, total_steps: int, num_workers: int, pin_memory: bool):
    """An iterator over this process's micro-batches, starting at optimizer step `start_step`."""
    common = dict(num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate,
                  persistent_workers=False, prefetch_factor=4 if num_workers else None)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        # A stream is resumed by skipping the micro-batches already consumed (deterministic without shuffling).
        micro = global_batch // (world_size * grad_accum_steps)
        loader = DataLoader(dataset, batch_size=micro, drop_last=True, **common)
        return itertools.islice(iter(loader), start_step * grad_accum_steps, None)
    sampler = StepSampler(len(dataset), global_batch, grad_accum_steps, rank, world_size, seed, start_step,
                          total_steps)
    return iter(DataLoader(SeededSamples(dataset, seed), batch_sampler=sampler, **common))

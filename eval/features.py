"""The one inference loop every evaluator uses, its DataLoader helper and an on-disk feature cache.

Follows dinov2's evaluation layout (one ``extract_features`` shared by kNN, linear and few-shot evaluators) and
CLIP_benchmark's practice of caching features per model so that a second probe on them is near-instant.

Devices: pass either an ``accelerate.Accelerator`` (the loader is then sharded across processes and the features are
gathered with ``gather_for_metrics``, under the accelerator's mixed precision) or a plain ``torch.device``; nothing is
hard-coded to CUDA.

Cache: features are stored as safetensors under ``root`` keyed by three caller-given strings: a *model* fingerprint,
a *dataset* fingerprint and the *split*. The fingerprints are opaque to this module; they must change whenever the
features would, e.g. ``model = f"{sha256_file(ckpt)}:image:bf16"`` (checkpoint hash, tower, autocast dtype) and
``dataset = "folder:/data/imagenet:224-center-crop"`` (dataset spec plus preprocessing). The cache always holds the
raw (un-normalised) features; ``normalize=True`` is applied after loading, so raw and normalised probes share it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmsoftmoe.console import progress_bar

logger = logging.getLogger(__name__)

UNREADABLE_LABEL = -1
"""Label of a sample that could not be read (also HF's "no label"); ``extract_features`` drops such rows."""

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class FeatureCacheKey:
    """Where the features of one (model, dataset, split) live on disk.

    Attributes:
        root: Cache directory.
        model: Model fingerprint, e.g. checkpoint hash plus tower and precision (see the module docstring).
        dataset: Dataset fingerprint, e.g. dataset spec plus preprocessing.
        split: Split name, e.g. ``"train"``.
    """

    root: Path
    model: str
    dataset: str
    split: str

    @property
    def path(self) -> Path:
        digest = hashlib.sha256(f"{self.model}\0{self.dataset}\0{self.split}".encode()).hexdigest()[:24]
        return Path(self.root) / f"{digest}.safetensors"

    def with_split(self, split: str) -> FeatureCacheKey:
        """Returns the key of another split of the same model and dataset."""
        return dataclasses.replace(self, split=split)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, a ready-made model fingerprint for a checkpoint."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def load_cached(key: FeatureCacheKey) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Returns the cached ``(features, labels)`` for ``key``, or None when absent."""
    if not key.path.is_file():
        return None
    tensors = load_file(key.path)
    return tensors["features"], tensors.get("labels")


def save_cached(key: FeatureCacheKey, features: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Writes ``(features, labels)`` for ``key`` atomically (a crash never leaves a half-written entry)."""
    key.path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": features.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    metadata = {"model": key.model, "dataset": key.dataset, "split": key.split}
    tmp = key.path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, key.path)


def resolve_device(device: torch.device | str | None, accelerator: Accelerator | None) -> torch.device:
    """The device to compute on: the accelerator's, else ``device``, else CPU."""
    if device is not None and accelerator is not None:
        raise ValueError("Pass either `device` or `accelerator`, not both: the accelerator already chose a device.")
    if accelerator is not None:
        return accelerator.device
    return torch.device(device) if device is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts ``model`` in eval mode for the block and restores its previous mode (evaluators run mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    *,
    device: torch.device | str | None = None,
    shuffle: bool = False,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """An inference DataLoader: ordered, pinned memory when feeding a GPU, persistent workers when there are any.

    Args:
        dataset: Map-style dataset yielding inputs or ``(inputs, label)``.
        batch_size: Samples per batch.
        num_workers: Worker processes; 0 loads in the main process.
        device: The device the batches go to; pinning is only worth it for CUDA.
        shuffle: Shuffle the order (evaluation normally keeps it).
        collate_fn: Custom collate function; PyTorch's default when None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=device is not None and torch.device(device).type == "cuda",
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
    )


def _split_batch(batch: torch.Tensor | tuple | list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, labels)`` from a bare tensor, a 1-tuple ``(inputs,)`` or a pair ``(inputs, labels)``."""
    if not isinstance(batch, (tuple, list)):
        return batch, None
    return batch[0], (torch.as_tensor(batch[1]) if len(batch) > 1 else None)


def _autocast(
    accelerator: Accelerator | None, device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    if accelerator is not None:
        return accelerator.autocast()
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _gather(
    accelerator: Accelerator, features: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All processes' rows, without the duplicates padding the last batch (``gather_for_metrics``)."""
    if labels is None:
        return accelerator.gather_for_metrics(features), None
    features, labels = accelerator.gather_for_metrics((features, labels.to(features.device)))
    return features, labels


def _run_loop(
    encode_fn: EncodeFn,
    batches: Iterable,
    device: torch.device,
    accelerator: Accelerator | None,
    autocast_dtype: torch.dtype | None,
    progress: tqdm,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    features, labels = [], []
    # no_grad, not inference_mode: FSDP2 (a sharded model) cannot gather parameters into inference tensors.
    with torch.no_grad():
        for batch in batches:
            inputs, batch_labels = _split_batch(batch)
            with _autocast(accelerator, device, autocast_dtype):
                out = encode_fn(inputs.to(device, non_blocking=True))
            out = out.float()
            if accelerator is not None:
                out, batch_labels = _gather(accelerator, out, batch_labels)
            features.append(out.cpu())
            if batch_labels is not None:
                labels.append(batch_labels.cpu())
            progress.update(len(out))
    return features, labels


def _drop_unreadable(
    features: torch.Tensor, labels: torch.Tensor | None, desc: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if labels is None:
        return features, None
    keep = labels != UNREADABLE_LABEL
    num_skipped = int((~keep).sum())
    if num_skipped:
        logger.warning("%s: skipped %d unreadable sample(s) of %d (label %d: an image that failed to decode, or a "
                       "Hugging Face row without a label).", desc, num_skipped, len(labels), UNREADABLE_LABEL)
    return features[keep], labels[keep]


def extract_features(
    encode_fn: EncodeFn,
    loader: DataLoader,
    *,
    device: torch.device | str | None = None,
    accelerator: Accelerator | None = None,
    normalize: bool = False,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "features",
    cache: FeatureCacheKey | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encodes every batch of ``loader``: the one inference loop shared by all evaluators.

    Args:
        encode_fn: Maps an input batch on ``device`` to ``[b, e]`` features, e.g. ``model.encode_image``.
            The caller puts the model in eval mode (see ``eval_mode``) and on the device.
        loader: Yields input tensors, ``(inputs,)`` or ``(inputs, labels)``. Rows labelled ``UNREADABLE_LABEL`` are
            dropped and counted in a warning. With an accelerator, the loader is sharded across processes here.
        device: Device to run on when no accelerator is given (CPU when neither is).
        accelerator: Supplies the device, the process sharding and the mixed precision.
        normalize: L2-normalise the features (after the cache: it always holds raw features).
        autocast_dtype: Autocast dtype without an accelerator, e.g. ``torch.bfloat16``; None runs in full precision.
        desc: Progress-bar label.
        cache: Where to read the features from, or write them to after computing them; None disables caching.

    Returns:
        ``features`` of shape ``[N, e]`` (float32, CPU) and ``labels`` of shape ``[N]`` (or None for unlabelled
        inputs), in loader order.
    """
    cached = load_cached(cache) if cache is not None else None
    if cached is None:
        cached = _compute(encode_fn, loader, device, accelerator, autocast_dtype, desc)
        if cache is not None and (accelerator is None or accelerator.is_main_process):
            save_cached(cache, *cached)
        if cache is not None and accelerator is not None:
            # Every process then finds the entry when it next looks, and all take the same branch (a sharded
            # model's forward is collective: a process computing alone would wait forever).
            accelerator.wait_for_everyone()
    else:
        logger.info("%s: loaded %d cached features from %s", desc, len(cached[0]), cache.path)
    features, labels = cached
    return (F.normalize(features, dim=-1) if normalize else features), labels


def _compute(
    encode_fn: EncodeFn,
    loader: DataLoader,
    device: torch.device | str | None,
    accelerator: Accelerator | None,
    autocast_dtype: torch.dtype | None,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = resolve_device(device, accelerator)
    batches = accelerator.prepare_data_loader(loader) if accelerator is not None else loader
    show = accelerator is None or accelerator.is_local_main_process
    total = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
    start = time.perf_counter()
    with progress_bar(total=total, desc=desc, unit="sample", show=show) as progress:
        features, labels = _run_loop(encode_fn, batches, device, accelerator, autocast_dtype, progress)
    if not features:
        raise ValueError(f"{desc}: the loader yielded no batches; check that the dataset is not empty.")
    seconds = time.perf_counter() - start
    num = sum(len(f) for f in features)
    logger.info("%s: %d samples in %.1f s (%.1f samples/s)", desc, num, seconds, num / max(seconds, 1e-9))
    return _drop_unreadable(torch.cat(features), torch.cat(labels) if labels else None, desc)

"""CLIP_benchmark's ``wds/`` datasets (the form its zero-shot classification and retrieval sets are shared in), offline.

The layout (CLIP_benchmark 1.6.2, ``clip_benchmark/datasets/builder.py``, ``build_wds_dataset``)::

    ROOT/classnames.txt                           one class name per line, in label order (classification)
    ROOT/zeroshot_classification_templates.txt    one prompt per line, with ``{c}`` for the class name
                                                  (optional: "a photo of a {c}." without it)
    ROOT/dataset_type.txt                         optional: ``retrieval`` (else classification)
    ROOT/{split}/nshards.txt                      the shard count N
    ROOT/{split}/0.tar .. {N-1}.tar               samples: an image (``.webp``, ``.png``, ``.jpg``, ``.jpeg``, the
                                                  first present in that order) and ``.cls`` (an integer label) or
                                                  ``.txt`` (captions, one per line)

A sample is the run of tar members sharing a key (webdataset's rule: the path up to the first dot of the file name).
``WdsDataset`` indexes the shards once with the library's ``mmsoftmoe.data.shards.index_shard`` (``tarfile``, no
``webdataset`` dependency; a cut shard keeps the samples before the break, with a warning) and reads each image by its
byte offset, so it is a map-style dataset: the evaluators' loaders, caches and fine-tuning take it like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmsoftmoe_eval.datasets import DEFAULT_TEMPLATES, Transform, _open_rgb, _sample
from mmsoftmoe_eval.prompts import read_entries
from mmsoftmoe.data.shards import index_shard

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
TYPE_FILE = "dataset_type.txt"


def is_retrieval(root: str | Path) -> bool:
    """Whether ``ROOT/dataset_type.txt`` says ``retrieval`` (CLIP_benchmark's default is classification)."""
    path = Path(root) / TYPE_FILE
    return path.is_file() and path.read_text().strip().lower() == "retrieval"


def shard_paths(root: str | Path, split: str) -> list[Path]:
    """``ROOT/{split}/0.tar .. {N-1}.tar`` with N from ``nshards.txt``; a clear error if any is missing."""
    split_dir = Path(root) / split
    count_file = split_dir / "nshards.txt"
    if not count_file.is_file():
        raise FileNotFoundError(f"No {count_file}: a wds dataset needs ROOT/<split>/nshards.txt holding the shard "
                                "count (CLIP_benchmark's wds layout).")
    count = count_file.read_text().strip()
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"{count_file} holds {count!r}, not a shard count: write the number of .tar files in it.")
    shards = [split_dir / f"{i}.tar" for i in range(int(count))]
    missing = [str(shard) for shard in shards if not shard.is_file()]
    if missing:
        raise FileNotFoundError(f"{count_file} lists {len(shards)} shard(s) but {missing[:3]} are missing.")
    return shards


def _read(shard: Path, span: tuple[int, int]) -> bytes:
    """The bytes of one tar member from its ``(offset, size)`` (``index_shard``'s record)."""
    with shard.open("rb") as file:
        file.seek(span[0])
        return file.read(span[1])


class WdsDataset(torch.utils.data.Dataset):
    """One split of a CLIP_benchmark wds dataset: ``(image, label)`` items, or images with ``captions`` for retrieval.

    Args:
        root: The dataset folder (holding ``classnames.txt`` and the split folders).
        split: Split folder, e.g. ``"test"``.
        transform: Applied to each RGB PIL image.
    """

    def __init__(self, root: str | Path, split: str, transform: Transform | None = None) -> None:
        self.root, self.transform = Path(root), transform
        self.retrieval = is_retrieval(root)
        target = "txt" if self.retrieval else "cls"
        self.items: list[tuple[Path, tuple[int, int]]] = []  # (shard, image member's (offset, size))
        targets: list[bytes] = []
        for shard in shard_paths(root, split):
            for key, members in index_shard(str(shard)):
                image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
                if image is None or target not in members:
                    raise ValueError(f"{shard}: sample {key!r} lacks an image ({'/'.join(IMAGE_EXTENSIONS)}) "
                                     f"or its .{target}; every sample needs both.")
                self.items.append((shard, image))
                targets.append(_read(shard, members[target]))
        self.captions = [text.decode().splitlines() for text in targets] if self.retrieval else None
        self.labels = None if self.retrieval else [int(text.decode().strip()) for text in targets]
        self.classnames = self.templates = None
        if not self.retrieval:
            if not (self.root / "classnames.txt").is_file():
                raise FileNotFoundError(f"No {self.root / 'classnames.txt'}: a wds classification dataset needs one "
                                        "class name per line there, in label order.")
            self.classnames = read_entries(self.root / "classnames.txt", self.root.name)
            templates = self.root / "zeroshot_classification_templates.txt"
            found = read_entries(templates, self.root.name) if templates.is_file() else list(DEFAULT_TEMPLATES)
            self.templates = [template.replace("{c}", "{}") for template in found]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        image = _open_rgb(_read(*self.items[index]))
        if self.retrieval:
            return _sample(image, 0, self.transform)[0]
        return _sample(image, self.labels[index], self.transform)


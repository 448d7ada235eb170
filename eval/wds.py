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
``webdataset`` dependency) and reads each image by its byte offset, so it is a map-style dataset: the evaluators'
loaders, caches and fine-tuning take it like any other. Evaluation data is whole or refused: a shard without tar's
end-of-archive blocks (cut, even at a sample boundary) and a ``.cls`` that is not a label of ``classnames.txt`` are
errors naming the shard (and the sample key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmsoftmoe.data.shards import index_shard
from mmsoftmoe_eval.images import Transform, labelled_image, open_rgb
from mmsoftmoe_eval.prompts import DEFAULT_TEMPLATES, read_entries

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
TYPE_FILE = "dataset_type.txt"
TAR_BLOCK = 512  # a tar archive is 512-byte blocks and ends with two zero blocks (POSIX ustar)


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


def check_complete(shard: Path, samples: list) -> None:
    """Refuse a shard that does not end with tar's two zero blocks right after its last member (``samples``:
    ``index_shard``'s records): the file was cut, which a tar reader cannot tell from its end at a sample boundary.
    """
    end = max((offset + -(-size // TAR_BLOCK) * TAR_BLOCK for _, members in samples
               for offset, size in members.values()), default=0)
    with shard.open("rb") as file:
        file.seek(end)
        tail = file.read(2 * TAR_BLOCK)
    if len(tail) < 2 * TAR_BLOCK or tail.count(0) != len(tail):
        raise ValueError(f"{shard} is truncated: no end-of-archive blocks after its last complete sample "
                         f"({len(samples)} read); the file was cut (an interrupted copy or download): fetch it again")


def _label(text: bytes, shard: Path, key: str, num_classes: int) -> int:
    """A ``.cls`` member's class index; an error names the shard and sample when it is not one."""
    try:
        label = int(text.decode().strip())
    except (UnicodeDecodeError, ValueError):
        label = -1
    if not 0 <= label < num_classes:
        raise ValueError(f"{shard}: sample {key!r} has .cls {text[:40]!r}, not a class index in [0, {num_classes}) "
                         "(classnames.txt has one line per class)")
    return label


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
        targets: list[tuple[bytes, Path, str]] = []  # (.cls/.txt bytes, shard, key)
        for shard in shard_paths(root, split):
            samples = index_shard(str(shard))
            check_complete(shard, samples)
            for key, members in samples:
                image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
                if image is None or target not in members:
                    raise ValueError(f"{shard}: sample {key!r} lacks an image ({'/'.join(IMAGE_EXTENSIONS)}) "
                                     f"or its .{target}; every sample needs both.")
                self.items.append((shard, image))
                targets.append((_read(shard, members[target]), shard, key))
        self.captions = [text.decode().splitlines() for text, _, _ in targets] if self.retrieval else None
        self.labels = self.classnames = self.templates = None
        if not self.retrieval:
            if not (self.root / "classnames.txt").is_file():
                raise FileNotFoundError(f"No {self.root / 'classnames.txt'}: a wds classification dataset needs one "
                                        "class name per line there, in label order.")
            self.classnames = read_entries(self.root / "classnames.txt", self.root.name)
            self.labels = [_label(text, shard, key, len(self.classnames)) for text, shard, key in targets]
            templates = self.root / "zeroshot_classification_templates.txt"
            found = read_entries(templates, self.root.name) if templates.is_file() else list(DEFAULT_TEMPLATES)
            self.templates = [template.replace("{c}", "{}") for template in found]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        image = open_rgb(_read(*self.items[index]))
        if self.retrieval:
            return labelled_image(image, 0, self.transform)[0]
        return labelled_image(image, self.labels[index], self.transform)


"""Classification datasets for evaluation, each with ``classnames`` and prompt ``templates``, built from a spec string.

Kinds (``build_dataset(spec, split, transform)``):

- ``folder:ROOT[:CLASSES.json]``: the ImageNet layout ``ROOT/<split>/<class>/*.jpg`` (torchvision's ``ImageFolder``),
  or class folders directly, ``ROOT/<class>/*.jpg`` (ImageNet's ``val/<wnid>/``), which serve as any split.
  Class names come from the JSON mapping (folder name -> name, or Keras' ``{"0": [wnid, name]}``), else, for exactly
  the 1000 ImageNet WordNet-id folders, from open_clip's ``IMAGENET_CLASSNAMES`` with the OpenAI ImageNet templates
  (CLIP, Radford et al. 2021), else from the folder names.
- ``hf:PATH[:IMAGE_COLUMN:LABEL_COLUMN]``: a Hugging Face ``datasets`` split with an ``Image`` column and a
  ``ClassLabel`` column (names from the ``ClassLabel``), read offline from ``save_to_disk`` output, a parquet/arrow
  file, or a folder of data files; ``{split}`` in PATH is replaced by the split name.
- ``digits``: scikit-learn's ``load_digits`` (8x8 grey, shipped inside the package), as RGB images that the model's
  preprocessing upsamples to its resolution; a fixed split of 360 test and 1437 train images.
- ``shapes``: the generated shapes of ``mmsoftmoe.data.synthetic`` (imported lazily).
- ``wds:ROOT``: CLIP_benchmark's ``wds/`` layout (``eval.wds``), classification or, with ``dataset_type.txt`` saying
  ``retrieval``, image-caption retrieval.

Class names and templates can come from files (``eval.prompts``): passed to ``build_dataset``, or found next to the
data as ``classnames.txt`` / ``zeroshot_classification_templates.txt``.

Unreadable images are not fatal: such a sample yields a black placeholder labelled ``UNREADABLE_LABEL``, which
``eval.features.extract_features`` drops and counts.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from mmsoftmoe_eval.images import Transform, labelled_image, open_rgb
from mmsoftmoe_eval.prompts import DEFAULT_TEMPLATES, apply_text_files

logger = logging.getLogger(__name__)

IMAGENET_TEMPLATES = tuple(template("{}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ('a photo of the number: "{}".',)  # CLIP_benchmark's MNIST template
DIGITS_TEST_SIZE = 360
SHAPES_SPLITS = {"train": (2000, 1), "test": (500, 2)}  # split -> (num_samples, seed)
SPEC_HELP = "digits, shapes, folder:ROOT[:CLASSES.json], hf:PATH[:IMAGE_COLUMN:LABEL_COLUMN], wds:ROOT"


class ClassificationDataset(Protocol):
    """What the evaluators need from a dataset: ``(image, label)`` items, class names and prompt templates."""

    classnames: list[str]
    templates: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Any, int]: ...


def load_class_map(path: str | Path) -> dict[str, str]:
    """Folder name -> class name from JSON: ``{"n01440764": "tench"}`` or Keras' ``{"0": ["n01440764", "tench"]}``."""
    raw = json.loads(Path(path).read_text())
    if isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
        return raw
    if isinstance(raw, dict) and all(isinstance(v, list) and len(v) == 2 for v in raw.values()):
        return {str(folder): str(name) for folder, name in raw.values()}
    raise ValueError(f"{path}: expected a JSON object of folder -> name, or index -> [folder, name].")


def _folder_classnames(folders: list[str], class_map: str | Path | None) -> tuple[list[str], list[str]]:
    """Class names and templates for the class folders (see the module docstring for the rules)."""
    if class_map is not None:
        mapping = load_class_map(class_map)
        missing = [folder for folder in folders if folder not in mapping]
        if missing:
            raise ValueError(f"{class_map} has no name for class folder(s) {missing[:5]}: add them to the mapping.")
        return [mapping[folder] for folder in folders], list(DEFAULT_TEMPLATES)
    is_imagenet = len(folders) == len(open_clip.IMAGENET_CLASSNAMES) and all(
        re.fullmatch(r"n\d{8}", folder) for folder in folders
    )
    if is_imagenet:
        return list(open_clip.IMAGENET_CLASSNAMES), list(IMAGENET_TEMPLATES)
    return [folder.replace("_", " ") for folder in folders], list(DEFAULT_TEMPLATES)


class ImageFolderDataset(ImageFolder):
    """``root/<split>/<class>/*.jpg``, or ``root/<class>/*.jpg`` (one split, e.g. ImageNet's ``val/<wnid>/``), read
    by torchvision's ``ImageFolder``, with class names, templates and safe decoding.

    Args:
        root: Dataset root holding one folder per split, or the class folders themselves.
        split: Split folder name, e.g. ``"train"`` or ``"val"``; unused when ``root`` holds the class folders.
        transform: Applied to each RGB PIL image.
        class_map: Optional JSON file naming the class folders (see ``load_class_map``).
    """

    def __init__(
        self, root: str | Path, split: str, transform: Transform | None = None, class_map: str | Path | None = None
    ) -> None:
        split_dir = _split_folder(Path(root), split)
        super().__init__(split_dir, transform=transform, allow_empty=True)
        empty = sorted(set(self.classes) - {self.classes[label] for label in self.targets})
        if empty:
            raise ValueError(f"Class folder(s) {empty[:5]} in {split_dir} hold no images: add images or remove them.")
        self.classnames, self.templates = _folder_classnames(self.classes, class_map)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return labelled_image(open_rgb(path), label, self.transform)


class HFClassificationDataset(torch.utils.data.Dataset):
    """A Hugging Face ``datasets.Dataset`` with an ``Image`` column and a ``ClassLabel`` column.

    Args:
        dataset: The split, in memory or memory-mapped.
        image_column: Name of the ``Image`` column.
        label_column: Name of the ``ClassLabel`` column.
        transform: Applied to each RGB PIL image.
    """

    def __init__(
        self, dataset: Any, image_column: str = "image", label_column: str = "label", transform: Transform | None = None
    ) -> None:
        import datasets

        for column in (image_column, label_column):
            if column not in dataset.column_names:
                raise ValueError(f"No column {column!r}; the dataset has {dataset.column_names}.")
        if not isinstance(dataset.features[label_column], datasets.ClassLabel):
            raise ValueError(
                f"Column {label_column!r} is {dataset.features[label_column]}, not a ClassLabel: cast it with "
                f"dataset.cast_column({label_column!r}, datasets.ClassLabel(names=[...]))."
            )
        if not isinstance(dataset.features[image_column], datasets.Image):
            raise ValueError(f"Column {image_column!r} is {dataset.features[image_column]}, not a datasets.Image.")
        self.classnames = list(dataset.features[label_column].names)
        self.templates = list(DEFAULT_TEMPLATES)
        # Decode here rather than in `datasets`, so that an unreadable image is skipped instead of raising.
        self.dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.image_column, self.label_column, self.transform = image_column, label_column, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.dataset[index]
        encoded = row[self.image_column]
        image = open_rgb(encoded["bytes"] if encoded["bytes"] is not None else encoded["path"])
        return labelled_image(image, row[self.label_column], self.transform)


def load_hf_split(path: str | Path, split: str) -> Any:
    """One split of a local Hugging Face dataset, offline.

    Args:
        path: ``save_to_disk`` output (a ``DatasetDict`` or one split's ``Dataset``), a ``.parquet``/``.arrow`` file
            holding one split, or a folder of data files that ``datasets.load_dataset`` splits by file name.
            ``{split}`` is replaced by ``split``.
        split: Split name.
    """
    import datasets

    path = Path(str(path).replace("{split}", split))
    if not path.exists():
        raise FileNotFoundError(f"No Hugging Face dataset at {path}.")
    if path.is_file():
        if path.suffix not in (".parquet", ".arrow"):
            raise ValueError(f"{path}: a single-file dataset must be .parquet or .arrow.")
        return datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} has no split {split!r}; it has {list(loaded)}.")
            return loaded[split]
        return loaded
    return datasets.load_dataset(str(path), split=split)


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images uint8 [n, 8, 8] in 0..255, labels [n])`` for a fixed train/test split.

    The split is a seeded permutation (numpy ``default_rng(0)``): its first 360 images are the test split.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test', not {split!r}.")
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    index = np.sort(order[:DIGITS_TEST_SIZE] if split == "test" else order[DIGITS_TEST_SIZE:])
    images = np.round(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target[index]


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's 8x8 digits as RGB PIL images; pass the model's preprocessing to upsample them.

    Args:
        split: ``"train"`` or ``"test"``.
        transform: Applied to each 8x8 RGB PIL image.
    """

    def __init__(self, split: str, transform: Transform | None = None) -> None:
        self.classnames, self.templates = list(DIGIT_NAMES), list(DIGIT_TEMPLATES)
        self.images, self.labels = digits_split(split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        return labelled_image(image, int(self.labels[index]), self.transform)


def _build_shapes(split: str, transform: Transform | None) -> ClassificationDataset:
    from mmsoftmoe.data.synthetic import ShapesClassification

    if split not in SHAPES_SPLITS:
        raise ValueError(f"shapes has splits {list(SHAPES_SPLITS)}, not {split!r}.")
    num_samples, seed = SHAPES_SPLITS[split]
    return ShapesClassification(num_samples, seed=seed, transform=transform)


def _holds_class_folders(root: Path) -> bool:
    """Whether ``root``'s subfolders hold images themselves (class folders), not further folders (splits)."""
    return any(path.is_file() and path.suffix.lower() in IMG_EXTENSIONS
               for folder in root.iterdir() if folder.is_dir() for path in folder.iterdir())


def _split_folder(root: Path, split: str) -> Path:
    """``root/split`` when it exists, else ``root`` itself when it holds the class folders (one split)."""
    if (root / split).is_dir():
        return root / split
    if root.is_dir() and _holds_class_folders(root):
        logger.info("%s holds class folders, not split folders: it is the %r split", root, split)
        return root
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else None
    hint = f"it has splits {found}" if found is not None else "the root does not exist"
    raise FileNotFoundError(f"No split folder {root / split} ({hint}); expected ROOT/<split>/<class>/<image> or "
                            "ROOT/<class>/<image>.")


def _build_folder(arg: str, split: str, transform: Transform | None) -> ClassificationDataset:
    root, class_map = _folder_parts(arg)
    return ImageFolderDataset(root, split, transform, class_map)


def _build_hf(arg: str, split: str, transform: Transform | None) -> ClassificationDataset:
    parts = arg.split(":")
    if len(parts) not in (1, 3):
        raise ValueError(f"Bad hf spec 'hf:{arg}': use hf:PATH or hf:PATH:IMAGE_COLUMN:LABEL_COLUMN.")
    columns = parts[1:] if len(parts) == 3 else ["image", "label"]
    return HFClassificationDataset(load_hf_split(parts[0], split), *columns, transform=transform)


def _build_wds(arg: str, split: str, transform: Transform | None) -> ClassificationDataset:
    from mmsoftmoe_eval.wds import WdsDataset

    return WdsDataset(arg, split, transform)


def _folder_root(spec: str) -> Path | None:
    """The folder next to which ``classnames.*`` / templates files are looked for (``folder:`` and ``hf:`` specs)."""
    kind, _, arg = spec.partition(":")
    if kind == "folder":
        return Path(_folder_parts(arg)[0])
    if kind == "hf":
        path = Path(arg.split(":")[0])
        return path if path.is_dir() else path.parent
    return None


def _folder_parts(arg: str) -> tuple[str, str | None]:
    root, sep, class_map = arg.rpartition(":")
    return (root, class_map) if sep and class_map.endswith(".json") else (arg, None)


def dataset_name(spec: str) -> str:
    """A short name for tables and legends: the last folder of a path spec (``wds:/data/cifar10`` -> ``cifar10``)."""
    kind, _, arg = spec.partition(":")
    if not arg:
        return spec
    path = Path(_folder_parts(arg)[0] if kind == "folder" else arg.split(":")[0])
    return path.stem if path.suffix in (".parquet", ".arrow") else path.name or spec


def build_dataset(
    spec: str,
    split: str,
    transform: Transform | None = None,
    *,
    classnames_file: str | Path | None = None,
    templates_file: str | Path | None = None,
) -> ClassificationDataset:
    """A classification dataset from a spec string (kinds listed in the module docstring).

    Args:
        spec: e.g. ``"digits"``, ``"shapes"``, ``"folder:/data/imagenet"``, ``"hf:/data/food101:image:label"``,
            ``"wds:/data/wds_cifar10"``.
        split: Split name, e.g. ``"train"``, ``"test"``, ``"val"``.
        transform: Image preprocessing, e.g. the model's eval transform.
        classnames_file: Class names (``eval.prompts`` formats) replacing the dataset's own.
        templates_file: Prompt templates replacing the dataset's own.
    """
    kind, _, arg = spec.partition(":")
    builders: dict[str, Callable[[str, str, Transform | None], ClassificationDataset]] = {
        "digits": lambda _, s, t: DigitsDataset(s, t),
        "shapes": lambda _, s, t: _build_shapes(s, t),
        "folder": _build_folder,
        "hf": _build_hf,
        "wds": _build_wds,
    }
    if kind not in builders:
        raise ValueError(f"Unknown dataset kind {kind!r} in {spec!r}; valid specs: {SPEC_HELP}.")
    if bool(arg) != (kind in ("folder", "hf", "wds")):
        raise ValueError(f"Bad dataset spec {spec!r}; valid specs: {SPEC_HELP}.")
    dataset = builders[kind](arg, split, transform)
    if getattr(dataset, "classnames", None) is None:  # a retrieval set: no classes to name
        return dataset
    return apply_text_files(dataset, dataset_name(spec), _folder_root(spec), classnames_file, templates_file)

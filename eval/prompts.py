"""Class names and zero-shot prompt templates from files, for any classification dataset, in CLIP_benchmark's formats.

- ``.txt``: one entry per line, as the ``classnames.txt`` / ``zeroshot_classification_templates.txt`` of
  CLIP_benchmark's wds datasets.
- ``.json``: a list, or a mapping from dataset name to a list, as CLIP_benchmark's ``--custom_classname_file`` /
  ``--custom_template_file`` (``en_classnames.json``); the entry is looked up by the dataset's name (the last folder
  of its path; for a ``wds_<name>`` folder also ``<name>``, as CLIP_benchmark's files spell it).

Templates mark the class name with ``{c}`` (CLIP_benchmark) or ``{}`` (open_clip); both are accepted. Files named
``classnames.txt`` / ``zeroshot_classification_templates.txt`` (or ``.json``) next to the data are used when present
(``folder:ROOT``: in ROOT; ``hf:PATH``: in PATH or, for a file, its folder); files passed explicitly take precedence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_TEMPLATES = ("a photo of a {}.",)  # a dataset with no templates of its own

CLASSNAMES_STEM = "classnames"
TEMPLATES_STEM = "zeroshot_classification_templates"


def lookup_keys(name: str) -> tuple[str, ...]:
    """Keys a JSON mapping may file a dataset under: its name and, for CLIP_benchmark's ``wds_<name>`` folders, the
    name CLIP_benchmark's own files use (``wds_cifar10`` -> ``cifar10``)."""
    return tuple(dict.fromkeys((name, name.removeprefix("wds_"))))


def read_entries(path: str | Path, dataset: str) -> list[str]:
    """The entries of a ``.txt`` or ``.json`` file (see the module docstring); ``dataset`` picks a JSON mapping's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No file {path}: pass a .txt (one entry per line) or .json list of names/templates.")
    if path.suffix != ".json":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    raw: Any = json.loads(path.read_text())
    if isinstance(raw, dict):
        key = next((key for key in lookup_keys(dataset) if key in raw), None)
        if key is None:
            raise ValueError(f"{path} maps dataset names to lists but has no entry {dataset!r} (it has "
                             f"{sorted(raw)[:8]}): add one, or pass a file for this dataset only.")
        raw = raw[key]
    if not (isinstance(raw, list) and raw and all(isinstance(entry, str) for entry in raw)):
        raise ValueError(f"{path}: expected a non-empty JSON list of strings (or a mapping of dataset -> list).")
    return raw


def file_next_to(root: Path | None, stem: str) -> Path | None:
    """``root/<stem>.txt`` or ``root/<stem>.json`` if one exists."""
    if root is None:
        return None
    return next((root / f"{stem}{ext}" for ext in (".txt", ".json") if (root / f"{stem}{ext}").is_file()), None)


def apply_text_files(dataset: Any, dataset_name: str, root: Path | None, classnames_file: str | Path | None,
                     templates_file: str | Path | None) -> Any:
    """Sets ``dataset.classnames`` / ``.templates`` from the given files, else from files in ``root``, if any.

    Args:
        dataset: A classification dataset with ``classnames`` and ``templates``.
        dataset_name: Key into JSON mappings.
        root: Folder searched for ``classnames.*`` / ``zeroshot_classification_templates.*``; None searches nowhere.
        classnames_file: Explicit class-names file, one name per class in label order.
        templates_file: Explicit templates file.
    """
    classnames_file = classnames_file or file_next_to(root, CLASSNAMES_STEM)
    templates_file = templates_file or file_next_to(root, TEMPLATES_STEM)
    if classnames_file is not None:
        names = read_entries(classnames_file, dataset_name)
        if len(names) != len(dataset.classnames):
            raise ValueError(f"{classnames_file} lists {len(names)} class names but {dataset_name} has "
                             f"{len(dataset.classnames)} classes: give one name per class, in label order.")
        dataset.classnames = names
    if templates_file is not None:
        dataset.templates = [t.replace("{c}", "{}") for t in read_entries(templates_file, dataset_name)]
    return dataset

"""Atomic export folders: everything is written into a temporary folder beside the target, then renamed.

A failure mid-export removes the temporary folder, so no half-written export is ever left at the target, and an
existing target is replaced only when asked (`overwrite`), after the new folder is complete.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that exists (unless `overwrite`) or that is not a folder."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"export target {target} exists and is not a folder")
    if target.exists() and not overwrite:
        raise FileExistsError(f"export folder {target} already exists; pass --overwrite (overwrite=True) to replace it")


@contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `target` when the block completes without error."""
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(target, "tmp")
    try:
        yield tmp
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing target is moved aside first and deleted after."""
    if not target.exists():
        tmp.rename(target)
        return
    old = sibling(target, "old")
    target.rename(old / target.name)
    tmp.rename(target)
    shutil.rmtree(old)


def sibling(target: Path, kind: str) -> Path:
    """A new empty hidden folder beside `target` (same file system, so renames are atomic; umask permissions)."""
    folder = target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    return folder

"""Publishing a folder atomically and durably: the one writer behind the trainer's checkpoints and the exports.

A writer fills a temporary folder beside the target (same file system, so a rename is atomic), then
`publish_folder` flushes every file and folder in it to disk, renames it into place (an existing target is moved
aside first and deleted only once the new folder is in place) and flushes the parent folder. A power loss or kill
at any point leaves either the old folder or the complete new one under the target's name, never a renamed but
empty or half-written one. Naming the temporary folders and cleaning up what a killed writer leaves stay with the
callers (`mmsoftmoe_training.checkpointing`, `mmsoftmoe.staging`), whose folders differ (one shared by every
process of a run; one per exporting process).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mmsoftmoe.checkpoint import fsync_dir


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk, then every folder's entries (the files' names)."""
    paths = sorted(folder.rglob("*"))
    for path in (p for p in paths if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for sub in (folder, *(p for p in paths if p.is_dir())):
        fsync_dir(sub)


def publish_folder(tmp: Path, target: Path, aside: Path | None = None) -> None:
    """Make the complete folder `tmp` become `target`, durably; an existing `target` is renamed to `aside` while
    the new one moves in, then deleted (`aside` must not exist and must be on `target`'s file system)."""
    fsync_tree(tmp)
    if target.exists():
        if aside is None:
            raise FileExistsError(f"{target} exists and no folder to move it aside to was given")
        target.rename(aside)
    tmp.rename(target)
    fsync_dir(target.parent)
    if aside is not None and aside.exists():
        shutil.rmtree(aside)

"""Atomic output folders of the commands that write one (`mmsoftmoe export`, `mmsoftmoe consolidate`): everything is
written into a temporary folder beside the target, flushed to disk and renamed (`mmsoftmoe.atomic.publish_folder`,
the trainer's checkpoint writer too).

A failure mid-export removes the temporary folder, so no half-written export is ever left at the target, and an
existing target is replaced only when asked (`overwrite`), after the new folder is complete. A killed export cannot
clean up: its hidden siblings (`.<name>.tmp-<host>-<pid>-<id>`, each a full model copy, and `.<name>.old-...`
holding the previous export while it is swapped out) are found by `remove_stale_siblings` at the next export to the
same target, once their process is gone; a previous export caught mid-swap is put back.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmsoftmoe.atomic import publish_folder

logger = logging.getLogger("mmsoftmoe.export")


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
    """Publish `tmp` as `target` (flushed to disk first); an existing target waits in an `old` sibling meanwhile."""
    old = sibling(target, "old") if target.exists() else None
    publish_folder(tmp, target, aside=old / target.name if old else None)
    if old:
        old.rmdir()


def sibling(target: Path, kind: str) -> Path:
    """A new empty hidden folder beside `target` (same file system, so renames are atomic; umask permissions),
    named after this host and process so that a later export can tell whether its writer is still running."""
    folder = target.parent / f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    return folder


def remove_stale_siblings(target: str | Path) -> list[Path]:
    """Remove the temporary folders that killed exports to `target` left beside it (their process on this host is
    gone; other hosts' are left alone), putting back a previous export caught mid-swap; returns what was removed."""
    target = Path(target)
    removed = []
    for folder in sorted(target.parent.glob(f".{target.name}.*-*")):
        kind, host, pid = _parse_sibling(folder.name[len(target.name) + 2:])
        if kind not in ("tmp", "old") or host != socket.gethostname() or _process_alive(pid):
            continue
        if kind == "old" and (folder / target.name).is_dir() and not target.exists():
            (folder / target.name).rename(target)
            logger.warning("put back the previous export %s, moved aside by a killed export (pid %d)", target, pid)
        shutil.rmtree(folder)
        logger.warning("removed %s, left by a killed export to %s (pid %d)", folder, target, pid)
        removed.append(folder)
    return removed


def _parse_sibling(suffix: str) -> tuple[str, str, int]:
    """`tmp-<host>-<pid>-<id>` -> (kind, host, pid); ("", "", 0) for a name `sibling` did not make."""
    kind, _, rest = suffix.partition("-")
    host_pid, _, _ = rest.rpartition("-")
    host, _, pid = host_pid.rpartition("-")
    return (kind, host, int(pid)) if pid.isdigit() and host else ("", "", 0)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

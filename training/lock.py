"""One run per output folder: an exclusive lock on `output_dir/run.lock`, held for the run's life.

The lock is `fcntl.flock` on the open file, so the kernel releases it when the process ends, however it ends
(exit, exception, kill -9); the file also records the holder (host, pid, start time) so that a second run can say
who holds the folder. A clean exit empties the file; holder details found in a file whose lock is free are
therefore a stale lock, left by a run that died: it is reported and taken over. The file itself is never deleted
(deleting a lock file races with a process that has just opened it).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

LOCK_NAME = "run.lock"
logger = logging.getLogger("mmsoftmoe.train")


class RunLockedError(ValueError):
    """Another live run holds the output folder (a user error: the CLI prints it as one `error:` line)."""


def _holder(text: str) -> str:
    """'pid P on host H (started T)' from a lock file's content, or the raw text if it is not ours."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
    except (json.JSONDecodeError, KeyError, TypeError):
        return repr(text.strip()[:200])


@contextlib.contextmanager
def acquire_run_lock(output_dir: str | Path, main_process: bool = True) -> Iterator[None]:
    """Hold `output_dir`'s run lock for the block (created with the folder if needed); other processes of a
    multi-process run pass `main_process=False` and take nothing.

    Raises:
        RunLockedError naming the holder when another live run holds it, on every process of the run.
    """
    if not main_process:
        _share_refusal(None)
        yield
        return
    path = Path(output_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:  # "a+" does not truncate: the holder's details stay readable
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            _share_refusal(f"output_dir {output_dir} is in use by another run, {_holder(f.read())}: wait for it to "
                           "finish, stop it, or choose another output_dir")
        except OSError as err:  # a file system without locks (some network mounts): run, but say what is lost
            logger.warning("output_dir %s: cannot take the run lock (%s); a second run on this folder would not be "
                           "refused", output_dir, err)
            _share_refusal(None)
            yield
            return
        _share_refusal(None)
        f.seek(0)
        stale = f.read()
        if stale.strip():
            logger.warning("output_dir %s: taking over a stale lock left by %s, a run that ended without releasing "
                           "it", output_dir, _holder(stale))
        _write(f, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        try:
            yield
        finally:
            _write(f, "")  # released cleanly; the kernel drops the flock when the file closes


def _share_refusal(refusal: str | None) -> None:
    """Raise `RunLockedError(refusal)` on every process of the run when the main process (rank 0) was refused:
    the others would otherwise wait in their next collective for a peer that has exited, and fail with a
    traceback. Called on every process; a run without a process group has only the main one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise RunLockedError(refusal)


def _write(f, text: str) -> None:
    f.seek(0)
    f.truncate()
    f.write(text)
    f.flush()
    os.fsync(f.fileno())

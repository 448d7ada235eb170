"""Shard lists as open_clip and webdataset users write them, and opening one shard wherever it lives.

A `data.source` string is read the way open_clip reads `--train-data`:
- `::` joins several sources (open_clip's mixing syntax; `split_sources`), weighted by `data.source_weights`;
- within one source, commas outside braces separate items; each item is brace-expanded with the `braceexpand`
  package webdataset uses (`{00000..41455}` keeps its zero padding, `{a,b}` lists alternatives);
- an expanded item is a local file, folder (its `*.tar`) or glob; an fsspec URL (`s3://`, `gs://`, `https://`,
  `hf://`, any protocol fsspec knows, its package installed: see the `s3`, `gcs`, `http` extras); or
  `pipe:COMMAND`, a shell command writing the shard to stdout (`pipe:aws s3 cp s3://bucket/0.tar -`).

Listing is lazy where the network is: a brace-expanded list is not stat'ed shard by shard (a 41k-shard list costs
no request at start-up); only the first shard of each source is checked, so a wrong bucket or path fails at once.
A later shard that is missing or stays unreadable is skipped and counted by the reader (`ShardStream`).

`open_shard` opens a shard as a seekable binary file: local files directly, URLs through fsspec (reads are HTTP
byte-range requests, so a reader seeks inside a remote shard), and pipes by copying the command's output to a
temporary file (a pipe cannot seek: each opening re-runs the command and reads the shard from its start).
Credentials and endpoints come from the protocol's own configuration (for S3: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `~/.aws/config`) or from `storage_options` (`data.storage_options`).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec
from braceexpand import braceexpand

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_DELAYS = (0.2, 1.0, 4.0)  # seconds before the 2nd, 3rd and 4th try of a failed remote read
# Not worth a retry. A missing object is retried: fsspec's HTTP filesystem reports a dropped connection during its
# size probe as FileNotFoundError, so "missing" is believed only once the retries are spent.
PERMANENT_ERRORS = (PermissionError, IsADirectoryError)
_COMMA_OUTSIDE_BRACES = re.compile(r",(?![^{]*\})")
_GLOB_CHARS = "*?["
PIPE = "pipe:"


def split_sources(source: str) -> list[str]:
    """The sources of a `::`-joined source string (open_clip's syntax for mixing datasets)."""
    parts = source.split("::")
    if any(not part.strip() for part in parts):
        raise ValueError(f"data.source {source!r} has an empty part between '::'; give one source per part")
    return parts


def split_commas(source: str) -> list[str]:
    """The comma-separated items of a source, commas inside braces ({a,b}) kept."""
    return [item.strip() for item in _COMMA_OUTSIDE_BRACES.split(source)]


def is_url(item: str) -> bool:
    """A remote shard read through fsspec (`s3://...`, `https://...`), as opposed to a local path or a pipe."""
    return "://" in item and not item.startswith(("file://", PIPE))


def expand_items(source: str) -> Iterator[tuple[str, bool]]:
    """(item, brace-expanded?) for the comma-separated items of one source, in order; lazy, nothing is stat'ed."""
    for item in filter(None, split_commas(source)):
        yield from ((expanded, "{" in item) for expanded in braceexpand(item))


def _protocol_error(url: str, err: ImportError) -> ValueError:
    protocol = url.split("://", 1)[0]
    return ValueError(f"reading {url!r} needs fsspec's {protocol!r} protocol ({err}); install its package, e.g. "
                      "pip install 'mmsoftmoe[s3]' (s3://), 'mmsoftmoe[gcs]' (gs://), 'mmsoftmoe[http]' (https://)")


def _filesystem(url: str, storage_options: dict[str, Any]) -> Any:
    try:
        return fsspec.core.url_to_fs(url, **storage_options)[0]
    except ImportError as err:
        raise _protocol_error(url, err) from None


def _glob_remote(item: str, storage_options: dict[str, Any]) -> list[str]:
    fs = _filesystem(item, storage_options)
    protocol = item.split("://", 1)[0]
    return [found if "://" in found else f"{protocol}://{found}" for found in sorted(fs.glob(item))]


def _expand_local(item: str, from_braces: bool) -> list[str]:
    """A glob's matches, a folder's tars, or the path (not stat'ed when it came from a brace expansion)."""
    if any(c in item for c in _GLOB_CHARS):
        return sorted(glob.glob(item))
    if not from_braces and os.path.isdir(item):
        return sorted(glob.glob(os.path.join(glob.escape(item), "*.tar")))
    return [item] if from_braces or os.path.exists(item) else []


def list_items(source: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every shard of one source (no `::`): brace-expanded, globs matched, folders listed, nothing else stat'ed.

    Raises:
        FileNotFoundError: a glob or folder matches nothing, or the first shard does not exist.
    """
    options = storage_options or {}
    shards: list[str] = []
    for item, from_braces in expand_items(source):
        if item.startswith(PIPE):
            shards.append(item)
        elif is_url(item):
            shards.extend(_glob_remote(item, options) if any(c in item for c in _GLOB_CHARS) else [item])
        else:
            found = _expand_local(item, from_braces)
            if not found:
                raise FileNotFoundError(f"data.source: {item!r} matches no file; check the path (globs, braces "
                                        "{000..099} and comma lists are allowed)")
            shards.extend(found)
    if not shards:
        raise FileNotFoundError(f"data.source {source!r} names no shard")
    check_exists(shards[0], options)
    return shards


def check_exists(item: str, storage_options: dict[str, Any]) -> None:
    """Raise FileNotFoundError naming `item` if it is a local path or URL that does not exist (pipes pass), a
    ValueError if a URL stays unreachable after retries."""
    if item.startswith(PIPE):
        return
    try:
        if is_url(item):
            fs = _filesystem(item, storage_options)
            retrying(lambda: fs.info(item), item, "checking that it exists")
        elif not os.path.exists(item):
            raise Unreadable("missing") from FileNotFoundError(item)
    except Unreadable as err:
        if not isinstance(err.__cause__, FileNotFoundError):
            raise ValueError(f"data.source: {item!r} cannot be read ({err}); check the URL, the endpoint and "
                             "credentials (AWS_ENDPOINT_URL, data.storage_options)") from None
        raise FileNotFoundError(f"data.source: {item!r} does not exist; check the path or URL (and, for object "
                                "storage, the endpoint and credentials: AWS_ENDPOINT_URL, data.storage_options)") \
            from None


class Unreadable(Exception):
    """A read that failed for good: a missing object, or transient errors that outlasted the retries."""


def retrying(action: Callable[[], T], url: str, what: str, cleanup: Callable[[], None] = lambda: None) -> T:
    """`action()`, retried after transient errors (reset connections, 5xx answers, timeouts, apparently missing
    objects: any error but a permission or user error) with the delays `RETRY_DELAYS`, each retry logged;
    `cleanup()` runs after every failure (close the broken file). Raises Unreadable when it gives up, and a
    ValueError as it comes."""
    for attempt, delay in enumerate((*RETRY_DELAYS, None)):
        try:
            return action()
        except ValueError:  # a user error (a protocol without its package), not the shard's
            raise
        except PERMANENT_ERRORS as err:
            cleanup()
            raise Unreadable(f"{type(err).__name__}: {err}") from err
        except Exception as err:  # noqa: BLE001 - network stacks raise many types; all are retried, then given up
            cleanup()
            if delay is None:
                raise Unreadable(f"{type(err).__name__}: {err} ({attempt + 1} tries)") from err
            logger.warning("%s: %s failed (%s: %s); retry %d of %d in %.2g s", url, what, type(err).__name__, err,
                           attempt + 1, len(RETRY_DELAYS), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def open_shard(item: str, storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """`item` opened as a seekable binary file: a local file, an fsspec file (byte-range reads), or a pipe's output
    copied to a temporary file."""
    if item.startswith(PIPE):
        return _run_pipe(item[len(PIPE):])
    if is_url(item):
        try:
            return fsspec.open(item, "rb", **(storage_options or {})).open()
        except ImportError as err:
            raise _protocol_error(item, err) from None
    return open(item.removeprefix("file://"), "rb")


def _run_pipe(command: str) -> IO[bytes]:
    """The stdout of a shell command as a temporary file; a non-zero exit is an OSError with its stderr."""
    spool = tempfile.TemporaryFile()
    with subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        shutil.copyfileobj(proc.stdout, spool)
        stderr = proc.stderr.read().decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        spool.close()
        raise OSError(f"pipe:{command} exited with status {proc.returncode}: {stderr[-300:]}")
    spool.seek(0)
    return spool


def local_items_exist(source: str) -> None:
    """Check, without any network request, that the local items of a source string exist (the first of each
    brace expansion only); URLs and pipes are checked when read.

    Raises:
        ValueError: naming the first missing item and what `data.source` accepts.
    """
    for part in split_sources(source):
        for item in split_commas(part):
            first = next(iter(braceexpand(item)), "") if item else ""
            if not first or first.startswith(PIPE) or is_url(first) or glob.glob(first):
                continue
            raise ValueError(f"data.source: {first!r} does not exist (or matches no file); give a folder, a file, a "
                             "glob, a brace pattern ({000..099}), a URL (s3://, https://, ...), pipe:COMMAND, or "
                             "'shapes' (the built-in data)")

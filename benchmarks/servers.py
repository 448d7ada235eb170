"""Real storage servers on 127.0.0.1 for the data tests, the README tests and `benchmarks.loader_bench`, started and
stopped by them.

- `s3_server()`: moto's `ThreadedMotoServer`, an S3 API on a free loopback port; while it runs, the standard
  AWS_* variables point botocore / s3fs at it (endpoint, dummy credentials, region), as a user's would.
- `http_server(root)`: Python's `http.server` serving `root`, extended to honour `Range` (206 + Content-Range), as
  object stores and CDNs do; `fail_first` makes it drop the first connections of each file on purpose (to test
  retries), and `missing` names files it answers 404 for.

Each server binds 127.0.0.1 only, is bounded in time (threads are daemons, every socket has a timeout) and is
stopped when its context ends.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import os
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import boto3

_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """An S3 endpoint URL on loopback; AWS_ENDPOINT_URL and dummy credentials point clients at it meanwhile."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def upload(endpoint: str, bucket: str, prefix: str, files: list[str | Path]) -> list[str]:
    """Put `files` into s3://bucket/prefix/<name> (the bucket is created if needed); their URLs."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    urls = []
    for path in map(Path, files):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        urls.append(f"s3://{bucket}/{prefix}/{path.name}")
    return urls


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with `Range: bytes=a-b` honoured; drops or refuses requests as the server is told to."""

    timeout = _TIMEOUT_S

    def log_message(self, format: str, *args) -> None:  # quiet: the tests' output stays readable
        pass

    def send_head(self):
        name = self.path.lstrip("/").split("?")[0]
        self.server.requests[name] += 1
        if name in self.server.missing:
            self.send_error(404)
            return None
        if self.server.requests[name] <= self.server.fail_first:
            self.connection.shutdown(socket.SHUT_RDWR)  # a reset connection, as a flaky network gives
            self.close_connection = True
            return None
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if match is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, end = int(match.group(1)), min(int(match.group(2) or size - 1), size - 1)
        if start >= size:
            self.send_error(416)
            return None
        handle = open(path, "rb")
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return _Bounded(handle, end - start + 1)


class _Bounded:
    """A file cut to `length` bytes from its position (what copyfile sends for a range)."""

    def __init__(self, handle, length: int) -> None:
        self.handle, self.left = handle, length

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.handle.read(size)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.handle.close()


@contextlib.contextmanager
def http_server(root: str | Path, fail_first: int = 0,
                missing: tuple[str, ...] = ()) -> Iterator[http.server.ThreadingHTTPServer]:
    """An HTTP server for `root` on loopback honouring Range (`.url` its base URL, `.requests` the requests per
    file); each file's first `fail_first` requests are dropped, and the `missing` names answer 404."""
    handler = functools.partial(RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.requests, server.fail_first, server.missing = Counter(), fail_first, set(missing)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(_TIMEOUT_S)

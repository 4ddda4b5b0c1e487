"""A real S3 API on loopback for the object-store tests: moto's standalone server (not moto's
in-process mock), reached by s3fs, boto3 and Ray workers over HTTP like any S3 endpoint."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]  # what a process needs to reach it: botocore reads AWS_ENDPOINT_URL

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3(bucket: str = "medfm-test") -> Iterator[S3Server]:
    """Start moto's server on a free loopback port with one bucket, and point this process's
    environment (so also subprocesses and Ray workers started later) at it; undone on exit."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    forget_s3_clients()
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield S3Server(endpoint, bucket, env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        forget_s3_clients()
        server.stop()


def forget_s3_clients() -> None:
    """fsspec caches s3fs instances, which keep the endpoint they were made with: one made for
    an earlier server (another test module's) would call a closed port."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


class S3Reads:
    """Bytes and calls that returned object bytes from S3, counted at the s3fs layer while
    `counting()` is active: `_cat_file` (what cat, cat_ranges and zarr's ranged reads use),
    `S3File._fetch_range` (file objects, with their read-ahead) and `_get_file` (downloads).
    The class methods are wrapped, so every instance is seen (zarr opens its own)."""

    def __init__(self):
        self.bytes = self.calls = 0

    def add(self, nbytes: int) -> None:
        self.calls += 1
        self.bytes += nbytes

    @contextmanager
    def counting(self) -> Iterator[S3Reads]:
        import s3fs.core

        fs_cls, file_cls = s3fs.core.S3FileSystem, s3fs.core.S3File
        saved = fs_cls._cat_file, fs_cls._get_file, file_cls._fetch_range
        cat, get, fetch = saved

        async def _cat_file(fs, path, *a, **kw):
            out = await cat(fs, path, *a, **kw)
            self.add(len(out))
            return out

        async def _get_file(fs, rpath, lpath, *a, **kw):
            out = await get(fs, rpath, lpath, *a, **kw)
            self.add(os.path.getsize(lpath))
            return out

        def _fetch_range(f, start, end):
            out = fetch(f, start, end)
            self.add(len(out))
            return out

        fs_cls._cat_file, fs_cls._get_file = _cat_file, _get_file
        file_cls._fetch_range = _fetch_range
        try:
            yield self
        finally:
            fs_cls._cat_file, fs_cls._get_file, file_cls._fetch_range = saved

"""The embedded hub on any fsspec filesystem (the `fsspec` backend): memory://, s3://, gs://...

Same layout, revision ids, verification and push order as `LocalHub`, whose logic it runs; only
publishing differs. Object stores have no rename (fsspec's `mv` copies, then deletes, and
replacing a ref that way leaves a moment with no ref at all), but a single object upload becomes
visible whole or not at all. So every file is uploaded straight to its final name, and atomicity
comes from the order: blobs, then the revision record, then the ref, then the index. A reader
following a ref finds a complete revision; a push that dies half-way leaves the old ref.
"""

from __future__ import annotations

import os
from pathlib import Path

from .backend import HUB_BACKENDS
from .local import LocalHub


@HUB_BACKENDS.register("fsspec")
class FsspecHub(LocalHub):
    """A hub rooted at an fsspec URL; `storage_options` go to the filesystem (credentials...)."""

    def publish_file(self, local_file: str | Path, path: str) -> None:
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)  # folders exist on some stores
        self.fs.put_file(str(local_file), path)

    def publish_bytes(self, path: str, data: bytes) -> None:
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data)

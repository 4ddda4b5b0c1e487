"""Writers: `SampleWriter` stores samples (one per worker), `ShardSetWriter` adds the manifest.

Distributed jobs run one `SampleWriter` per task with a unique prefix and hand the returned rows
and files to the driver, which calls `write_manifest` once. Single-process users take
`ShardSetWriter`, which does both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medfm.io import get_fs, remove_temporaries

from .codecs import encode_npy, encode_png, png_encodable
from .manifest import HEADER_NAME, ROWS_NAME, write_manifest
from .schema import Sample, row_metadata_json, sample_row, to_json
from .tarshard import DEFAULT_SHARD_BYTES, TAR_DIR, ShardFile, TarShardWriter
from .volume import DEFAULT_CHUNKS, VOLUME_STORE, VolumeStoreWriter


def _little_endian(a: np.ndarray) -> np.ndarray:
    return a if a.dtype.byteorder in "<=|" else a.astype(a.dtype.newbyteorder("<"))


class SampleWriter:
    """Store samples as tar members (2D, signal, EHR) or Zarr groups (volumes); no manifest."""

    def __init__(
        self,
        root: str,
        prefix: str = "shard",
        *,
        shard_max_bytes: int = DEFAULT_SHARD_BYTES,
        chunks: tuple[int, int, int] = DEFAULT_CHUNKS,
        pyramid_levels: int = 0,
        image_encoding: str = "auto",
        storage_options: dict[str, Any] | None = None,
    ):
        if image_encoding not in ("auto", "npy", "png"):
            raise ValueError(f"image_encoding must be auto, npy or png, not {image_encoding!r}")
        self.fs, self.root = get_fs(root, **(storage_options or {}))
        self.fs.makedirs(self.root, exist_ok=True)
        self.prefix, self.chunks, self.image_encoding = prefix, chunks, image_encoding
        self.pyramid_levels = pyramid_levels  # volumes: downsampled NGFF levels (docs/storage.md)
        self.tars = TarShardWriter(self.fs, self.root, prefix, shard_max_bytes)
        self._volumes: VolumeStoreWriter | None = None
        self.rows: list[dict[str, Any]] = []
        self.volume_files: list[ShardFile] = []

    def write(self, sample: Sample) -> dict[str, Any]:
        """Store one sample; returns its manifest row."""
        sample.data = _little_endian(np.asarray(sample.data))
        if sample.label_map is not None:
            sample.label_map = _little_endian(np.asarray(sample.label_map))
        sample.validate()
        row = self._write_volume(sample) if sample.kind == "volume3d" else self._write_tar(sample)
        self.rows.append(row)
        return row

    def close(self) -> tuple[list[dict[str, Any]], list[ShardFile]]:
        """Finish the open shard; returns (rows, files) for `write_manifest`."""
        return self.rows, self.tars.close() + self.volume_files

    def abort(self) -> None:
        self.tars.abort()

    def _encode_image(self, arr: np.ndarray) -> tuple[str, bytes]:
        use_png = self.image_encoding == "png" or (
            self.image_encoding == "auto" and png_encodable(arr)
        )
        return ("png", encode_png(arr)) if use_png else ("npy", encode_npy(arr))

    def _write_tar(self, s: Sample) -> dict[str, Any]:
        payload_ext, payload = (
            self._encode_image(s.data) if s.kind == "image2d" else ("npy", encode_npy(s.data))
        )
        members = {payload_ext: payload}
        if s.label_map is not None:
            ext, data = self._encode_image(s.label_map)
            members[f"label.{ext}"] = data
        for name, arr in sorted(s.extras.items()):
            members[f"{name}.npy"] = encode_npy(_little_endian(np.asarray(arr)))
        # The .json member repeats the row's metadata so that plain WebDataset users see it.
        # The row is built (its JSON columns encoded) once; only its location is filled in.
        row = sample_row(s, storage="tar", shard="", member="", members={}, sha256="", nbytes=0)
        members["json"] = row_metadata_json(row).encode()
        shard, locs = self.tars.add(s.key, members)
        row.update(shard=shard, member=payload_ext, sha256=locs[payload_ext].sha256,
                   members=to_json({k: v.to_dict() for k, v in locs.items()}),
                   nbytes=sum(len(b) for b in members.values()))  # fmt: skip
        return row

    def _write_volume(self, s: Sample) -> dict[str, Any]:
        if self._volumes is None:
            self._volumes = VolumeStoreWriter(self.fs, self.root, self.chunks, self.pyramid_levels)
        shard, members, files = self._volumes.add(s)
        self.volume_files += files
        return sample_row(
            s,
            storage="zarr",
            shard=shard,
            member="image",
            members=members,
            sha256=members["image"]["sha256"],
            nbytes=sum(f.bytes for f in files),
        )


class ShardSetWriter:
    """Write a complete shard set in one process: samples, then the manifest on `close()`.

    As a context manager it closes on success; on an exception it drops the open shard and
    writes no manifest, so no finished-looking shard set appears.
    """

    def __init__(
        self,
        root: str,
        *,
        overwrite: bool = False,
        prefix: str = "shard",
        storage_options: dict[str, Any] | None = None,
        **writer_options: Any,
    ):
        self.root, self.storage_options = root, storage_options or {}
        fs, path = get_fs(root, **self.storage_options)
        if fs.exists(f"{path}/{HEADER_NAME}"):
            if not overwrite:
                raise FileExistsError(f"{root} already holds a shard set (use overwrite=True)")
            fs.rm(path, recursive=True)
        # Without a header, anything here was left by a killed writer: start clean.
        remove_temporaries(fs, path)
        for leftover in (TAR_DIR, VOLUME_STORE, ROWS_NAME):
            if fs.exists(f"{path}/{leftover}"):
                fs.rm(f"{path}/{leftover}", recursive=True)
        self.samples = SampleWriter(
            root, prefix, storage_options=self.storage_options, **writer_options
        )
        self.header: dict[str, Any] | None = None

    def write(self, sample: Sample) -> dict[str, Any]:
        return self.samples.write(sample)

    def close(
        self, *, datasets: dict[str, Any] | None = None, attributes: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        rows, files = self.samples.close()
        self.header = write_manifest(
            self.root, rows, files, datasets=datasets, attributes=attributes, **self.storage_options
        )
        return self.header

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.samples.abort()
        elif self.header is None:
            self.close()

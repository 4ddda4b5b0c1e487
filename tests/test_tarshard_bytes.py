"""TarShardWriter builds its ustar headers itself: the shards must be, byte for byte, what
tarfile writes for the same members (mode 0444, owner 0, mtime 0, ustar)."""

from __future__ import annotations

import io
import tarfile

import fsspec
import numpy as np

from medfm.shards.tarshard import TarShardWriter

SIZES = (0, 1, 100, 511, 512, 513, 1024, 10_239, 10_240, 70_001)


def _tarfile_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(payload), 0o444, 0
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _samples() -> list[tuple[str, dict[str, bytes]]]:
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(SIZES):
        key = f"k{i}-" + "x" * (60 + i)  # long names fill most of the 100-byte name field
        out.append((key, {"npy": rng.bytes(n), "norm.npy": rng.bytes(n // 3 + 7), "json": b"{}"}))
    return out


def test_shard_bytes_equal_tarfile_and_offsets_point_at_data(tmp_path):
    samples = _samples()
    writer = TarShardWriter(fsspec.filesystem("file"), str(tmp_path), "t")
    locations = [writer.add(key, members)[1] for key, members in samples]
    (shard,) = writer.close()
    got = (tmp_path / shard.path).read_bytes()
    assert got == _tarfile_bytes(samples)
    assert shard.bytes == len(got) and shard.samples == len(samples)
    for (_, members), locs in zip(samples, locations, strict=True):
        for ext, payload in members.items():
            loc = locs[ext]
            assert got[loc.offset : loc.offset + loc.size] == payload
    with tarfile.open(tmp_path / shard.path) as tar:
        assert len(tar.getmembers()) == 3 * len(samples)


def test_rolled_over_shards_each_equal_tarfile(tmp_path):
    samples = _samples()
    writer = TarShardWriter(fsspec.filesystem("file"), str(tmp_path), "t", max_bytes=30_000)
    written: dict[str, list] = {}
    for key, members in samples:
        rel, _ = writer.add(key, members)
        written.setdefault(rel, []).append((key, members))
    files = writer.close()
    assert len(files) > 2
    for f in files:
        assert (tmp_path / f.path).read_bytes() == _tarfile_bytes(written[f.path])

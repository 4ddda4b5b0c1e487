"""Corrupt, truncated, unsafe and future shard sets: each gives a clear error naming the file."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medfm.io import get_fs
from medfm.shards import (
    Geometry,
    Manifest,
    Sample,
    SchemaVersionError,
    ShardFormatError,
    ShardSet,
    ShardSetWriter,
    UnsafeMemberError,
    verify,
    write_manifest,
)
from medfm.shards.schema import sample_row
from medfm.shards.tarshard import TarShardWriter, iter_samples

SHARD = "tars/shard-000000.tar"


def _mr() -> np.ndarray:
    return pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.int16)


@pytest.fixture
def tar_set(tmp_path) -> Path:
    root = tmp_path / "set"
    with ShardSetWriter(str(root)) as w:
        for i in range(3):
            w.write(Sample(f"s{i}", "image2d", "MR", "d", f"p{i}", "train", np.roll(_mr(), i)))
    return root


@pytest.fixture
def volume_set(tmp_path, nibabel_data) -> Path:
    img = nib.load(nibabel_data / "anatomical.nii")
    root = tmp_path / "vol"
    with ShardSetWriter(str(root), chunks=(16, 16, 16)) as w:
        w.write(
            Sample(
                "v",
                "volume3d",
                "MR",
                "d",
                "p",
                "train",
                np.asarray(img.dataobj),
                geometry=Geometry.from_nifti_affine(img.affine),
            )
        )
    return root


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_in_tar_shard(tar_set):
    row = next(ShardSet(str(tar_set)).rows())
    loc = json.loads(row["members"])["npy"]
    _flip_byte(tar_set / SHARD, loc["offset"] + loc["size"] - 5)
    report = verify(str(tar_set))
    assert not report.ok
    assert any(SHARD in e and "sha256 mismatch" in e for e in report.errors), report.errors
    with pytest.raises(ShardFormatError, match=f"{SHARD}:{row['key']}.npy: sha256 mismatch"):
        ShardSet(str(tar_set)).read_sample(row)


def test_flipped_byte_in_zarr_chunk(volume_set):
    chunk = volume_set / "volumes.zarr/v/image/c/0/0/0"
    _flip_byte(chunk, 100)
    report = verify(str(volume_set))
    assert any("volumes.zarr/v/image/c/0/0/0: sha256 mismatch" in e for e in report.errors)
    assert any(
        "volumes.zarr/v" in e and ("corrupt" in e or "unreadable" in e)
        for e in report.errors
        if "c/0/0/0" not in e
    ), report.errors


def test_truncated_shard(tar_set):
    path = tar_set / SHARD
    path.write_bytes(path.read_bytes()[:3000])
    report = verify(str(tar_set))
    assert any(SHARD in e and "truncated" in e for e in report.errors), report.errors
    rows = list(ShardSet(str(tar_set)).rows())
    with pytest.raises(ShardFormatError, match=f"{SHARD}:s2.npy: shard is truncated"):
        ShardSet(str(tar_set)).read_sample(rows[-1])


def test_row_pointing_at_nothing(tar_set):
    (tar_set / SHARD).unlink()
    report = verify(str(tar_set))
    assert any(f"{SHARD}: listed in manifest.json but missing" in e for e in report.errors)
    assert any(f"{SHARD}: missing; rows" in e for e in report.errors)
    with pytest.raises(ShardFormatError, match="shard file is missing"):
        ShardSet(str(tar_set)).read_sample(next(ShardSet(str(tar_set)).rows()))


def _evil_tar(path: Path, member: tarfile.TarInfo, payload: bytes = b"x") -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        good = tarfile.TarInfo("ok.npy")
        good.size = 4
        tar.addfile(good, io.BytesIO(b"abcd"))
        member.size = len(payload) if member.isreg() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isreg() else None)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    "member, reason",
    [
        (_member("../../escape_marker.npy"), "escapes the shard"),
        (_member("/tmp/abs_marker.npy"), "escapes the shard"),
        (_member("k.npy", tarfile.SYMTYPE, "/etc/passwd"), "is a symlink"),
        (_member("k.npy", tarfile.LNKTYPE, "ok.npy"), "is a hard link"),
        (_member("k.npy", tarfile.CHRTYPE), "is a device"),
        (_member("k.npy", tarfile.FIFOTYPE), "is a fifo"),
        (_member("no_extension"), "is not <key>.<ext>"),
    ],
)
def test_unsafe_members_refused_never_extracted(tmp_path, tar_set, member, reason):
    evil = tmp_path / "evil.tar"
    _evil_tar(evil, member)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a traversal, if ever extracted, would land next to this
    try:
        with pytest.raises(UnsafeMemberError, match=reason), open(evil, "rb") as f:
            list(iter_samples(f, "evil.tar"))
        # The same tar swapped into a shard set: verify names the shard and the reason.
        (tar_set / SHARD).write_bytes(evil.read_bytes())
        errors = verify(str(tar_set)).errors
        assert any(e.startswith(f"{SHARD}: member") and reason in e for e in errors), errors
    finally:
        os.chdir(cwd)
    assert not list(tmp_path.parent.glob("**/escape_marker*"))
    assert not Path("/tmp/abs_marker.npy").exists()


class _PlantsMarker:
    """Unpickling this would create a file: proof that nothing was unpickled if it is absent."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_npy_needing_pickle_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    _PlantsMarker.marker = str(marker)
    obj = np.empty(1, dtype=object)
    obj[0] = _PlantsMarker()
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    root = tmp_path / "set"
    fs, path = get_fs(str(root))
    tars = TarShardWriter(fs, path, "shard")
    sample = Sample("evil", "ehr", "EHR", "d", "p", "train", np.zeros(1))
    rel, locs = tars.add("evil", {"npy": buf.getvalue()})
    row = sample_row(
        sample,
        storage="tar",
        shard=rel,
        member="npy",
        members={k: v.to_dict() for k, v in locs.items()},
        sha256=locs["npy"].sha256,
        nbytes=locs["npy"].size,
    )
    write_manifest(str(root), [row], tars.close())  # hashes all consistent: only pickle is wrong
    report = verify(str(root))
    assert any(f"{rel}:evil.npy: .npy payload needs pickle, refused" in e for e in report.errors)
    with pytest.raises(ShardFormatError, match="needs pickle, refused"):
        ShardSet(str(root)).read_sample(row)
    assert not marker.exists()


def test_newer_schema_refused(tar_set, medfm_exe):
    header_path = tar_set / "manifest.json"
    header = json.loads(header_path.read_text())
    header["schema_version"] = 99
    header_path.write_text(json.dumps(header))
    with pytest.raises(SchemaVersionError, match="schema_version 99 .* Upgrade medfm"):
        Manifest.open(str(tar_set))
    run = subprocess.run(
        [medfm_exe, "shards", "verify", str(tar_set)], capture_output=True, text=True
    )
    assert run.returncode == 1 and "schema_version 99" in run.stderr


def test_corrupt_manifest_rows(tar_set):
    _flip_byte(tar_set / "manifest.parquet", 40)
    with pytest.raises(ShardFormatError, match="manifest.parquet: sha256 does not match"):
        Manifest.open(str(tar_set))


KILLED_WRITER = """
import sys, time, numpy as np
from medfm.shards import Sample, ShardSetWriter
w = ShardSetWriter(sys.argv[1], shard_max_bytes=200_000)  # about 6 samples a shard
for i in range(10_000):
    w.write(Sample(f"s{i}", "ehr", "EHR", "d", "p", "train", np.arange(4000) + i))
    time.sleep(0.01)
"""


def _committed_and_open(tars: Path) -> bool:
    names = [p.name for p in tars.glob("*")] if tars.exists() else []
    return sum(n.endswith(".tar") for n in names) >= 2 and any(".tmp-" in n for n in names)


def test_killed_writer_leaves_only_temporaries(tmp_path):
    root = tmp_path / "set"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root)])
    try:
        # Kill while a shard is open: the writer renames one shard and opens the next in the
        # same call, so wait until one listing shows both committed shards and a temporary.
        deadline = time.time() + 60
        while time.time() < deadline and not _committed_and_open(root / "tars"):
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (root / "manifest.json").exists()  # no finished-looking shard set
    temporaries = list((root / "tars").glob("*.tmp-*"))
    assert temporaries, "the open shard should survive only as a temporary"
    for tar in (root / "tars").glob("*.tar"):  # committed shards are complete tars
        with open(tar, "rb") as f:
            assert list(iter_samples(f, tar.name))
    with ShardSetWriter(str(root), overwrite=True) as w:  # the next run cleans up
        w.write(Sample("fresh", "ehr", "EHR", "d", "p", "train", np.arange(3)))
    assert not list(root.glob("**/*.tmp-*"))
    report = verify(str(root))
    assert report.ok and not report.warnings  # the killed run's shards are gone too
    assert [r["key"] for r in Manifest.open(str(root)).rows()] == ["fresh"]


def test_verify_cli_reports_and_exits_1(tar_set, medfm_exe):
    ok = subprocess.run(
        [medfm_exe, "shards", "verify", str(tar_set)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "OK" in ok.stdout
    _flip_byte(tar_set / SHARD, 700)
    bad = subprocess.run(
        [medfm_exe, "shards", "verify", str(tar_set), "--json"], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert any(SHARD in e for e in json.loads(bad.stdout)["errors"])

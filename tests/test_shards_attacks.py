"""Crafted shard sets (security issue 18): paths that leave the set, decoding bombs, and tars
or headers that used to pass verify. Each set is real files on disk whose hashes are made
consistent again after the edit, as an attacker would, so only the new checks can catch it."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
import zarr
from pydicom.data import get_testdata_file
from zarr.codecs import GzipCodec

from medfm.io import get_fs, sha256_bytes, sha256_file
from medfm.shards import (
    Geometry,
    Manifest,
    Sample,
    ShardError,
    ShardFormatError,
    ShardSet,
    ShardSetWriter,
    verify,
    write_manifest,
)
from medfm.shards.schema import sample_row
from medfm.shards.tarshard import TarShardWriter

SHARD = "tars/shard-000000.tar"


# --- building and editing real sets ---------------------------------------------------------
def _mr() -> np.ndarray:
    return pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.int16)


def _tar_set(root: Path, n: int = 3, shift: int = 0) -> Path:
    with ShardSetWriter(str(root)) as w:
        for i in range(n):
            w.write(
                Sample(f"s{i}", "image2d", "MR", "d", f"p{i}", "train", np.roll(_mr(), i + shift))
            )
    return root


def _volume_set(root: Path, nibabel_data: Path, scale: int = 1) -> Path:
    img = nib.load(nibabel_data / "anatomical.nii")
    data = np.asarray(img.dataobj).astype(np.int16) * scale
    geometry = Geometry.from_nifti_affine(img.affine)
    with ShardSetWriter(str(root), chunks=(16, 16, 16)) as w:
        w.write(Sample("v", "volume3d", "MR", "d", "p", "train", data, geometry=geometry))
    return root


def _header(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _rows(root: Path) -> list[dict]:
    return pq.read_table(root / "manifest.parquet").to_pylist()


def _rewrite(root: Path, rows: list[dict] | None = None, refresh: bool = True, **header) -> None:
    """Write rows and header back with every recorded hash made to match the files again."""
    from medfm.shards.schema import MANIFEST_SCHEMA

    h = _header(root)
    if rows is not None:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), sink)
        data = sink.getvalue().to_pybytes()
        (root / "manifest.parquet").write_bytes(data)
        h["manifest"] = {"path": "manifest.parquet", "sha256": sha256_bytes(data),
                         "bytes": len(data)}  # fmt: skip
    if refresh:
        fs, _ = get_fs(str(root))
        files = {}
        for sub in ("tars", "volumes.zarr"):
            for p in sorted((root / sub).rglob("*")) if (root / sub).exists() else []:
                rel = p.relative_to(root).as_posix()
                if p.is_file() and rel != "volumes.zarr/zarr.json":
                    digest, size = sha256_file(fs, str(p))
                    files[rel] = {"sha256": digest, "bytes": size}
        h["files"] = {**files, **{k: v for k, v in h["files"].items() if k not in files}}
    h.update(header)
    (root / "manifest.json").write_text(json.dumps(h))


def _refused(root: Path, match: str) -> list[str]:
    """Open, ShardSet and verify all refuse with `match` (a regex); returns verify's errors."""
    with pytest.raises(ShardFormatError, match=match):
        Manifest.open(str(root))
    with pytest.raises(ShardFormatError, match=match):
        ShardSet(str(root))
    report = verify(str(root))
    assert not report.ok and any(re.search(match, e) for e in report.errors), report.errors
    return report.errors


# --- 5. every path a manifest holds stays inside the set -------------------------------------
def test_row_shard_pointing_into_another_set_is_refused(tmp_path):
    a, b = _tar_set(tmp_path / "a"), _tar_set(tmp_path / "other_set", shift=7)
    theirs = _rows(b)[0]
    rows = _rows(a)
    rows[0] = {**rows[0], "shard": f"../other_set/{SHARD}", "members": theirs["members"],
               "sha256": theirs["sha256"]}  # fmt: skip
    _rewrite(a, rows)
    errors = _refused(a, "rows have an invalid key, storage or a shard path outside the set")
    assert any("../other_set" in e for e in errors)
    h = _header(a)  # listing the other set's tar as a file of this one does not help
    h["files"][f"../other_set/{SHARD}"] = _header(b)["files"][SHARD]
    (a / "manifest.json").write_text(json.dumps(h))
    _refused(a, "files key '../other_set/tars/shard-000000.tar' is not a relative path inside")


def test_zarr_group_path_with_dotdot_is_refused(tmp_path, nibabel_data):
    a = _volume_set(tmp_path / "a", nibabel_data)
    _volume_set(tmp_path / "x", nibabel_data, scale=-1)  # another set's pixels
    rows = _rows(a)
    theirs = _rows(tmp_path / "x")[0]
    rows[0] = {**rows[0], "shard": "volumes.zarr/../../x/volumes.zarr/v",
               "members": theirs["members"]}  # fmt: skip
    _rewrite(a, rows)
    _refused(a, "outside the set")


def test_header_manifest_path_outside_the_set_is_refused(tmp_path):
    a, b = _tar_set(tmp_path / "a"), _tar_set(tmp_path / "b", shift=3)
    _rewrite(a, refresh=False, manifest={**_header(b)["manifest"], "path": "../b/manifest.parquet"})
    _refused(a, r"manifest.path '\.\./b/manifest.parquet' is not a relative path inside")


@pytest.mark.parametrize("key", ["../../../../etc/hostname", "/etc/hostname", "tars/../../out"])
def test_files_key_outside_the_set_is_refused(tmp_path, key):
    a = _tar_set(tmp_path / "a")
    outside = tmp_path / "out"
    outside.write_bytes(b"secret")
    h = _header(a)
    target = Path("/etc/hostname") if "hostname" in key else outside
    if target.exists():
        digest, size = sha256_file(get_fs(str(target))[0], str(target))
        h["files"][key] = {"sha256": digest, "bytes": size}  # verify used to hash it: OK
        (a / "manifest.json").write_text(json.dumps(h))
        _refused(a, "files key")


# --- 6. bounded decoding ------------------------------------------------------------------------
def _npy_bomb() -> bytes:
    """A ~100-byte .npy whose header declares (2^20, 2^20) float64: 8 TiB."""
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1048576, 1048576), }"
    header = header.ljust(118 - 10) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 8


def _set_with_member(root: Path, payload: bytes, ext: str = "npy", good: int = 1) -> dict:
    """A set of `good` real samples plus one whose primary member is `payload`, hashes intact."""
    fs, path = get_fs(str(root))
    tars = TarShardWriter(fs, path, "shard")
    rows = []
    for i in range(good):
        arr = np.roll(_mr(), i)
        from medfm.shards.codecs import encode_npy

        rel, locs = tars.add(f"good{i}", {"npy": encode_npy(arr)})
        s = Sample(f"good{i}", "image2d", "MR", "d", f"p{i}", "train", arr)
        rows.append(sample_row(s, storage="tar", shard=rel, member="npy",
                               members={k: v.to_dict() for k, v in locs.items()},
                               sha256=locs["npy"].sha256, nbytes=locs["npy"].size))  # fmt: skip
    rel, locs = tars.add("evil", {ext: payload})
    s = Sample("evil", "image2d", "MR", "d", "q", "train", np.zeros((1024, 1024)))
    evil = sample_row(s, storage="tar", shard=rel, member=ext,
                      members={k: v.to_dict() for k, v in locs.items()},
                      sha256=locs[ext].sha256, nbytes=locs[ext].size)  # fmt: skip
    write_manifest(str(root), [*rows, evil], tars.close())
    return evil


def test_npy_header_declaring_8_tib_is_refused_everywhere(tmp_path):
    from medfm.shards import ShardDataset

    bomb = _npy_bomb()
    assert len(bomb) < 200
    evil = _set_with_member(tmp_path / "set", bomb)
    where = f"{evil['shard']}:evil.npy"
    report = verify(str(tmp_path / "set"))
    assert any(e.startswith(where) and "over the" in e for e in report.errors), report.errors
    with pytest.raises(ShardFormatError, match=f"{where}: .npy header declares"):
        ShardSet(str(tmp_path / "set")).read_sample(evil)
    items = list(ShardDataset(str(tmp_path / "set"), shuffle=False, on_error="skip"))
    assert [i["key"] for i in items] == ["good0", "good0"]  # evil skipped, substituted


def test_npy_declaring_more_than_the_member_holds_is_refused(tmp_path):
    good = io.BytesIO()
    np.save(good, _mr())
    evil = _set_with_member(tmp_path / "set", good.getvalue()[:-100])
    with pytest.raises(ShardFormatError, match="evil.npy: truncated or padded .npy"):
        ShardSet(str(tmp_path / "set")).read_sample(evil)


def _replace_image(root: Path, make) -> None:
    """Swap volume v's image array for `make(group, data, attrs)`; hashes refreshed."""
    group_path = root / "volumes.zarr" / "v"
    group = zarr.open_group(zarr.storage.LocalStore(str(group_path)), mode="a")
    data, attrs = group["image"][...], dict(group["image"].attrs)
    del group["image"]
    make(group, data, attrs)
    _rewrite(root, refresh=True)


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3")
@pytest.mark.parametrize("codec", ["gzip", "lzma", "bz2"])
def test_codecs_outside_the_format_are_refused(tmp_path, nibabel_data, codec):
    from zarr.codecs.numcodecs import BZ2, LZMA

    root = _volume_set(tmp_path / "vol", nibabel_data)
    compressor = {"gzip": GzipCodec(), "lzma": LZMA(), "bz2": BZ2()}[codec]

    def make(group, data, attrs):
        arr = group.create_array("image", shape=data.shape, dtype=data.dtype, chunks=(16,) * 3,
                                 compressors=compressor, attributes=attrs)  # fmt: skip
        arr[...] = data

    _replace_image(root, make)
    row = next(ShardSet(str(root)).rows())
    with pytest.raises(ShardFormatError, match="volumes.zarr/v: .*is not in the format"):
        ShardSet(str(root)).read_sample(row)
    assert any("is not in the format" in e for e in verify(str(root)).errors)


def test_zarr_chunk_over_the_chunk_limit_is_refused(tmp_path, nibabel_data, monkeypatch):
    """128^3 ones in one chunk (a few KB on disk): under a 1 MiB chunk limit, reading one 16^3
    patch would decode 2 MiB; the same check refuses 1024^3 under the default limit."""
    from medfm.shards.patches import PatchSampler

    root = _volume_set(tmp_path / "vol", nibabel_data)

    def make(group, data, attrs):
        arr = group.create_array("image", shape=(128,) * 3, dtype="uint8", chunks=(128,) * 3,
                                 shards=(128,) * 3, attributes=attrs)  # fmt: skip
        arr[...] = np.ones((128,) * 3, np.uint8)

    _replace_image(root, make)
    assert (root / "volumes.zarr/v/image/c/0/0/0").stat().st_size < 10_000
    rows = _rows(root)
    rows[0]["shape"], rows[0]["dtype"] = [128, 128, 128], "|u1"
    _rewrite(root, rows)
    monkeypatch.setenv("MEDFM_MAX_CHUNK_BYTES", str(1 << 20))
    sampler = PatchSampler(str(root), patch_size=(16, 16, 16))
    with pytest.raises(ShardFormatError, match="volumes.zarr/v.*inner chunk 128x128x128"):
        sampler.patch(_rows(root)[0], 0, np.random.default_rng(0))
    monkeypatch.delenv("MEDFM_MAX_CHUNK_BYTES")
    meta = root / "volumes.zarr/v/image/zarr.json"
    text = meta.read_text().replace("128", "1024")  # shape, shard and chunk: 1024^3, 1 GiB
    meta.write_text(text)
    rows[0]["shape"] = [1024] * 3
    _rewrite(root, rows)
    with pytest.raises(ShardFormatError, match="inner chunk 1024x1024x1024 .* over the"):
        PatchSampler(str(root), patch_size=(16, 16, 16)).patch(_rows(root)[0], 0, None)


def test_zarr_json_declaring_8192_cubed_is_refused(tmp_path, nibabel_data):
    from medfm.shards import ShardDataset

    root = _volume_set(tmp_path / "vol", nibabel_data)
    meta = root / "volumes.zarr/v/image/zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [8192] * 3
    meta.write_text(json.dumps(doc))
    assert meta.stat().st_size < 2000
    rows = _rows(root)
    rows[0]["shape"] = [8192] * 3
    _rewrite(root, rows)
    with pytest.raises(ShardFormatError, match="volumes.zarr/v: .*8192x8192x8192.* over the"):
        ShardSet(str(root)).read_sample(rows[0])
    assert any("volumes.zarr/v" in e and "over the" in e for e in verify(str(root)).errors)
    with pytest.raises(ShardError, match="every sample of this worker failed to load"):
        list(ShardDataset(str(root), shuffle=False, on_error="skip"))  # skipped, none left


# --- 7. verify checks what readers rely on, and reports instead of crashing ---------------------
def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o444
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _offsets(blob: bytes) -> dict[str, tuple[int, int]]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def _retar(root: Path, order: list[str], rename: dict[str, str] | None = None) -> None:
    """Rewrite the shard with its members in `order` (and renamed), rows following them."""
    rename = rename or {}
    with tarfile.open(root / SHARD) as tar:
        data = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    blob = _tar_bytes([(rename.get(n, n), data[n]) for n in order])
    (root / SHARD).write_bytes(blob)
    where = _offsets(blob)
    rows = _rows(root)
    for row in rows:
        members = {}
        for ext, loc in json.loads(row["members"]).items():
            name = rename.get(f"{row['key']}.{ext}", f"{row['key']}.{ext}")
            loc["offset"] = where[name][0]
            members[name.split(".", 1)[1]] = loc
        row["members"] = json.dumps(members, sort_keys=True)
    _rewrite(root, rows)


def test_members_of_a_sample_not_consecutive(tmp_path):
    from medfm.shards import ShardDataset

    root = _tar_set(tmp_path / "set", n=2)
    _retar(root, ["s0.npy", "s1.npy", "s0.json", "s1.json"])
    errors = verify(str(root)).errors
    assert any("members of sample s0 are not consecutive" in e for e in errors), errors
    with pytest.raises(ShardFormatError, match="s0: the sample's members are not consecutive"):
        list(ShardDataset(str(root), shuffle=False))


def test_member_name_with_trailing_newline(tmp_path):
    root = _tar_set(tmp_path / "set", n=1)
    _retar(root, ["s0.npy", "s0.json"], rename={"s0.json": "s0.json\n"})
    errors = verify(str(root)).errors
    assert any("'s0.json\\n' is not <key>.<ext>" in e for e in errors), errors
    assert any("members entry 'json\\n' is malformed" in e for e in errors), errors


@pytest.mark.parametrize("key", ["s0\n", "s0\x00", "s0/../s1"])
def test_row_key_with_newline_or_nul(tmp_path, key):
    root = _tar_set(tmp_path / "set", n=2)
    rows = _rows(root)
    rows[0]["key"] = key
    _rewrite(root, rows)
    _refused(root, "invalid key")


def test_num_samples_must_match_the_rows(tmp_path):
    root = _tar_set(tmp_path / "set")
    _rewrite(root, refresh=False, num_samples=10**12)
    _refused(root, "num_samples 1000000000000 but manifest.parquet holds 3 rows")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("files", ["tars/shard-000000.tar"], "files is not an object"),
        ("files", {SHARD: "abc"}, "is not {sha256: hex, bytes: int}"),
        ("files", {SHARD: {"sha256": 5, "bytes": "x"}}, "is not {sha256: hex, bytes: int}"),
        ("manifest", "manifest.parquet", "manifest is not {sha256"),
        ("num_samples", "3", "num_samples is not a non-negative integer"),
        ("datasets", [], "datasets is not an object"),
    ],
)
def test_malformed_header_values_are_reported(tmp_path, field, value, match):
    root = _tar_set(tmp_path / "set")
    _rewrite(root, refresh=False, **{field: value})
    errors = _refused(root, re.escape(match))
    assert all("AttributeError" not in e and "TypeError" not in e for e in errors)


def test_verify_cli_reports_malformed_header_with_exit_1(tmp_path, medfm_exe):
    root = _tar_set(tmp_path / "set")
    _rewrite(root, refresh=False, files=[SHARD])
    run = subprocess.run([medfm_exe, "shards", "verify", str(root)], capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "files is not an object" in run.stderr


def _retype(root: Path, name: str, kind: bytes, linkname: str = "") -> None:
    """Turn member `name` into a link by editing its ustar header in place (checksum fixed)."""
    blob = bytearray((root / SHARD).read_bytes())
    at = _offsets(bytes(blob))[name][0] - 512
    block = blob[at : at + 512]
    block[156:157] = kind
    block[157:257] = linkname.encode().ljust(100, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    blob[at : at + 512] = block
    (root / SHARD).write_bytes(bytes(blob))
    _rewrite(root)  # the file hash is made to match: only the member check can tell


@pytest.mark.parametrize(
    "kind, link, reason",
    [
        (tarfile.SYMTYPE, "/etc/passwd", "is a symlink"),
        (tarfile.LNKTYPE, "s0.npy", "is a hard link"),
    ],
)
def test_readers_refuse_link_members(tmp_path, kind, link, reason):
    from medfm.shards import ShardDataset

    root = _tar_set(tmp_path / "set")
    _retype(root, "s1.npy", kind, link)
    row = [r for r in ShardSet(str(root)).rows() if r["key"] == "s1"][0]
    with pytest.raises(ShardFormatError, match=f"{SHARD}:s1.npy: member 's1.npy' {reason}"):
        ShardSet(str(root)).read_sample(row)
    with pytest.raises(ShardFormatError, match=f"s1.npy' {reason}"):
        list(ShardDataset(str(root), shuffle=False, decode="numpy"))
    assert any(reason in e for e in verify(str(root)).errors)


def test_byte_range_readers_check_the_member_header(tmp_path):
    """A row whose offsets point at another member's data (same bytes, same hash) is refused."""
    root = _tar_set(tmp_path / "set")
    rows = _rows(root)
    rows[1]["members"] = rows[0]["members"]
    rows[1]["sha256"] = rows[0]["sha256"]
    _rewrite(root, rows)
    with pytest.raises(ShardFormatError, match="header before the recorded offset is 's0.npy'"):
        ShardSet(str(root)).read_sample(rows[1])


def test_honest_sets_still_pass(tmp_path, nibabel_data):
    for root in (_tar_set(tmp_path / "t"), _volume_set(tmp_path / "v", nibabel_data)):
        report = verify(str(root))
        assert report.ok and not report.warnings, report.errors
        s = ShardSet(str(root))
        for row in s.rows():
            assert s.read_sample(row).data.shape == tuple(row["shape"])
    assert os.environ.get("MEDFM_MAX_CHUNK_BYTES") is None


def test_zarr_json_with_an_out_of_range_fill_value(tmp_path, nibabel_data):
    """Found by bench/fuzz.py: zarr raised OverflowError (not ValueError) out of open_volume."""
    root = _volume_set(tmp_path / "vol", nibabel_data)
    meta = root / "volumes.zarr/v/image/zarr.json"
    doc = json.loads(meta.read_text())
    doc["fill_value"] = 10**12  # the array is int16
    meta.write_text(json.dumps(doc))
    _rewrite(root)
    with pytest.raises(ShardFormatError, match="volumes.zarr/v: cannot open volume .*Overflow"):
        ShardSet(str(root)).read_sample(_rows(root)[0])
    assert any("volumes.zarr/v" in e for e in verify(str(root)).errors)


@pytest.mark.parametrize(
    "descr", ["'<08'", "'08<f8'", "'<f8' * 3", "[('a', '<f8', (2**62,))]", "'O'"]
)
def test_npy_descr_numpy_cannot_parse_or_must_not(descr):
    """Found by bench/fuzz.py: numpy's dtype parser raised SyntaxError for '<08'."""
    from medfm.shards.codecs import decode_npy

    header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': (2,), }}".ljust(117) + "\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(16)
    with pytest.raises(ShardFormatError, match="fuzz.npy: "):
        decode_npy(data, "fuzz.npy")

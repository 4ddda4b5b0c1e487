"""Write, read back and compare bit-exactly, for every sample kind, on real files."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import webdataset as wds
from pydicom.data import get_testdata_file

from medfm.shards import Geometry, Manifest, Sample, ShardSet, ShardSetWriter, verify


def _sample(key: str, kind: str, data: np.ndarray, **kw) -> Sample:
    kw.setdefault("modality", "MR")
    return Sample(
        key=key, kind=kind, dataset="test", patient_id=f"p-{key}", split="train", data=data, **kw
    )


def _roundtrip(tmp_path, *samples: Sample, **writer_kw) -> tuple[ShardSet, dict[str, Sample]]:
    root = str(tmp_path / "set")
    with ShardSetWriter(root, **writer_kw) as w:
        for s in samples:
            w.write(s)
    report = verify(root)
    assert report.ok, report.errors
    shards = ShardSet(root)
    return shards, {r["key"]: shards.read_sample(r) for r in shards.rows()}


def _assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype.newbyteorder("<") == b.dtype.newbyteorder("<")
    assert a.tobytes() == np.ascontiguousarray(b, dtype=a.dtype).tobytes()


def test_image2d_dicom_hu_and_png(tmp_path):
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = (ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)).astype(np.int16)
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.uint16)
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb.dcm")).pixel_array  # 8-bit RGB
    mask = (hu > 0).astype(np.uint8)
    shards, back = _roundtrip(
        tmp_path,
        _sample(
            "ct",
            "image2d",
            hu,
            modality="CT",
            label_map=mask,
            spacing=(0.66, 0.66),
            labels={"class": 1},
        ),
        _sample("mr", "image2d", mr),
        _sample("rgb", "image2d", rgb, modality="SC"),
    )
    rows = {r["key"]: r for r in shards.rows()}
    assert (rows["ct"]["member"], rows["mr"]["member"], rows["rgb"]["member"]) == (
        "npy",
        "png",
        "png",
    )  # int16 HU stays .npy; 8/16-bit goes to lossless PNG
    _assert_same(hu, back["ct"].data)
    _assert_same(mask, back["ct"].label_map)
    _assert_same(mr, back["mr"].data)
    _assert_same(rgb, back["rgb"].data)
    assert back["ct"].labels == {"class": 1} and back["ct"].spacing == (0.66, 0.66)


def test_volume3d_nifti_geometry_roundtrip(tmp_path, nibabel_data):
    img = nib.load(nibabel_data / "anatomical.nii")
    vol = np.asarray(img.dataobj)  # big-endian int16 on disk
    geometry = Geometry.from_nifti_affine(img.affine)
    labels = (vol > np.percentile(vol, 70)).astype(np.uint8)
    shards, back = _roundtrip(
        tmp_path, _sample("anat", "volume3d", vol, geometry=geometry, label_map=labels)
    )
    out = back["anat"]
    _assert_same(vol, out.data)
    _assert_same(labels, out.label_map)
    assert out.geometry == geometry  # spacing, origin, direction survive bit-exactly
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ out.geometry.affine()
    np.testing.assert_allclose(ras, img.affine, rtol=0, atol=1e-6)
    assert tuple(out.geometry.spacing) == tuple(float(z) for z in img.header.get_zooms())
    row = next(shards.rows())
    assert row["storage"] == "zarr" and row["spacing"] == list(geometry.spacing)


def test_volume_chunks_and_sharding_codec(tmp_path, nibabel_data):
    import zarr

    img = nib.load(nibabel_data / "example4d.nii.gz")
    vol = np.asarray(img.dataobj)[..., 0]  # 128 x 96 x 24
    shards, _ = _roundtrip(
        tmp_path,
        _sample("f", "volume3d", vol, geometry=Geometry.from_nifti_affine(img.affine)),
        chunks=(32, 32, 16),
    )
    arr = zarr.open_group(f"{shards.path}/volumes.zarr/f", mode="r")["image"]
    assert arr.chunks == (32, 32, 16) and arr.shards == (128, 96, 32)
    files = [p for p in Manifest.open(shards.path).header["files"] if "/c/" in p]
    assert files == ["volumes.zarr/f/image/c/0/0/0"]  # 24 chunks packed into one shard file


def test_signal_dicom_waveform(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    ecg = ds.waveform_array(0).T.astype(np.float32)
    beats = np.array([120, 980, 1840], dtype=np.int64)
    _, back = _roundtrip(
        tmp_path,
        _sample(
            "ecg",
            "signal",
            ecg,
            modality="ECG",
            sampling_rate=1000.0,
            channels=["I"] * 12,
            extras={"beats": beats},
        ),
    )
    _assert_same(ecg, back["ecg"].data)
    _assert_same(beats, back["ecg"].extras["beats"])
    assert back["ecg"].sampling_rate == 1000.0


def test_ehr_tokens_from_mimic_demo(tmp_path, sample_data):
    with gzip.open(sample_data / "mimic-iv-demo-2.2/hosp/diagnoses_icd.csv.gz", "rt") as f:
        header = f.readline().strip().split(",")
        rows = [dict(zip(header, line.strip().split(","), strict=False)) for line in f][:200]
    codes = sorted({r["icd_code"] for r in rows})
    tokens = np.array([codes.index(r["icd_code"]) for r in rows], dtype=np.int32)
    seq = np.array([int(r["seq_num"]) for r in rows], dtype=np.int16)
    _, back = _roundtrip(
        tmp_path, _sample("ehr", "ehr", tokens, modality="EHR", extras={"seq": seq})
    )
    _assert_same(tokens, back["ehr"].data)
    _assert_same(seq, back["ehr"].extras["seq"])


def test_ehr_token_codec_always(tmp_path):
    tokens = np.arange(1000, dtype=np.int64)[::-1].copy()
    _, back = _roundtrip(tmp_path, _sample("e", "ehr", tokens, modality="EHR"))
    _assert_same(tokens, back["e"].data)


def test_plain_webdataset_reads_our_tars(tmp_path):
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.uint16)
    shards, _ = _roundtrip(
        tmp_path,
        _sample("a", "image2d", mr, labels={"class": 0}),
        _sample("b", "image2d", mr[::-1].copy(), labels={"class": 1}),
    )
    tar = f"{shards.path}/tars/shard-000000.tar"
    seen = {s["__key__"]: s for s in wds.WebDataset(tar, shardshuffle=False)}
    assert set(seen) == {"a", "b"}
    assert json.loads(seen["b"]["json"])["labels"] == {"class": 1}


def test_shard_rollover_and_deterministic_bytes(tmp_path):
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.int16)
    samples = [_sample(f"s{i:02d}", "image2d", np.roll(mr, i)) for i in range(12)]
    a, _ = _roundtrip(tmp_path / "a", *samples, shard_max_bytes=30_000)
    b, _ = _roundtrip(tmp_path / "b", *samples, shard_max_bytes=30_000)
    files_a, files_b = (Manifest.open(x.path).header["files"] for x in (a, b))
    assert len(files_a) > 3  # rolled over
    assert files_a == files_b  # same samples -> byte-identical shards


@pytest.mark.parametrize("bad", ["with.dot", "../up", "", "a/b", "x" * 81])
def test_invalid_keys_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="invalid sample key"):
        with ShardSetWriter(str(tmp_path / "s")) as w:
            w.write(_sample(bad, "ehr", np.arange(3)))


def _write_one_volume(root: str, key: str, barrier) -> None:
    from medfm.shards.writer import SampleWriter

    barrier.wait()  # every process reaches the store's creation at the same moment
    writer = SampleWriter(root, prefix=key)
    vol = np.full((8, 8, 8), len(key), np.int16)
    writer.write(_sample(key, "volume3d", vol, geometry=Geometry((1.0, 1.0, 1.0))))
    writer.close()


def test_parallel_writers_create_the_volume_store_once(tmp_path):
    """Ingest tasks start side by side on an empty destination; none may fail creating it."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    root, barrier = str(tmp_path / "set"), ctx.Barrier(6)
    procs = [ctx.Process(target=_write_one_volume, args=(root, f"v{'x' * i}", barrier))
             for i in range(6)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6
    assert sorted(p.name for p in (tmp_path / "set" / "volumes.zarr").iterdir()) == sorted(
        ["zarr.json"] + [f"v{'x' * i}" for i in range(6)]
    )


def test_encode_npy_writes_np_saves_bytes():
    """encode_npy builds the header once per dtype and shape: byte for byte what np.save
    writes, for the dtypes, orders and shapes shards hold (and a big-endian one)."""
    import io

    from medfm.shards.codecs import encode_npy

    def saved(a):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(2, 5000)).astype(np.float32), np.arange(10, dtype=">i4"),
              np.zeros((0, 3)), np.array(5.0), np.ones((3, 4, 5), np.uint16).T,
              np.zeros((1,) * 40, np.int8), np.arange(7)[::2], np.array([True, False])]  # fmt: skip
    for a in arrays:
        for _ in range(2):  # the second time from the cached header
            assert encode_npy(a) == saved(a), (a.dtype, a.shape)

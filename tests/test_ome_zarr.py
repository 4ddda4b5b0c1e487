"""Stored volumes open as OME-Zarr (NGFF 0.5) images in ome-zarr-py, with their spacing, data and
pyramid, while medfm's own readers and `verify` see the same set as before."""

from __future__ import annotations

import fsspec
import nibabel as nib
import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader
from ome_zarr_models.v05.image import Image

from medfm.shards import Geometry, Sample, ShardSet, ShardSetWriter, verify
from medfm.shards.volume import VolumeStoreWriter


def _volume(key: str, data: np.ndarray, geometry: Geometry, **kw) -> Sample:
    return Sample(
        key=key,
        kind="volume3d",
        modality="CT",
        dataset="test",
        patient_id=f"p-{key}",
        split="train",
        data=data,
        geometry=geometry,
        **kw,
    )


def _write(tmp_path, sample: Sample, **writer_kw) -> str:
    root = str(tmp_path / "set")
    with ShardSetWriter(root, **writer_kw) as w:
        w.write(sample)
    report = verify(root)
    assert report.ok, report.errors
    return root


def _ome_image(group_path: str):
    """The image node as ome-zarr-py's reader gives it to napari: (metadata, one array a level)."""
    location = parse_url(group_path)
    assert location is not None and location.version == "0.5"
    (node,) = [n for n in Reader(location)() if n.load(Multiscales)]
    return node.metadata, [np.asarray(level) for level in node.data]


def _scales(metadata: dict) -> list[list[float]]:
    return [
        next(t["scale"] for t in ts if t["type"] == "scale")
        for ts in metadata["coordinateTransformations"]
    ]


def test_anisotropic_volume_opens_with_its_spacing_per_axis(tmp_path):
    """Distinct spacing on each axis: a swapped axis order would show up as a swapped scale."""
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 2000, (40, 33, 9)).astype(np.int16)
    # An oblique direction and an LPS origin: NGFF cannot hold them, medfm's attributes do.
    c, s = np.cos(0.3), np.sin(0.3)
    geo = Geometry((0.7, 0.8, 2.5), (-120.5, 33.0, 7.25), (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    root = _write(tmp_path, _volume("aniso", data, geo))

    meta, levels = _ome_image(f"{root}/volumes.zarr/aniso")
    assert [(a["name"], a["type"], a["unit"]) for a in meta["axes"]] == [
        ("i", "space", "millimeter"),
        ("j", "space", "millimeter"),
        ("k", "space", "millimeter"),
    ]
    # NGFF scale of axis a = the length in mm of one step along array axis a (column a of the
    # voxel-to-world matrix), which is what spacing means in Geometry.affine.
    lengths = np.linalg.norm(geo.affine()[:3, :3], axis=0)
    np.testing.assert_allclose(_scales(meta), [lengths])
    assert len(levels) == 1  # no pyramid unless asked for
    np.testing.assert_array_equal(levels[0], data)
    group = zarr.open_group(f"{root}/volumes.zarr/aniso", mode="r")
    assert Geometry.from_dict(group.attrs["medfm"]["geometry"]) == geo
    Image.from_zarr(group)  # valid against the NGFF 0.5 models (dimension names = axis names)


def test_real_ct_pyramid_opens_in_ome_zarr_with_scaled_levels(tmp_path, sample_data):
    """TotalSegmentator's CT and label map, every 2nd row and 3rd slice kept so the spacing is
    (3, 6, 9) mm; two pyramid levels: in-plane first, then all axes."""
    folder = sample_data / "totalsegmentator"
    ct_img = nib.load(folder / "example_ct_sm.nii.gz")
    ct_img = ct_img.slicer[:, ::2, ::3]
    seg = np.asarray(nib.load(folder / "example_seg.nii.gz").dataobj, np.uint8)[:, ::2, ::3]
    ct = np.asarray(ct_img.dataobj, np.int16)
    geo = Geometry.from_nifti_affine(ct_img.affine)
    np.testing.assert_allclose(geo.spacing, (3.0, 6.0, 9.0))
    root = _write(tmp_path, _volume("ct", ct, geo, label_map=seg), pyramid_levels=2)

    meta, levels = _ome_image(f"{root}/volumes.zarr/ct")
    np.testing.assert_allclose(_scales(meta), [[3, 6, 9], [6, 6, 9], [12, 12, 18]])
    translations = [ts[1]["translation"] for ts in meta["coordinateTransformations"]]
    np.testing.assert_allclose(translations, [[0, 0, 0], [1.5, 0, 0], [4.5, 3, 4.5]])
    assert [lv.shape for lv in levels] == [(122, 51, 10), (61, 51, 10), (31, 26, 5)]
    np.testing.assert_array_equal(levels[0], ct)
    # Level 1 halves i: each voxel is the rounded mean of two neighbours along i.
    np.testing.assert_array_equal(levels[1], np.rint((ct[0::2] + ct[1::2].astype(float)) / 2))

    group = zarr.open_group(f"{root}/volumes.zarr/ct", mode="r")
    Image.from_zarr(group)
    # Label levels are the most frequent label of each block: only labels that occur in it.
    label_s1 = group["label_s1"][:]
    pairs = np.stack([seg[0::2], seg[1::2]])
    assert ((label_s1 == pairs[0]) | (label_s1 == pairs[1])).all()
    np.testing.assert_array_equal(label_s1, pairs.min(axis=0))  # two voxels: a tie, or equal
    label_s2 = group["label_s2"][:]
    assert label_s2.shape == levels[2].shape
    for idx in [(0, 0, 0), (15, 13, 2), (30, 25, 4)]:  # 2x2x2 blocks of label_s1, edge included
        block = label_s1[tuple(slice(2 * n, 2 * n + 2) for n in idx)].ravel()
        values, counts = np.unique(block, return_counts=True)
        assert label_s2[idx] == values[counts.argmax()]

    # medfm's own readers still read the full-resolution arrays, untouched by the pyramid.
    shards = ShardSet(root)
    (row,) = shards.rows()
    back = shards.read_sample(row)
    np.testing.assert_array_equal(back.data, ct)
    np.testing.assert_array_equal(back.label_map, seg)


def test_pyramid_levels_out_of_range_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pyramid_levels must be an integer in"):
        VolumeStoreWriter(fsspec.filesystem("file"), str(tmp_path), pyramid_levels=-1)


def test_ingest_writes_the_pyramid_the_spec_asks_for(tmp_path, sample_data, ray_local):
    from ingest_helpers import KEY

    from medfm.config import ConfigError
    from medfm.ingest.job import run_ingest
    from medfm.ingest.load import parse_spec
    from medfm.ingest.privacy import Keyring

    ts = sample_data / "totalsegmentator"
    spec = {
        "sources": [{"name": "ct", "root": str(ts), "include": ["example_ct_sm.nii.gz"],
                     "format": "nifti", "modality": "CT"}],
        "volume": {"spacing": None},
        "shards": {"pyramid_levels": 1},
    }  # fmt: skip
    run_ingest(parse_spec(spec), str(tmp_path / "set"), keyring=Keyring(KEY), progress=False)
    (row,) = ShardSet(str(tmp_path / "set")).rows()
    metadata, levels = _ome_image(str(tmp_path / "set" / row["shard"]))
    assert len(levels) == 2 and levels[1].size < levels[0].size
    assert verify(str(tmp_path / "set")).ok
    with pytest.raises(ConfigError, match="shards.pyramid_levels: give 0 to 8"):
        parse_spec({**spec, "shards": {"pyramid_levels": 9}})

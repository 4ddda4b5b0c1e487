"""DICOM as exported in the wild, on pydicom's real files: blanked UIDs, mixed series, palette
colour, modality/VOI LUTs, colour spaces, and quarantine records per input file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from ingest_helpers import KEY, PYDICOM_FILES, read_all, small_ct, write_series
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, RLELossless, generate_uid

from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.ingest.readers.dicom import reason_class, stored_pixels
from medfm.ingest.registry import ReadContext, UnsupportedInput, create_reader
from medfm.ingest.sources import list_files
from medfm.ingest.tasks import PartResult, Task, iter_samples, shown_path

CT5N = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"


def src(root, **kw):
    return {"name": kw.pop("name", "t"), "root": str(root), "format": "dicom", **kw}


def samples(got):
    return [g[2] for g in got if g[0] == "S"]


def sitk_series(folder: Path) -> sitk.Image:
    """The reference: SimpleITK's ImageSeriesReader over GDCM's position-sorted file list."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.DICOMOrient(reader.Execute(), "LPS")


def export_ct5n(folder: Path, *, blank: bool, thickness: str = "3.0", **changes) -> list[Path]:
    """pydicom's real 5-slice CT series re-saved RLE lossless; `blank` empties the Study,
    Series and SOP instance UIDs as some exporters do. The slices lie 2.5 mm apart while
    SliceThickness says 3.0 (an overlapping reconstruction's header)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(CT5N.iterdir()):
        ds = pydicom.dcmread(p)
        ds.SliceThickness = thickness
        if blank:
            ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = ""
            ds.file_meta.MediaStorageSOPInstanceUID = ""
        for kw, value in changes.items():
            if callable(value):
                value(ds)
            else:
                setattr(ds, kw, value)
        ds.compress(RLELossless)
        ds.save_as(folder / p.name)
        out.append(folder / p.name)
    return out


# ---------------------------------------------------------------- series without UIDs


def test_blank_uid_series_is_one_volume_spaced_by_position(tmp_path):
    export_ct5n(tmp_path / "ct", blank=True)
    got = read_all({"sources": [src(tmp_path)]})
    assert [g[0] for g in got] == ["S"], got
    s, ref = got[0][2], sitk_series(tmp_path / "ct")
    assert s.kind == "volume3d" and s.data.shape == ref.GetSize() == (16, 16, 5)
    assert s.geometry.spacing == pytest.approx(ref.GetSpacing(), abs=1e-4)
    assert s.geometry.spacing[2] == pytest.approx(2.5, abs=1e-4)  # not SliceThickness (3.0)
    assert np.array_equal(s.data, sitk.GetArrayFromImage(ref).T)


def test_blank_uid_jpeg2000_series_matches_simpleitk(tmp_path):
    """The issue's case: a JPEG 2000 lossless CT series exported with empty Study, Series and
    SOP instance UIDs and SliceThickness 3.0 over slices 2.0 mm apart."""
    vol = small_ct()  # real voxels (nibabel's anatomical.nii), 33x41x25 at 2 mm
    for p in write_series(vol, tmp_path / "ct"):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = ""
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.SliceThickness = "3.0"
        ds.compress(JPEG2000Lossless)
        ds.save_as(p)
    got = read_all({"sources": [src(tmp_path)], "intensity": {"ct": "raw"}})
    assert [g[0] for g in got] == ["S"], got
    s, ref = got[0][2], sitk_series(tmp_path / "ct")
    assert s.data.shape == ref.GetSize() == (33, 41, 25)
    assert s.geometry.spacing == pytest.approx(ref.GetSpacing(), abs=1e-4)
    assert s.geometry.spacing[2] == pytest.approx(2.0, abs=1e-4)
    assert np.array_equal(s.data, sitk.GetArrayFromImage(ref).T)


def test_lone_ct_slice_is_an_image_not_a_volume(tmp_path):
    paths = export_ct5n(tmp_path, blank=True)
    for p in paths[1:]:
        p.unlink()
    got = read_all({"sources": [src(tmp_path)]})
    ds = pydicom.dcmread(paths[0])
    assert [g[0] for g in got] == ["S"] and got[0][2].kind == "image2d"
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    assert np.array_equal(got[0][2].data, hu)


def test_blank_uid_stacks_sharing_positions_are_quarantined_per_file(tmp_path):
    export_ct5n(tmp_path / "ct", blank=True)
    for p in export_ct5n(tmp_path / "tmp", blank=True):  # a second stack, same positions
        p.rename(tmp_path / "ct" / f"b{p.name}")
    got = read_all({"sources": [src(tmp_path)]})
    assert [g[0] for g in got] == ["Q"] * 10
    assert len({g[1] for g in got}) == 10 and all("ambiguous series" in g[2] for g in got)


def test_blank_uid_series_in_two_folders_stay_apart(tmp_path):
    export_ct5n(tmp_path / "a", blank=True)
    export_ct5n(tmp_path / "b", blank=True)
    got = read_all({"sources": [src(tmp_path)]})
    assert [(g[0], g[2].data.shape) for g in got] == [("S", (16, 16, 5))] * 2


# ---------------------------------------------------------------- mixed series


def test_two_echoes_in_one_series_become_two_volumes(tmp_path):
    series = generate_uid()

    def echo(n):
        def change(ds):
            ds.SeriesInstanceUID, ds.EchoNumbers = series, n
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            if n == 2:
                ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()

        return change

    export_ct5n(tmp_path / "e1", blank=False, Echo=echo(1))
    export_ct5n(tmp_path / "e2", blank=False, Echo=echo(2))
    got = read_all({"sources": [src(tmp_path)]})
    assert [g[0] for g in got] == ["S", "S"], got
    ref1, ref2 = sitk_series(tmp_path / "e1"), sitk_series(tmp_path / "e2")
    want = {sitk.GetArrayFromImage(r).T.astype(np.int32).tobytes() for r in (ref1, ref2)}
    assert {s.data.astype(np.int32).tobytes() for s in samples(got)} == want
    assert all(s.geometry.spacing[2] == pytest.approx(2.5, abs=1e-4) for s in samples(got))


def test_two_orientations_in_one_series_become_two_volumes(tmp_path):
    vol = small_ct()
    series = generate_uid()
    write_series(vol, tmp_path / "axial", series_uid=series)
    sag = sitk.PermuteAxes(vol, [2, 0, 1])  # the same voxels stacked along another axis
    write_series(sag, tmp_path / "sagittal", series_uid=series)
    got = read_all({"sources": [src(tmp_path)], "intensity": {"ct": "raw"}})
    assert [g[0] for g in got] == ["S", "S"], got
    for s, img in zip(samples(got), (vol, sag), strict=True):
        ref = sitk.DICOMOrient(img, "LPS")
        assert s.data.shape == ref.GetSize()
        assert np.allclose(s.geometry.spacing, ref.GetSpacing(), atol=1e-4)


def test_two_acquisitions_at_the_same_positions_become_two_volumes(tmp_path):
    series = generate_uid()

    def acq(n):
        def change(ds):
            ds.SeriesInstanceUID, ds.AcquisitionNumber = series, n
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()

        return change

    export_ct5n(tmp_path / "a1", blank=False, Acq=acq(1))
    export_ct5n(tmp_path / "a2", blank=False, Acq=acq(2))
    got = read_all({"sources": [src(tmp_path)]})
    assert [(g[0], g[2].data.shape) for g in got] == [("S", (16, 16, 5))] * 2


@pytest.mark.parametrize("folder, n", [("98892001/CT2N", 2), ("98892003/MR2", 7)])
def test_real_localizer_of_lone_planes_gives_one_image_per_plane(folder, n):
    # Real scouts: each series holds one slice per plane (CT2N: 2 planes in one series).
    got = read_all({"sources": [src(PYDICOM_FILES / "dicomdirtests" / folder)]})
    assert [(g[0], g[2].kind) for g in got] == [("S", "image2d")] * n


# ---------------------------------------------------------------- quarantine records
def _convert(root: Path) -> tuple[list, list[dict], list[str]]:
    """Samples and quarantine records of the conversion task (tasks.iter_samples, no Ray)."""
    spec = parse_spec({"sources": [src(root)]})
    s, kr = spec.sources[0], Keyring(KEY)
    fs, files, _ = list_files(s)
    reader = create_reader("dicom")
    ctx = ReadContext(fs, s, spec, kr)
    items = list(reader.group(files, {f.rel: reader.scan(f, ctx) for f in files}, s))
    part = PartResult("t0")
    got = [sample for _, sample in iter_samples(Task("t0", items), spec, kr, {}, part)]
    return got, part.quarantine, [shown_path(spec, kr, f.rel) for f in files]


def test_quarantined_series_lists_every_file(tmp_path):
    """The conversion task's records: one line per slice file, not one per series."""
    paths = write_series(small_ct(), tmp_path)
    paths[10].unlink()  # a missing slice: the whole series is refused
    got, records, shown = _convert(tmp_path)
    assert got == [] and len(shown) == 24
    assert sorted(r["path"] for r in records) == sorted(shown)
    assert all("missing slice" in r["reason"] for r in records)


# ---------------------------------------------------------------- pixel conventions

PYDICOM_DATA = Path(get_testdata_file("OBXXXX1A.dcm")).parent  # pydicom-data's store
ALLOW = {"deid": {"allow_burned_in": True}}  # these US/OT test images carry no such flag


def read_with(root: Path, names: list[str], options: dict | None = None, **spec_kw):
    """Like read_all, with the source's reader `options:` handed to the reader."""
    spec = parse_spec({"sources": [src(root, include=names, options=options or {})], **spec_kw})
    s, kr = spec.sources[0], Keyring(KEY)
    fs, files, _ = list_files(s)
    reader = create_reader("dicom", **s.options)
    ctx = ReadContext(fs, s, spec, kr)
    out = []
    for item in reader.group(files, {f.rel: reader.scan(f, ctx) for f in files}, s):
        out += list(reader.read(item, ReadContext(fs, s, spec, kr, {}, item)))
    return out


def one(root: Path, name: str, options: dict | None = None, **spec_kw):
    got = read_with(root, [name], options, **spec_kw)
    assert len(got) == 1 and got[0].kind == "image2d", got
    return got[0]


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", "OBXXXX1A_expb.dcm"])
def test_palette_color_is_stored_as_rgb(name):
    ds = pydicom.dcmread(PYDICOM_DATA / name)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    s = one(PYDICOM_DATA, name, **ALLOW)
    ref = pydicom.dcmread(PYDICOM_DATA / "OBXXXX1A.dcm")  # the same image, little endian
    want = apply_color_lut(ref.pixel_array, ref)
    assert s.data.shape == (600, 800, 3) and np.array_equal(s.data, want)
    assert s.meta["dicom"]["PhotometricInterpretation"] == "RGB"
    assert s.meta["dicom"]["SourcePhotometricInterpretation"] == "PALETTE COLOR"


def test_modality_lut_sequence_is_applied():
    ds = pydicom.dcmread(PYDICOM_DATA / "mlut_18.dcm")
    s = one(PYDICOM_DATA, "mlut_18.dcm", **ALLOW)
    want = apply_modality_lut(ds.pixel_array, ds)
    assert not np.array_equal(want, ds.pixel_array) and np.array_equal(s.data, want)
    assert s.meta["dicom"]["PixelTransforms"] == ["modality_lut"]


def test_voi_lut_is_kept_in_meta_and_applied_only_on_request():
    ds = pydicom.dcmread(PYDICOM_DATA / "vlut_04.dcm")
    raw = one(PYDICOM_DATA, "vlut_04.dcm", **ALLOW)
    assert np.array_equal(raw.data, ds.pixel_array)  # off by default
    (lut,) = raw.meta["dicom"]["VOILUTSequence"]
    assert lut["LUTDescriptor"] == [256, 0, 16] and lut["LUTData"] == list(
        ds.VOILUTSequence[0].LUTData
    )
    voi = one(PYDICOM_DATA, "vlut_04.dcm", {"voi_lut": True}, **ALLOW)
    assert np.array_equal(voi.data, apply_voi_lut(ds.pixel_array, ds))
    assert voi.meta["dicom"]["PixelTransforms"] == ["voi"]


def test_window_is_kept_and_ct_stays_in_hu_by_default():
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    s = one(PYDICOM_FILES, "MR_small.dcm")
    assert s.meta["dicom"]["WindowCenter"] == float(ds.WindowCenter)
    assert s.meta["dicom"]["WindowWidth"] == float(ds.WindowWidth)
    assert np.array_equal(s.data, ds.pixel_array)
    windowed = one(PYDICOM_FILES, "MR_small.dcm", {"voi_lut": True})
    assert np.array_equal(windowed.data, apply_voi_lut(ds.pixel_array, ds).astype(np.float32))
    ct = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    hu = one(PYDICOM_FILES, "CT_small.dcm").data
    assert np.array_equal(hu, ct.pixel_array * int(ct.RescaleSlope) + int(ct.RescaleIntercept))


@pytest.mark.parametrize(
    "name, ref, tol",
    [("SC_ybr_full_uncompressed.dcm", "SC_rgb.dcm", 6),  # YBR -> RGB rounds
     ("US1_J2KR.dcm", "US1_UNCR.dcm", 0)],  # JPEG 2000 reversible colour: exact
)  # fmt: skip
def test_photometric_interpretation_records_what_is_stored(name, ref, tol):
    ds = pydicom.dcmread(PYDICOM_DATA / name)
    assert ds.PhotometricInterpretation.startswith("YBR")
    s = one(PYDICOM_DATA, name, **ALLOW)
    assert s.meta["dicom"]["PhotometricInterpretation"] == "RGB"
    assert s.meta["dicom"]["SourcePhotometricInterpretation"] == ds.PhotometricInterpretation
    want = pydicom.dcmread(PYDICOM_DATA / ref).pixel_array.astype(int)
    assert np.abs(s.data.astype(int) - want).max() <= tol


@pytest.mark.parametrize("which, volumes", [("end", 1), ("middle", 0)])
def test_a_slice_that_does_not_decode_is_quarantined_on_its_own(tmp_path, which, volumes):
    paths = export_ct5n(tmp_path, blank=False)
    by_z = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    bad = by_z[-1 if which == "end" else 2]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 200])  # the RLE stream cut short
    got, records, shown = _convert(tmp_path)
    bad_shown = shown[sorted(paths).index(bad)]
    assert [s.data.shape for s in got] == [(16, 16, 4)] * volumes
    assert sorted(r["path"] for r in records) == sorted(shown if not volumes else [bad_shown])
    (bad_record,) = [r for r in records if r["path"] == bad_shown]  # one line per file
    assert bad_record["error"] == "UnreadableInput"
    assert all("missing slice" in r["reason"] for r in records if r is not bad_record)


@pytest.mark.parametrize("name", ["liver.dcm", "liver_expb.dcm"])
def test_dicom_seg_is_not_stored_as_an_image(name):
    # pydicom-data's liver.dcm: a 1-bit Segmentation Storage object (3 frames of masks).
    assert pydicom.dcmread(PYDICOM_DATA / name).Modality == "SEG"
    got = read_all({"sources": [src(PYDICOM_DATA, include=[name])]})
    assert [(g[0], g[1]) for g in got] == [("Q", name)] and "DICOM SEG" in got[0][2]


@pytest.mark.parametrize(
    "old, new, why",
    [(b"\x08\x00\x90\x00PN", b"\x08\x00\x90\x00PC", "NotImplementedError"),  # unknown VR
     (b"0.661468\\0.661468", b"0.66146\x8a\\0.661468", "ValueError")],  # a corrupt number
)  # fmt: skip
def test_corrupt_header_values_are_quarantined_with_the_cause(tmp_path, old, new, why):
    """Byte-level damage to pydicom's CT_small.dcm (found by bench/fuzz.py): pydicom parses
    values lazily, so the error surfaces late; it must still be a named quarantine."""
    data = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    assert data.count(old) == 1
    (tmp_path / "ct.dcm").write_bytes(data.replace(old, new))
    got = read_all({"sources": [src(tmp_path)]})
    assert got == [("Q", "ct.dcm", f"UnreadableInput: malformed DICOM header value ({why})")]


def test_a_syntax_without_a_decoder_is_named_as_unsupported():
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # video: pydicom has no decoder for it
    with pytest.raises(UnsupportedInput, match=r"unsupported transfer syntax \(MPEG2 Main"):
        stored_pixels(ds)
    assert reason_class("unsupported transfer syntax (MPEG2 Main Profile / Main Level)") == (
        "unsupported_transfer_syntax"
    )


def _seg_for(dss: list, masks: np.ndarray):
    """A DICOM SEG of `dss` built by highdicom (an independent writer of the standard)."""
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    descs = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"s{i + 1}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )  # fmt: skip
        for i in range(masks.shape[-1])
    ]
    return hd.seg.Segmentation(
        source_images=dss, pixel_array=masks, segment_descriptions=descs,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="medfm-test", manufacturer_model_name="t",
        software_versions="1", device_serial_number="1",
    )  # fmt: skip


def test_dicom_seg_becomes_the_label_map_of_its_series(tmp_path):
    export_ct5n(tmp_path / "ct", blank=False)
    dss = sorted((pydicom.dcmread(p) for p in (tmp_path / "ct").iterdir()),
                 key=lambda d: float(d.ImagePositionPatient[2]))  # fmt: skip
    hu = np.stack([d.pixel_array.astype(np.int32) - 1024 for d in dss])
    masks = np.stack([hu <= -100, hu > 0], axis=-1)
    _seg_for(dss, masks).save_as(tmp_path / "seg.dcm")
    got = read_all({"sources": [src(tmp_path)], "intensity": {"ct": "raw"}})
    assert [g[0] for g in got] == ["S"], got
    s = got[0][2]
    # The masks were cut from the same voxels: the label map must agree with them everywhere,
    # whatever the reorientation did to both.
    assert s.label_map is not None and s.label_map.shape == s.data.shape
    assert np.array_equal(s.label_map == 1, s.data <= -100)
    assert np.array_equal(s.label_map == 2, s.data > 0)
    assert np.array_equal(s.label_map == 0, (s.data > -100) & (s.data <= 0))
    assert s.meta["segments"] == {"1": "Tissue", "2": "Tissue"}


def _rtstruct_of(folder: Path, masks: dict[str, np.ndarray]):
    """An RTSTRUCT drawn on the series in `folder` by rt-utils (an independent writer): each
    mask (rows, cols, slices in rt-utils' position order) becomes one ROI's contours."""
    rt_utils = pytest.importorskip("rt_utils")
    rt = rt_utils.RTStructBuilder.create_new(dicom_series_path=str(folder))
    for name, mask in masks.items():
        rt.add_roi(mask=mask, name=name)
    return rt


def test_rtstruct_becomes_the_label_map_of_its_series(tmp_path):
    export_ct5n(tmp_path / "ct", blank=False)
    rows, cols = np.mgrid[:16, :16]
    disc = (rows - 7) ** 2 + (cols - 8) ** 2 <= 16
    square = (rows >= 2) & (rows < 6) & (cols >= 9) & (cols < 14)
    masks = {"GTV": np.stack([np.zeros_like(disc), disc, disc, disc, np.zeros_like(disc)], -1),
             "cord": np.stack([square] * 2 + [np.zeros_like(square)] * 3, -1)}  # fmt: skip
    rt = _rtstruct_of(tmp_path / "ct", masks)
    rt.save(str(tmp_path / "rs.dcm"))
    got = read_all({"sources": [src(tmp_path)], "intensity": {"ct": "raw"}})
    assert [g[0] for g in got] == ["S"], got
    s = got[0][2]
    assert s.meta["segments"] == {"1": "", "2": ""}  # ROIName is free text; nothing coded here
    assert np.allclose(s.geometry.direction, np.eye(3).ravel())  # (x, y, z) = (col, row, slice)
    # rt-utils' own rasterisation of the file it wrote (slices by ascending position, as here)
    ref = _rtstruct_read(tmp_path)
    want = np.zeros(s.data.shape, np.uint16)
    for value, name in ((1, "GTV"), (2, "cord")):
        assert ref[name].any()
        want[ref[name].transpose(1, 0, 2)] = value
    assert np.array_equal(s.label_map, want)


def _rtstruct_read(folder: Path) -> dict[str, np.ndarray]:
    rt_utils = pytest.importorskip("rt_utils")
    rt = rt_utils.RTStructBuilder.create_from(str(folder / "ct"), str(folder / "rs.dcm"))
    return {n: rt.get_roi_mask_by_name(n) for n in rt.get_roi_names()}


def test_an_unreferenced_rtstruct_is_quarantined_with_the_reason(tmp_path):
    export_ct5n(tmp_path / "ct", blank=False)
    rows, cols = np.mgrid[:16, :16]
    disc = (rows - 7) ** 2 + (cols - 8) ** 2 <= 16
    _rtstruct_of(tmp_path / "ct", {"GTV": np.stack([disc] * 5, -1)}).save(str(tmp_path / "rs.dcm"))
    alone = tmp_path / "alone"
    alone.mkdir()
    (tmp_path / "rs.dcm").rename(alone / "rs.dcm")
    got = read_all({"sources": [src(alone)]})
    assert [(g[0], g[1]) for g in got] == [("Q", "rs.dcm")]
    assert reason_class(got[0][2]) == "rtstruct_unreferenced", got


def _mark(square: np.ndarray, zs: tuple[float, ...]):
    """A change for export_ct5n: the slices at positions `zs` get 4000 inside `square`, so
    the structure can be found again in the stored voxels, whatever reorientation did."""

    def change(ds):
        if round(float(ds.ImagePositionPatient[2]), 4) in zs:
            arr = ds.pixel_array.copy()
            arr[square] = 4000
            ds.PixelData = arr.tobytes()

    return change


def test_rtstruct_on_a_rotated_series_lands_on_the_marked_voxels(tmp_path):
    # In-plane rotated 90 degrees: rows run along +y, columns along -x.
    rows, cols = np.mgrid[:16, :16]
    square = (rows >= 2) & (rows < 6) & (cols >= 9) & (cols < 14)  # off-centre: not symmetric
    zs = (1.2625, 3.7625)  # the 2nd and 3rd slice by position
    export_ct5n(tmp_path / "ct", blank=False, ImageOrientationPatient=[0, 1, 0, -1, 0, 0],
                PixelData=_mark(square, zs))  # fmt: skip
    off = np.zeros_like(square)
    rt = _rtstruct_of(tmp_path / "ct", {"GTV": np.stack([off, square, square, off, off], -1)})
    rt.save(str(tmp_path / "rs.dcm"))
    got = read_all({"sources": [src(tmp_path)], "intensity": {"ct": "raw"}})
    assert [g[0] for g in got] == ["S"], got
    s = got[0][2]
    marked = s.data == s.data.max()
    assert marked.sum() == 2 * square.sum()
    assert np.array_equal(s.label_map == 1, marked)


OFF_SLICE = "RTSTRUCT contour does not lie on a slice of its series"


def test_an_rtstruct_off_the_series_slices_quarantines_the_series(tmp_path):
    export_ct5n(tmp_path / "ct", blank=False)
    rows, cols = np.mgrid[:16, :16]
    disc = (rows - 7) ** 2 + (cols - 8) ** 2 <= 16
    _rtstruct_of(tmp_path / "ct", {"GTV": np.stack([disc] * 5, -1)}).save(str(tmp_path / "rs.dcm"))
    rs = pydicom.dcmread(tmp_path / "rs.dcm")
    contour = rs.ROIContourSequence[0].ContourSequence[0]
    pts = np.asarray(contour.ContourData, float).reshape(-1, 3)
    pts[:, 2] += 1.25  # half the 2.5 mm slice spacing: between two slices
    contour.ContourData = [f"{v:.4f}" for v in pts.ravel()]
    rs.save_as(tmp_path / "rs.dcm")
    got = read_all({"sources": [src(tmp_path)]})
    # one record for the series item (named by its first file), as for a SEG that does not fit
    assert got == [("Q", "ct/2062", "LabelMismatch: " + OFF_SLICE)], got


def test_an_inner_rtstruct_contour_is_a_hole(tmp_path):
    export_ct5n(tmp_path / "ct", blank=False)
    rows, cols = np.mgrid[:16, :16]
    outer = (rows >= 2) & (rows < 14) & (cols >= 2) & (cols < 14)
    off = np.zeros_like(outer)
    _rtstruct_of(tmp_path / "ct", {"ring": np.stack([off, outer, off, off, off], -1)}).save(
        str(tmp_path / "rs.dcm")
    )
    rs = pydicom.dcmread(tmp_path / "rs.dcm")
    seq = rs.ROIContourSequence[0].ContourSequence
    inner = copy.deepcopy(seq[0])  # the same slice, 4 voxels in from the outer square
    pts = np.asarray(inner.ContourData, float).reshape(-1, 3)
    centre = pts[:, :2].mean(0)
    pts[:, :2] = centre + (pts[:, :2] - centre) * 0.5
    inner.ContourData = [f"{v:.4f}" for v in pts.ravel()]
    seq.append(inner)
    rs.save_as(tmp_path / "rs.dcm")
    got = read_all({"sources": [src(tmp_path)], "intensity": {"ct": "raw"}})
    assert [g[0] for g in got] == ["S"], got
    ref = _rtstruct_read(tmp_path)["ring"]  # rt-utils' reading (OpenCV fillPoly, even-odd)
    assert ref[:, :, 1].sum() < outer.sum()  # it has a hole
    assert np.array_equal(got[0][2].label_map == 1, ref.transpose(1, 0, 2))


def test_rtstruct_segments_are_coded_values_not_the_free_text_roi_name(tmp_path):
    """ROIName can hold anything a person typed (a patient's name, a date): by default a
    segment is named by its RTROIIdentificationCodeSequence, else its RTROIInterpretedType."""
    export_ct5n(tmp_path / "ct", blank=False)
    rows, cols = np.mgrid[:16, :16]
    disc = (rows - 7) ** 2 + (cols - 8) ** 2 <= 16
    rt = _rtstruct_of(tmp_path / "ct", {"Smith^John liver": np.stack([disc] * 5, -1),
                                        "jd 12/03": np.stack([disc] * 5, -1)})  # fmt: skip
    first, second = rt.ds.RTROIObservationsSequence
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "10200004", "SCT", "Liver"
    first.RTROIIdentificationCodeSequence = [code]
    second.RTROIInterpretedType = "PTV"
    rt.save(str(tmp_path / "rs.dcm"))
    (got,) = read_all({"sources": [src(tmp_path)], "intensity": {"ct": "raw"}})
    assert got[2].meta["segments"] == {"1": "Liver", "2": "PTV"}
    assert "Smith" not in json.dumps(got[2].meta)
    (kept,) = read_all({"sources": [src(tmp_path)], "deid": {"keep_roi_names": True}})
    assert kept[2].meta["segments"] == {"1": "Smith^John liver", "2": "jd 12/03"}


def test_rtstruct_roi_names_reach_the_manifest_on_opt_in(tmp_path):
    """Through a real ingest job (local Ray), with deid.keep_roi_names: the ROI names reach
    the manifest's sample row, and the opt-in is recorded in the settings."""

    import ray

    from medfm.ingest.job import run_ingest
    from medfm.shards import Manifest

    export_ct5n(tmp_path / "in" / "ct", blank=False)
    rows, cols = np.mgrid[:16, :16]
    disc = (rows - 7) ** 2 + (cols - 8) ** 2 <= 16
    rt = _rtstruct_of(tmp_path / "in" / "ct", {"GTV": np.stack([disc] * 5, -1)})
    rt.save(str(tmp_path / "in" / "rs.dcm"))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        spec = parse_spec({"sources": [src(tmp_path / "in")], "deid": {"keep_roi_names": True}})
        run_ingest(spec, str(tmp_path / "out"), keyring=Keyring(KEY), progress=False)
    finally:
        ray.shutdown()
    (row,) = Manifest.open(str(tmp_path / "out")).rows()
    meta = row["meta"] if isinstance(row["meta"], dict) else json.loads(row["meta"])
    assert meta["segments"] == {"1": "GTV"}
    deid = Manifest.open(str(tmp_path / "out")).header["attributes"]["deidentification"]
    assert deid["roi_names"] == "kept"
    assert not (tmp_path / "out" / "quarantine.jsonl").read_text().strip()

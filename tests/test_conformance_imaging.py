"""Conformance sweep: every file shipped by pydicom's test data, pydicom-data and deid-data goes
through the DICOM reader (header scan, grouping, read; in-process, no Ray), every file of
nibabel's test data through the reader `format: auto` picks for it (or none), and each file's
outcome (the kind of sample it became, or the class of its quarantine reason) must equal the
committed table tests/conformance/imaging.csv. A change in any outcome fails here and is
reviewed into the table:

    MEDFM_CONFORMANCE_REGEN=1 pytest tests/test_conformance_imaging.py   # rewrite, then diff

Stored pixels are also checked against reference readers: pydicom's pixel_array (palette and
modality LUT applied) for 2D images, SimpleITK for DICOM volumes (voxels and geometry), nibabel
for NIfTI voxels (every time point of a 4D file); and every lossless encoding of one
image must decode to identical stored pixels.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from ingest_helpers import KEY, PYDICOM_FILES
from pydicom.pixels import apply_color_lut, apply_modality_lut

from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.ingest.readers.dicom import _native_grey, reason_class, stored_pixels
from medfm.ingest.registry import (
    IngestError,
    Quarantine,
    ReadContext,
    SourceFile,
    create_reader,
    is_companion,
    reader_for,
)
from medfm.io import get_fs, write_text

TABLE = Path(__file__).parent / "conformance" / "imaging.csv"
COLUMNS = ("file", "outcome", "reason", "group_files", "shape", "dtype")
NOT_DICOM_SUFFIXES = (".py", ".pyc")  # the packages' own modules, not test data


def _package_data(module: str, *parts: str) -> Path | None:
    spec = find_spec(module)
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent.joinpath(*parts)


CORPORA = {
    "pydicom": PYDICOM_FILES,
    "pydicom-data": _package_data("data_store", "data"),
    "deid-data": _package_data("deid_data", "data"),
    "nibabel": _package_data("nibabel", "tests", "data"),
}
# Corpora swept as `format: auto` does (reader by extension, else by content sniff); the others
# are all read as DICOM, whatever their names.
AUTO_CORPORA = {"nibabel"}
NIFTI = (".nii", ".nii.gz")
MAX_BYTES = 20 << 20  # a larger file is listed as skipped_large, not read (keeps the sweep fast)
# Stable short names for the other readers' quarantine reasons (the DICOM reader has its own,
# `reason_class`), by the text each reason starts with or contains; the first match wins.
OTHER_REASON_CLASSES = (
    ("unrecognised file format", "unrecognised_format"),
    ("corrupt gzip stream", "corrupt_gzip"),
    ("corrupt NIfTI header", "bad_nifti_header"),
    ("truncated: data shorter", "truncated"),
    ("cannot open image", "unreadable_file"),
    ("cannot read image", "unreadable_image"),  # ITK's own words vary; not worth a class each
    ("not a readable EDF or BDF file", "not_edf"),  # .rec: EDF's old extension, and PAR/REC's
    ("vector/RGB volumes", "vector_volume"),
    ("-D images are not supported", "unsupported_dimension"),
)

# The same image in several lossless encodings (uncompressed little/big endian, implicit VR,
# RLE, JPEG lossless, JPEG-LS lossless, JPEG 2000 lossless, planar or interleaved colour):
# stored pixels must be identical.
PD, PDD = "pydicom/", "pydicom-data/"
LOSSLESS = [
    [PD + n for n in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
                      "MR_small_expb.dcm", "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm",
                      "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm")],
    [PDD + "SC_rgb.dcm", PDD + "SC_rgb_expb.dcm", PD + "SC_rgb_rle.dcm",
     PD + "SC_rgb_jpeg_gdcm.dcm", PDD + "SC_rgb_gdcm2k_uncompressed.dcm"],
    [PDD + "SC_rgb_16bit.dcm", PDD + "SC_rgb_expb_16bit.dcm", PD + "SC_rgb_rle_16bit.dcm"],
    [PDD + "SC_rgb_32bit.dcm", PDD + "SC_rgb_expb_32bit.dcm", PD + "SC_rgb_rle_32bit.dcm"],
    [PDD + "SC_rgb_2frame.dcm", PDD + "SC_rgb_expb_2frame.dcm", PD + "SC_rgb_rle_2frame.dcm"],
    [PD + "SC_rgb_small_odd.dcm", PD + "SC_rgb_small_odd_big_endian.dcm"],
    [PD + "liver_1frame.dcm", PD + "liver_expb_1frame.dcm"],
    [PDD + "liver.dcm", PDD + "liver_expb.dcm"],
    [PD + "rtdose.dcm", PD + "rtdose_expb.dcm", PD + "rtdose_rle.dcm"],
    [PD + "rtdose_1frame.dcm", PD + "rtdose_expb_1frame.dcm", PD + "rtdose_rle_1frame.dcm"],
    [PDD + "OBXXXX1A.dcm", PDD + "OBXXXX1A_rle.dcm", PDD + "OBXXXX1A_expb.dcm"],
    [PDD + "OBXXXX1A_2frame.dcm", PDD + "OBXXXX1A_rle_2frame.dcm",
     PDD + "OBXXXX1A_expb_2frame.dcm"],
    [PDD + n for n in ("emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm",
                       "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm")],
    [PDD + "gdcm-US-ALOKA-16.dcm", PDD + "gdcm-US-ALOKA-16_big.dcm"],
    [PDD + "US1_UNCR.dcm", PDD + "US1_J2KR.dcm"],
    [PDD + "RG1_UNCR.dcm", PDD + "RG1_J2KR.dcm"],
    [PDD + "RG3_UNCR.dcm", PDD + "RG3_J2KR.dcm"],
    [PDD + "MR2_UNCR.dcm", PDD + "MR2_J2KR.dcm"],
    [PDD + "693_UNCR.dcm", PDD + "693_J2KR.dcm"],
    [PDD + "JPEG2000_UNC.dcm", PD + "JPEG2000.dcm"],
    [PDD + "color-pl.dcm", PDD + "color-px.dcm"],  # planar configuration 1 and 0
]  # fmt: skip


@dataclass
class Sweep:
    rows: dict[str, dict[str, str]] = field(default_factory=dict)
    # (corpus, item files' relative paths, samples) for the pixel checks
    converted: list[tuple[str, list[str], list[Any]]] = field(default_factory=list)


def _files(root: Path) -> list[SourceFile]:
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return [
        SourceFile(str(p), p.relative_to(root).as_posix(), p.stat().st_size)
        for p in paths
        if p.suffix not in NOT_DICOM_SUFFIXES and "__pycache__" not in p.parts
    ]


def _row(name: str, outcome: str, reason: str = "", n: int = 1, sample=None) -> dict[str, str]:
    data = getattr(sample, "data", None)
    shape = "x".join(str(d) for d in data.shape) if data is not None else ""
    return {"file": name, "outcome": outcome, "reason": reason, "group_files": str(n),
            "shape": shape, "dtype": str(data.dtype) if data is not None else ""}  # fmt: skip


def _reason_class(fmt: str, reason: str) -> str:
    if fmt == "dicom":
        return reason_class(reason)
    return next((name for text, name in OTHER_REASON_CLASSES if text in reason), "other")


def _by_format(corpus: str, files: list[SourceFile], out: Sweep) -> dict[str, list[SourceFile]]:
    """The files per reader, as `format: auto` discovery picks it (ingest/job.py `discover`);
    an unclaimed file is recorded as quarantined, a companion (`.raw` of an `.mhd`) as such."""
    by_format: dict[str, list[SourceFile]] = {}
    for f in files:
        name = f"{corpus}/{f.rel}"
        if f.size > MAX_BYTES:
            out.rows[name] = _row(name, "skipped_large")
            continue
        with open(f.path, "rb") as fh:
            fmt = reader_for(f.rel) or (
                None if is_companion(f.rel) else reader_for(f.rel, fh.read(132))
            )
        if fmt is not None:
            by_format.setdefault(fmt, []).append(f)
        elif is_companion(f.rel):
            out.rows[name] = _row(name, "companion")
        else:
            out.rows[name] = _row(name, "quarantine", "unrecognised_format")
    return by_format


def _sweep_corpus(corpus: str, root: Path, out: Sweep) -> None:
    files = _files(root)
    groups = _by_format(corpus, files, out) if corpus in AUTO_CORPORA else {"dicom": files}
    for fmt, group in sorted(groups.items()):
        _sweep_format(corpus, root, fmt, group, out)


def _sweep_format(corpus: str, root: Path, fmt: str, files: list[SourceFile], out: Sweep) -> None:
    # MR kept raw: the stored values are then the reference readers' values
    spec = parse_spec({"sources": [{"name": "c", "root": str(root), "format": fmt}],
                       "deid": {"allow_burned_in": True}, "intensity": {"mr": "raw"}})  # fmt: skip
    src, kr = spec.sources[0], Keyring(KEY)
    fs, _ = get_fs(str(root))
    reader = create_reader(fmt)
    ctx = ReadContext(fs, src, spec, kr)
    scans = {f.rel: reader.scan(f, ctx) for f in files}
    for item in reader.group(files, scans, src):
        if isinstance(item, Quarantine):
            name = f"{corpus}/{item.rel}"
            out.rows[name] = _row(name, "quarantine", _reason_class(fmt, item.reason))
            continue
        rels = [f.rel for f in item.files]
        try:
            got = list(
                create_reader(item.format).read(item, ReadContext(fs, src, spec, kr, {}, item))
            )
        except IngestError as e:
            got = [Quarantine(rel, str(e)) for rel in rels]
        refused = {q.rel: q for q in got if isinstance(q, Quarantine)}
        samples = [s for s in got if not isinstance(s, Quarantine)]
        for rel in rels:
            name = f"{corpus}/{rel}"
            if rel in refused:
                n = 1 if samples else len(rels)  # refused alone, or with its whole series
                reason = _reason_class(item.format, refused[rel].reason)
                out.rows[name] = _row(name, "quarantine", reason, n)
            else:
                kind = "+".join(sorted({s.kind for s in samples}))
                out.rows[name] = _row(name, kind, "", len(rels), samples[0])
        if samples:
            out.converted.append((corpus, [r for r in rels if r not in refused], samples))


@pytest.fixture(scope="module")
def sweep() -> Sweep:
    out = Sweep()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd file in its test set
        for corpus, root in CORPORA.items():
            if root is not None and root.is_dir():
                _sweep_corpus(corpus, root, out)
    return out


def _read_table() -> list[dict[str, str]]:
    return list(csv.DictReader(TABLE.read_text().splitlines()))


def _write_table(rows: list[dict[str, str]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: r["file"]))
    write_text(TABLE, buf.getvalue())


def test_every_file_has_the_outcome_in_the_table(sweep):
    if os.environ.get("MEDFM_CONFORMANCE_REGEN") == "1":
        _write_table(list(sweep.rows.values()))
    present = {c for c, root in CORPORA.items() if root is not None and root.is_dir()}
    want = {r["file"]: r for r in _read_table() if r["file"].split("/")[0] in present}
    changed = [
        f"{name}: table {want.get(name)} != now {sweep.rows.get(name)}"
        for name in sorted(want.keys() | sweep.rows.keys())
        if want.get(name) != sweep.rows.get(name)
    ]
    assert not changed, "outcomes changed (review, then MEDFM_CONFORMANCE_REGEN=1):\n" + "\n".join(
        changed
    )
    assert "other" not in {r["reason"] for r in sweep.rows.values()}  # every reason is named
    assert "unexpected_error" not in {r["reason"] for r in sweep.rows.values()}


def _reference_2d(path: Path) -> np.ndarray:
    """pydicom's own reading of a 2D image: pixel_array, then the palette or the modality LUT
    (rescale) and, for MONOCHROME1, the inversion medfm stores."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR":
        return apply_color_lut(arr, ds) if ds.original_encoding[1] else None
    if not pi.startswith("MONOCHROME"):
        return arr
    arr = apply_modality_lut(arr, ds)
    if pi == "MONOCHROME1":
        top = (1 << int(ds.BitsStored)) - 1
        arr = (
            top - arr
            if np.issubdtype(arr.dtype, np.unsignedinteger)
            else arr.max() + arr.min() - arr
        )
    return arr


def test_2d_pixels_equal_pydicom(sweep):
    checked = 0
    for corpus, rels, samples in sweep.converted:
        if len(samples) != 1 or samples[0].kind != "image2d":
            continue
        want = _reference_2d(CORPORA[corpus] / rels[0])
        if want is None:  # big-endian palette: pydicom's own LUT reading is wrong there
            continue
        got, name = samples[0].data, f"{corpus}/{rels[0]}"
        if got.dtype.kind == "f":  # rescaled (and MONOCHROME1-inverted) in float32
            assert np.allclose(got, want, rtol=1e-6, atol=0), name
        else:
            assert np.array_equal(got, want), name
        checked += 1
    assert checked > 100


def _sitk_volume(paths: list[Path]) -> sitk.Image:
    if len(paths) == 1:
        return sitk.DICOMOrient(sitk.ReadImage(str(paths[0])), "LPS")
    reader = sitk.ImageSeriesReader()
    uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(paths[0].parent), uid))
    return sitk.DICOMOrient(reader.Execute(), "LPS")


# Where SimpleITK's voxel values differ for a known reason (geometry is still compared).
SITK_VOXELS_DIFFER = {
    "pydicom/rtdose_expb.dcm": "GDCM byte-swaps this big-endian 32-bit dose grid (the little-"
    "endian rtdose.dcm agrees, and the lossless test ties the two together)",
}


def test_volumes_equal_simpleitk(sweep):
    checked = 0
    for corpus, rels, samples in sweep.converted:
        if [s.kind for s in samples] != ["volume3d"] or rels[0].endswith(NIFTI):
            continue  # NIfTI: test_nifti_voxels_equal_nibabel
        s, ref = samples[0], _sitk_volume([CORPORA[corpus] / r for r in rels])
        name = f"{corpus}/{rels[0]}"
        assert s.data.shape == ref.GetSize(), name
        assert np.allclose(s.geometry.spacing, ref.GetSpacing(), atol=1e-4), name
        assert np.allclose(s.geometry.origin, ref.GetOrigin(), atol=1e-3), name
        if name not in SITK_VOXELS_DIFFER:
            want = sitk.GetArrayFromImage(ref).T
            assert np.array_equal(s.data.astype(np.float64), want.astype(np.float64)), name
        checked += 1
    assert checked >= 5


def _nibabel_lps(path: Path) -> np.ndarray:
    """nibabel's scaled voxels, permuted/flipped onto the nearest LPS axes (as medfm stores a
    volume by default), time last."""
    img = nib.load(path)
    turn = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt("LPS")
    )
    return nib.orientations.apply_orientation(img.get_fdata(), turn)


def test_nifti_voxels_equal_nibabel(sweep):
    checked = 0
    for corpus, rels, samples in sweep.converted:
        if not rels[0].endswith(NIFTI):
            continue
        want, name = _nibabel_lps(CORPORA[corpus] / rels[0]), f"{corpus}/{rels[0]}"
        want = want.reshape(*want.shape[:3], -1)  # a 3D file: one time point
        assert len(samples) == want.shape[3], name
        for t, s in enumerate(samples):
            assert s.kind == "volume3d", name
            ok = np.allclose(s.data, want[..., t], rtol=1e-6, atol=0, equal_nan=True)
            assert ok, f"{name} t={t}"  # NaN voxels (resampled_anat_moved) are kept as NaN
        checked += 1
    assert checked >= 5


def _path(name: str) -> Path | None:
    corpus, rel = name.split("/", 1)
    root = CORPORA[corpus]
    return root / rel if root is not None and (root / rel).is_file() else None


@pytest.mark.parametrize("names", LOSSLESS, ids=[g[0].split("/", 1)[1] for g in LOSSLESS])
def test_lossless_encodings_store_identical_pixels(names):
    paths = [_path(n) for n in names]
    if None in paths:
        pytest.skip("a data package is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = [stored_pixels(pydicom.dcmread(p)) for p in paths]
    for p, st in zip(paths[1:], stored[1:], strict=True):
        assert st.photometric == stored[0].photometric, p.name
        assert st.pixels.dtype == stored[0].pixels.dtype, p.name
        assert np.array_equal(st.pixels, stored[0].pixels), p.name


def _native_files() -> list[Path]:
    roots = [CORPORA[c] for c in ("pydicom", "pydicom-data", "deid-data") if CORPORA[c]]
    files = (p for r in roots for p in sorted(r.rglob("*")) if p.is_file())
    return [p for p in files if p.stat().st_size <= MAX_BYTES]


def test_native_fast_path_equals_pydicom_decoder():
    """The Ray task reads uncompressed grey slices itself (`_native_grey`): on every file of
    the DICOM corpora where it applies, the array is pydicom's pixel_array, dtype included."""
    checked, unused_bits = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in _native_files():
            try:
                ds = pydicom.dcmread(path)
                ts = ds.file_meta.TransferSyntaxUID
                want = ds.pixel_array
            except Exception:  # noqa: BLE001 - not a DICOM image pydicom can decode
                continue
            got = _native_grey(ds, ts)
            if got is None:
                continue
            assert got.dtype == want.dtype and np.array_equal(got, want), path.name
            checked += 1
            unused_bits += int(ds.BitsStored) < int(ds.BitsAllocated)
    assert checked > 50 and unused_bits > 5, (checked, unused_bits)

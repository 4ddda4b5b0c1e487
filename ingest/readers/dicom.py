"""DICOM: series grouping, slice ordering, geometry checks, pixel decoding, de-identification.

Files are scanned (header only, no `force=True`: a non-DICOM file fails on the 132-byte
preamble check, in bounded time and memory), grouped by SeriesInstanceUID across folders, and
each series is ordered by ImagePositionPatient projected on the slice normal. Single-frame
projection modalities (CR, DX, MG, US, SC, ...) become image2d samples; multi-frame and
enhanced objects become volumes from their per-frame functional groups.
"""

from __future__ import annotations

import copy
import io
import posixpath
import struct
from collections import defaultdict
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import as_pixel_options

from medfm.shards import Geometry, Sample

from ..dicom_deid import deidentify, safe_meta
from ..imaging import Volume, fit_2d, volume_sample
from ..registry import (
    READERS,
    GeometryError,
    LabelMismatch,
    PrivacyError,
    Quarantine,
    ReadContext,
    Reader,
    SourceFile,
    SourceItem,
    UnreadableInput,
    UnsupportedInput,
    register_reader,
)
from ..sources import identity
from .itk import read_label
from .rtstruct import RTSTRUCT, RTSTRUCT_REASON, referenced_series, rtstruct_label

PROJECTION_MODALITIES = {"CR", "DX", "MG", "US", "SC", "OT", "XA", "RF", "IO", "PX", "ES",
                         "XC", "OP", "SM", "GM", "BMD"}  # fmt: skip
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
SEG_REASON = (
    "DICOM SEG holds label masks, not an image: it becomes the label map of the one series it "
    "references, and that series is not among this source's stacks"
)
# Uncompressed little-endian syntaxes: Implicit and Explicit VR (the Ray task's fast path)
LITTLE_ENDIAN_NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
HEADER_DEFER = "2 KB"  # large header values stay on disk while scanning
TILT_TOL = np.tan(np.deg2rad(0.5))
SPACING_RTOL = 0.05
# Stable short names for the quarantine reasons of this reader, by the text each reason starts
# with or contains: the conformance table (tests/conformance/imaging.csv) records these.
REASON_CLASSES = (
    ("not a DICOM file", "not_dicom"),
    ("cannot parse DICOM header", "unparsable_header"),
    ("malformed DICOM header value", "malformed_header_value"),
    ("unsupported transfer syntax", "unsupported_transfer_syntax"),
    ("cannot decode pixel data", "decode_failed"),
    ("without pixel data", "no_pixel_data"),
    ("DICOM SEG holds label masks", "segmentation"),
    ("DICOM RTSTRUCT holds contours", "rtstruct_unreferenced"),
    ("no waveform reader", "no_waveform_reader"),
    ("BurnedInAnnotation", "burned_in_annotation"),
    ("ambiguous series", "ambiguous_series"),
    ("missing slice", "missing_slices"),
    ("duplicate slice positions", "duplicate_positions"),
    ("mixed orientations", "mixed_orientations"),
    ("inconsistent in-plane size", "inconsistent_in_plane"),
    ("gantry tilt", "gantry_tilt"),
    ("inconsistent slice spacing", "inconsistent_spacing"),
    ("not two orthonormal vectors", "bad_orientation"),
    ("slice without ImagePositionPatient", "no_position"),
    ("is missing or not numeric", "bad_geometry_value"),
    ("values required", "bad_geometry_value"),
    ("single slice is not a volume", "single_slice"),
    ("two copies of one SOP instance", "conflicting_copies"),
    ("(cine) is not converted", "cine"),
    ("colour volumes", "colour_volume"),
    ("without per-frame plane geometry", "no_frame_geometry"),
    ("unusable palette", "bad_palette"),
    ("unexpected", "unexpected_error"),
)


def reason_class(reason: str) -> str:
    """The stable short name of a quarantine reason (`other` for one this reader never gives)."""
    return next((name for text, name in REASON_CLASSES if text in reason), "other")


AMBIGUOUS = (
    "ambiguous series: no SeriesInstanceUID, and files of one folder, frame of reference, "
    "orientation, size, echo and acquisition share slice positions"
)


# What pydicom raises for a corrupt file, at parse time or when a value is first converted
# (elements are parsed lazily): unknown VRs, odd value lengths, unparsable numbers, truncation.
MALFORMED = (ValueError, TypeError, OverflowError, NotImplementedError, BytesLengthException,
             struct.error, KeyError, IndexError, AttributeError, EOFError)  # fmt: skip


def _read(path_or_file: Any, **kw: Any) -> Dataset:
    try:
        return pydicom.dcmread(path_or_file, **kw)
    except InvalidDicomError:
        raise UnreadableInput("not a DICOM file (no DICM preamble/prefix)") from None
    except (*MALFORMED, OSError, MemoryError) as e:  # MemoryError: a huge declared length
        raise UnreadableInput(f"cannot parse DICOM header ({type(e).__name__})") from None


def _read_recorded(ctx: ReadContext, f: SourceFile) -> Dataset:
    """Parse a file from one read of its bytes, which also give its provenance hash (else
    every slice of a series would be read twice)."""
    try:
        data = ctx.fs.cat_file(f.path)
    except OSError as e:
        raise UnreadableInput(f"cannot read file ({type(e).__name__})") from None
    ctx.record_digest(f, data)
    return _read(io.BytesIO(data))


@dataclass
class Frame:
    """One 2D plane of a volume: its position, orientation, pixel spacing and pixels."""

    position: np.ndarray
    orientation: np.ndarray
    spacing_rc: tuple[float, float]
    pixels: np.ndarray


def _floats(v: Any, n: int, what: str) -> np.ndarray:
    try:
        a = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        raise GeometryError(f"{what} is missing or not numeric") from None
    if a.shape != (n,):
        raise GeometryError(f"{what}: {n} values required")
    return a


def _rescale(arr: np.ndarray, slope: Any, intercept: Any) -> np.ndarray:
    slope = float(slope) if slope not in (None, "") else 1.0
    intercept = float(intercept) if intercept not in (None, "") else 0.0
    if slope == 1.0 and intercept == 0.0:
        return arr
    if slope == 1.0 and intercept == int(intercept) and arr.dtype.kind in "iu":
        return _shift(arr, int(intercept))  # CT's usual -1024: integers, no float64 copy
    out = arr.astype(np.float64) * slope + intercept
    if slope == int(slope) and intercept == int(intercept):
        lo, hi = out.min(initial=0), out.max(initial=0)
        if -32768 <= lo and hi <= 32767:
            return out.astype(np.int16)
        return out.astype(np.int32)
    return out.astype(np.float32)


def _shift(arr: np.ndarray, intercept: int) -> np.ndarray:
    """arr + intercept as int16 when every value fits (else int32), as _rescale's float path
    would store it."""
    lo, hi = int(arr.min(initial=0)) + intercept, int(arr.max(initial=0)) + intercept
    dtype = np.int16 if -32768 <= min(lo, 0) and max(hi, 0) <= 32767 else np.int32
    out = arr.astype(dtype)  # may wrap, but int16 addition is modular: exact when it fits
    out += dtype(intercept)
    return out


def _invert_monochrome1(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    """MONOCHROME1 shows low values white; store the MONOCHROME2 convention."""
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        top = (1 << int(ds.get("BitsStored", arr.dtype.itemsize * 8))) - 1
        return (top - np.minimum(arr, top)).astype(arr.dtype)
    return (arr.max() + arr.min() - arr).astype(arr.dtype)


def _native_grey(ds: Dataset, ts: str) -> np.ndarray | None:
    """A little-endian, uncompressed, single-frame, single-sample image read straight from
    PixelData, bit for bit what pydicom's native decoder gives (unused high bits cleared or
    sign-extended the same way), or None for anything else. Its validation and option
    handling cost more than the decode itself: 0.9 ms of a CT slice's 1.3 ms."""
    if ts not in LITTLE_ENDIAN_NATIVE or "PixelData" not in ds:
        return None
    try:
        bits, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        rows, cols, signed = int(ds.Rows), int(ds.Columns), int(ds.PixelRepresentation)
        frames, samples = int(ds.get("NumberOfFrames", 1) or 1), int(ds.SamplesPerPixel)
    except (AttributeError, TypeError, ValueError):
        return None
    if bits not in (8, 16, 32) or samples != 1 or frames != 1 or not 0 < stored <= bits:
        return None
    data, n = ds.PixelData, rows * cols
    if not isinstance(data, bytes) or rows < 1 or cols < 1 or len(data) < n * bits // 8:
        return None  # pydicom's validation names the defect
    dtype = np.dtype(f"<{'i' if signed == 1 else 'u'}{bits // 8}")
    arr = np.frombuffer(data, dtype, count=n).reshape(rows, cols).copy()
    if stored < bits:  # as pydicom's _correct_unused_bits: shift the unused bits out and back
        np.left_shift(arr, bits - stored, out=arr)
        np.right_shift(arr, bits - stored, out=arr)
    return arr


def _pixels(ds: Dataset) -> tuple[np.ndarray, str]:
    """Decoded pixels and the photometric interpretation they come out in: pydicom converts
    YBR_FULL(_422) and JPEG 2000's YBR_ICT/RCT to RGB, so the header's value is not it."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        raise UnreadableInput("cannot decode pixel data (no TransferSyntaxUID in the file meta)")
    arr = _native_grey(ds, ts)
    if arr is not None:
        return arr, str(ds.get("PhotometricInterpretation", "")).upper()
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:  # video (MPEG, HEVC) and other syntaxes pydicom cannot decode
        raise UnsupportedInput(f"unsupported transfer syntax ({ts.name})") from None
    if not decoder.is_available:
        raise UnsupportedInput(f"unsupported transfer syntax ({ts.name}): no decoder installed")
    try:
        arr, info = decoder.as_array(ds, validate=True, **as_pixel_options(ds, as_rgb=True))
    except Exception as e:  # noqa: BLE001 - every decoder has its own exception types
        raise UnreadableInput(f"cannot decode pixel data ({ts.name}: {type(e).__name__})") from None
    pi = info.get("photometric_interpretation") or ds.get("PhotometricInterpretation", "")
    return arr, str(pi).upper()


def _palette_rgb(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """apply_color_lut, with a big-endian file's palette tables swapped to little-endian
    words first: pydicom 3.0 reads non-segmented OW table data as little-endian whatever
    the transfer syntax, which turned OBXXXX1A_expb.dcm's colours into nonsense."""
    if ds.original_encoding[1] is not False:
        return apply_color_lut(arr, ds)
    tables = Dataset()
    tables.file_meta = ds.file_meta  # segmented tables are read by the file's endianness
    for elem in ds:
        if "PaletteColorLookupTable" in elem.keyword:
            value = elem.value
            plain = not elem.keyword.startswith("Segmented")
            if plain and elem.keyword.endswith("Data") and isinstance(value, bytes):
                value = np.frombuffer(value, ">u2").astype("<u2").tobytes()
            tables.add_new(elem.tag, elem.VR, value)
    return apply_color_lut(arr, tables)


@dataclass
class Stored:
    """Pixels as medfm stores them, with their photometric interpretation and the steps
    that led there from the file's values (recorded in meta.dicom)."""

    pixels: np.ndarray
    photometric: str
    steps: list[str]


def stored_pixels(ds: Dataset, voi: bool = False) -> Stored:
    """Decode and bring to the stored convention: palette indices become RGB; grey values go
    through the Modality LUT Sequence (or rescale slope/intercept), then the VOI transform
    only when asked (`voi`: window or VOI LUT), and MONOCHROME1 is inverted."""
    arr, pi = _pixels(ds)
    if not arr.dtype.isnative:  # big-endian files decode big-endian: store native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    header_pi = str(ds.get("PhotometricInterpretation", "")).upper()
    steps = [f"{header_pi.lower()}_to_rgb"] if pi == "RGB" and header_pi not in ("RGB", "") else []
    if pi == "PALETTE COLOR":
        try:
            arr = _palette_rgb(arr, ds)
        except (ValueError, KeyError, AttributeError, IndexError) as e:
            raise UnsupportedInput(f"PALETTE COLOR image with an unusable palette: {e}") from None
        return Stored(arr, "RGB", ["palette"])
    if not pi.startswith("MONOCHROME"):
        return Stored(arr, pi, steps)
    if "ModalityLUTSequence" in ds:
        arr = apply_modality_lut(arr, ds)
        steps.append("modality_lut")
    else:
        scaled = _rescale(arr, ds.get("RescaleSlope"), ds.get("RescaleIntercept"))
        steps += ["rescale"] if scaled is not arr else []
        arr = scaled
    if voi and ("VOILUTSequence" in ds or "WindowCenter" in ds):
        arr = apply_voi_lut(arr, ds).astype(np.float32)
        steps.append("voi")
    if pi == "MONOCHROME1":
        arr = _invert_monochrome1(ds, arr)
        steps.append("invert_monochrome1")
    return Stored(arr, "MONOCHROME2", steps)


def _check_burned_in(ds: Dataset, ctx: ReadContext) -> None:
    if ctx.spec.deid.allow_burned_in:
        return
    value = str(ds.get("BurnedInAnnotation", "")).upper()
    if value == "YES":
        raise PrivacyError("BurnedInAnnotation is YES (set deid.allow_burned_in to accept)")
    risky = ds.get("Modality") in ("US", "SC", "OT") or ds.get("SOPClassUID", "").startswith(
        SECONDARY_CAPTURE
    )
    if not value and risky:
        raise PrivacyError(
            f"BurnedInAnnotation missing on a {ds.get('Modality', '?')} / secondary-capture "
            "image (set deid.allow_burned_in to accept)"
        )


def _frame_group(ds: Dataset, i: int, name: str) -> Dataset | None:
    """A functional group item of frame i: per-frame first, then shared."""
    for seq_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if not seq:
            continue
        item = seq[i] if seq_name.startswith("PerFrame") and len(seq) > i else seq[0]
        if name in item and item[name].value:
            return item[name].value[0]
    return None


def multiframe_frames(ds: Dataset) -> list[Frame]:
    """Frames of an enhanced (functional groups) or legacy (GridFrameOffsetVector) object."""
    enhanced = "PerFrameFunctionalGroupsSequence" in ds
    if not enhanced and ("GridFrameOffsetVector" not in ds or "ImagePositionPatient" not in ds):
        # refused before decoding: a cine loop can be hundreds of compressed frames
        raise UnsupportedInput("multi-frame object without plane positions (cine) is not converted")
    pixels, _ = _pixels(ds)
    n = int(ds.get("NumberOfFrames", 1))
    if pixels.ndim == 2:
        pixels = pixels[None]
    frames = []
    if enhanced:
        for i in range(n):
            pos, ori = (
                _frame_group(ds, i, "PlanePositionSequence"),
                _frame_group(ds, i, "PlaneOrientationSequence"),
            )
            meas = _frame_group(ds, i, "PixelMeasuresSequence")
            if pos is None or ori is None or meas is None:
                raise UnsupportedInput("multi-frame object without per-frame plane geometry")
            pvt = _frame_group(ds, i, "PixelValueTransformationSequence")
            px = pixels[i]
            if pvt is not None:
                px = _rescale(px, pvt.get("RescaleSlope"), pvt.get("RescaleIntercept"))
            frames.append(
                Frame(
                    _floats(pos.ImagePositionPatient, 3, "ImagePositionPatient"),
                    _floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                    tuple(_floats(meas.PixelSpacing, 2, "PixelSpacing")),
                    px,
                )
            )
        return frames
    offsets = ds.GridFrameOffsetVector
    ori = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient")
    normal = np.cross(ori[:3], ori[3:])
    origin = _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient")
    scaled = _rescale(pixels, ds.get("RescaleSlope"), ds.get("RescaleIntercept"))
    spacing = tuple(_floats(ds.PixelSpacing, 2, "PixelSpacing"))
    return [
        Frame(origin + float(off) * normal, ori, spacing, scaled[i])
        for i, off in enumerate(offsets)
    ]


def stack_frames(frames: list[Frame]) -> Volume:
    """Order frames along the slice normal, check the geometry, return the volume. The slice
    spacing comes from the positions only: SliceThickness is not the distance between slices
    (overlapping or gapped reconstructions), and one slice has no spacing at all."""
    if len(frames) < 2:
        raise GeometryError("a single slice is not a volume")
    ori = frames[0].orientation
    for f in frames[1:]:
        if not np.allclose(f.orientation, ori, atol=1e-4):
            raise GeometryError("mixed orientations within the series")
        if f.pixels.shape != frames[0].pixels.shape or not np.allclose(
            f.spacing_rc, frames[0].spacing_rc, rtol=1e-4
        ):
            raise GeometryError("inconsistent in-plane size or pixel spacing within the series")
    row, col = ori[:3], ori[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise GeometryError("ImageOrientationPatient is not two orthonormal vectors")
    frames = sorted(frames, key=lambda f: float(f.position @ normal))
    proj = np.array([f.position @ normal for f in frames])
    gaps = np.diff(proj)
    if np.any(gaps < 1e-3):
        raise GeometryError("duplicate slice positions (several stacks or echoes in one series)")
    span = frames[-1].position - frames[0].position
    lateral = span - (span @ normal) * normal
    if np.linalg.norm(lateral) > TILT_TOL * abs(span @ normal):
        deg = np.degrees(np.arctan2(np.linalg.norm(lateral), abs(span @ normal)))
        raise GeometryError(f"gantry tilt or sheared stack ({deg:.1f} degrees)")
    step = float(np.median(gaps))
    if gaps.max() > 1.5 * step:
        missing = int(round(gaps.max() / step)) - 1
        raise GeometryError(
            f"missing slice(s): a gap of {gaps.max():.2f} mm where the spacing is "
            f"{step:.2f} mm (about {missing} slice(s) missing)"
        )
    if np.abs(gaps - step).max() > SPACING_RTOL * step:
        raise GeometryError(f"inconsistent slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm)")
    arr = np.stack([f.pixels for f in frames])
    if arr.ndim != 3:
        raise UnsupportedInput("colour volumes are not supported")
    ps_row, ps_col = frames[0].spacing_rc  # PixelSpacing = (row spacing, column spacing)
    geometry = Geometry(
        (float(ps_col), float(ps_row), step),
        tuple(float(x) for x in frames[0].position),
        tuple(float(x) for x in np.stack([row, col, normal], axis=1).ravel()),
    )
    return Volume(arr.transpose(2, 1, 0), geometry)  # (K, J, I) slices seen as (I, J, K)


def unique_instances(datasets: list[Dataset], frames: list[Frame]) -> list[Frame]:
    """One frame per SOPInstanceUID: identical copies of an instance (the same file stored
    twice, or in another transfer syntax) collapse; differing copies are an error."""
    by_uid: dict[str, Frame] = {}
    out = []
    for ds, f in zip(datasets, frames, strict=True):
        uid = str(ds.get("SOPInstanceUID", "")) or str(id(ds))
        if uid not in by_uid:
            by_uid[uid] = f
            out.append(f)
        elif not np.array_equal(by_uid[uid].pixels, f.pixels):
            raise GeometryError("two copies of one SOP instance hold different pixels")
    return out


def _dtype_for_volume(frames: list[Frame]) -> None:
    """Slices rescaled differently can come out int16 and float32: make them agree."""
    kinds = {f.pixels.dtype for f in frames}
    if len(kinds) > 1:
        dtype = np.result_type(*kinds)
        for f in frames:
            f.pixels = f.pixels.astype(dtype)


def _stack_keys(ds: Dataset, f: SourceFile) -> dict[str, Any]:
    """The header values that decide which stack a single-frame slice belongs to."""

    def numbers(kw: str, n: int) -> list[float] | None:
        try:
            a = [float(x) for x in ds.get(kw) or []]
        except (TypeError, ValueError):
            return None
        return a if len(a) == n else None

    return {
        "folder": posixpath.dirname(f.rel),
        "frame_of_ref": str(ds.get("FrameOfReferenceUID", "")),
        "modality": str(ds.get("Modality", "")),
        "sop": str(ds.get("SOPInstanceUID", "")),
        "size": (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)),
        "iop": numbers("ImageOrientationPatient", 6),
        "ipp": numbers("ImagePositionPatient", 3),
        "echo": str(ds.get("EchoNumbers", "") or ds.get("EchoTime", "")),
        "acq": str(ds.get("AcquisitionNumber", "")),
    }


def _series_key(scan: dict[str, Any]) -> tuple[str, ...]:
    """SeriesInstanceUID when there is one; exports that blank it are grouped by what a
    stack shares instead (orientation, size and echo split further in `_substacks`)."""
    if scan["series"]:
        return ("uid", scan["series"])
    return ("folder", scan["folder"], scan["frame_of_ref"], scan["modality"])


def _substacks(members: list[SourceFile], scans: dict[str, Any]) -> list[list[SourceFile]]:
    """Split by orientation (within the tolerance `stack_frames` checks), size and echo."""
    planes: list[np.ndarray] = []
    parts: dict[tuple[Any, ...], list[SourceFile]] = defaultdict(list)
    for f in members:
        s = scans[f.rel]
        plane = -1  # no orientation: `_slice` names the missing attribute
        if s["iop"] is not None:
            v = np.asarray(s["iop"])
            plane = next((i for i, p in enumerate(planes) if np.allclose(p, v, atol=1e-4)), -1)
            if plane < 0:
                planes.append(v)
                plane = len(planes) - 1
        parts[(plane, tuple(s["size"]), s["echo"])].append(f)
    return list(parts.values())


def _shares_positions(part: list[SourceFile], scans: dict[str, Any]) -> bool:
    """Two distinct instances at one slice position: more than one stack in `part`."""
    first = scans[part[0].rel]
    if first["iop"] is None or any(scans[f.rel]["ipp"] is None for f in part):
        return False
    normal = np.cross(first["iop"][:3], first["iop"][3:])
    seen: dict[float, str] = {}
    for f in part:
        s = scans[f.rel]
        z = round(float(np.asarray(s["ipp"]) @ normal), 3)
        if z in seen and (not s["sop"] or seen[z] != s["sop"]):
            return True
        seen[z] = s["sop"]
    return False


def _by_acquisition(part: list[SourceFile], scans: dict[str, Any]) -> list[list[SourceFile]]:
    """Split by AcquisitionNumber only where that separates stacks sharing positions: many
    CT series number each slice's acquisition, and those must stay one stack."""
    if not _shares_positions(part, scans):
        return [part]
    acqs: dict[str, list[SourceFile]] = defaultdict(list)
    for f in part:
        acqs[scans[f.rel]["acq"]].append(f)
    subs = list(acqs.values())
    if len(subs) > 1 and not any(_shares_positions(p, scans) for p in subs):
        return subs
    return [part]


def _split_series(
    members: list[SourceFile], scans: dict[str, Any], source: Any, fmt: str, by_uid: bool
) -> Iterator[SourceItem | Quarantine]:
    """One group of slices -> one item per stack, as dcm2niix splits mixed series.

    A series whose stacks are all single slices (a localizer) gives one image per slice; a
    series where a lone slice strays from the others stays whole, and `stack_frames` names
    the defect. Files without a SeriesInstanceUID whose stacks cannot be told apart (shared
    positions) are quarantined: guessing would mix two acquisitions in one volume.
    """
    parts = _substacks(members, scans)
    sizes = [len(p) for p in parts]
    if by_uid and len(parts) > 1 and min(sizes) == 1 and max(sizes) > 1:
        parts = [members]
    stacks = [sub for p in parts for sub in _by_acquisition(p, scans)]
    for stack in sorted(stacks, key=lambda p: p[0].rel):
        if not by_uid and _shares_positions(stack, scans):
            for f in stack:
                yield Quarantine(f.rel, AMBIGUOUS, source.name, "GeometryError")
        else:
            yield SourceItem(source.name, fmt, tuple(stack), info={"kind": "series"})


def _classify(ds: Dataset, f: SourceFile) -> dict[str, Any]:
    """A header's kind (series slice, multi-frame, 2D image, waveform, no pixels) and keys."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    kind = "series"
    if str(ds.get("SOPClassUID", "")) == SEGMENTATION:
        kind = "segmentation"
    elif str(ds.get("SOPClassUID", "")) == RTSTRUCT:
        kind = "rtstruct"
    elif "WaveformSequence" in ds:
        kind = "waveform"
    elif "Rows" not in ds:  # stop_before_pixels hides PixelData itself; Rows marks images
        kind = "nopixels"
    elif frames > 1:
        kind = "multiframe"
    elif ds.get("Modality") in PROJECTION_MODALITIES or "ImagePositionPatient" not in ds:
        kind = "image2d"
    scan = {"kind": kind, "series": str(ds.get("SeriesInstanceUID", "")),
            "sop_class": str(ds.get("SOPClassUID", ""))}  # fmt: skip
    if kind == "series":
        scan.update(_stack_keys(ds, f))
    if kind == "segmentation":
        refs = ds.get("ReferencedSeriesSequence") or []
        scan["ref_series"] = [str(r.get("SeriesInstanceUID", "")) for r in refs]
    if kind == "rtstruct":
        scan["ref_series"] = referenced_series(ds)
    return scan


def _attach_segs(
    segs: list[SourceFile], stacks: list[SourceItem | Quarantine], scans: dict, source: Any
) -> Iterator[Quarantine]:
    """A SEG (or RTSTRUCT) object is the label map of the series it references: attached to
    that series' item when exactly one stack of this source is that series and has no label
    map yet; otherwise quarantined, never stored as an image."""
    by_series: dict[str, list[SourceItem]] = defaultdict(list)
    for it in stacks:
        if isinstance(it, SourceItem):
            by_series[scans[it.files[0].rel]["series"]].append(it)
    for f in segs:
        targets = [it for uid in scans[f.rel]["ref_series"] for it in by_series.get(uid, [])]
        kind = scans[f.rel]["kind"]
        if len(targets) == 1 and targets[0].label is None:
            targets[0].label, targets[0].info[kind] = f, True
        else:
            reason = SEG_REASON if kind == "segmentation" else RTSTRUCT_REASON
            yield Quarantine(f.rel, reason, source.name, "UnsupportedInput")


def seg_segments(ds: Dataset) -> dict[str, str]:
    """Segment number -> its coded property type (CodeMeaning; the free-text SegmentLabel is
    not copied: it can hold anything)."""
    out = {}
    for item in ds.get("SegmentSequence") or []:
        codes = item.get("SegmentedPropertyTypeCodeSequence") or []
        out[str(item.get("SegmentNumber", ""))] = (
            str(codes[0].get("CodeMeaning", "")) if codes else ""
        )
    return out


def seg_label(ctx: ReadContext, item: SourceItem, img: sitk.Image) -> tuple[sitk.Image, dict]:
    """A DICOM SEG's masks on its series' grid: each frame lands on the slice at its position,
    voxels take the frame's segment number (a higher number wins where segments overlap).
    Returns the label image and the segments (`seg_segments`)."""
    with ctx.fs.open(item.label.path, "rb") as fh:
        seg = _read(fh)
    masks, _ = _pixels(seg)
    masks = masks.reshape(-1, *masks.shape[-2:])
    if str(seg.get("SegmentationType", "")).upper() == "FRACTIONAL":
        masks = masks * 2 > int(seg.get("MaximumFractionalValue", 255))
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    origin, spacing = np.asarray(img.GetOrigin()), np.asarray(img.GetSpacing())
    size = img.GetSize()
    if masks.shape[1:] != (size[1], size[0]):
        raise LabelMismatch(f"SEG frames are {masks.shape[1:]}, its series' slices {size[1::-1]}")
    out = np.zeros((size[2], size[1], size[0]), np.uint16)
    frames = []
    for i in range(len(masks)):
        groups = [_frame_group(seg, i, n) for n in ("PlanePositionSequence",
                  "PlaneOrientationSequence", "SegmentIdentificationSequence")]  # fmt: skip
        if None in groups:
            raise LabelMismatch("SEG frame without plane position, orientation or segment")
        pos, ori, ident = groups
        if not np.allclose(_floats(ori.ImageOrientationPatient, 6, "SEG orientation"),
                           d[:, :2].T.ravel(), atol=1e-4):  # fmt: skip
            raise LabelMismatch("SEG frame orientation differs from its series'")
        ijk = d.T @ (_floats(pos.ImagePositionPatient, 3, "SEG position") - origin) / spacing
        k = int(round(ijk[2]))
        if np.abs(ijk[:2]).max() > 1e-2 or abs(ijk[2] - k) > 1e-2 or not 0 <= k < size[2]:
            raise LabelMismatch("SEG frame position is not a slice of its series")
        frames.append((int(ident.ReferencedSegmentNumber), k, i))
    for number, k, i in sorted(frames):
        out[k][masks[i] > 0] = number
    label = sitk.GetImageFromArray(out)
    label.CopyInformation(img)
    return label, seg_segments(seg)


@register_reader("dicom", extensions=(".dcm", ".dicom", ".ima"))
class DicomReader(Reader):
    """DICOM files (any name): series -> volume3d, single-frame projections -> image2d."""

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        return len(head) >= 132 and head[128:132] == b"DICM"

    def scan(self, f: SourceFile, ctx: ReadContext) -> dict[str, Any]:
        try:
            with ctx.fs.open(f.path, "rb") as fh:
                ds = _read(fh, stop_before_pixels=True, defer_size=HEADER_DEFER)
        except UnreadableInput as e:
            return {"error": str(e)}
        try:  # pydicom converts values on access: a malformed one raises only here
            return _classify(ds, f)
        except MALFORMED as e:
            return {"error": f"malformed DICOM header value ({type(e).__name__})"}

    def group(
        self, files: list[SourceFile], scans: dict[str, Any], source: Any
    ) -> Iterable[SourceItem | Quarantine]:
        series: dict[tuple[str, ...], list[SourceFile]] = defaultdict(list)
        segs: list[SourceFile] = []
        for f in files:
            s = scans.get(f.rel) or {"error": "header scan missing"}
            if "error" in s:
                yield Quarantine(f.rel, s["error"], source.name, "UnreadableInput")
            elif s["kind"] == "waveform":
                if "dicom_waveform" in READERS:
                    yield SourceItem(source.name, "dicom_waveform", (f,))
                else:
                    yield Quarantine(f.rel, "DICOM waveform: no waveform reader", source.name)
            elif s["kind"] in ("segmentation", "rtstruct"):
                segs.append(f)
            elif s["kind"] == "nopixels":
                yield Quarantine(
                    f.rel, f"DICOM object without pixel data (SOP class {s['sop_class']})",
                    source.name, "UnsupportedInput",
                )  # fmt: skip
            elif s["kind"] == "series":
                series[_series_key(s)].append(f)
            else:
                yield SourceItem(source.name, self.name, (f,), info={"kind": s["kind"]})
        stacks = [
            out
            for key, members in sorted(series.items(), key=lambda kv: kv[1][0].rel)
            for out in _split_series(members, scans, source, self.name, by_uid=key[0] == "uid")
        ]
        yield from _attach_segs(segs, stacks, scans, source)
        yield from stacks

    def read(self, item: SourceItem, ctx: ReadContext) -> Iterator[Sample | Quarantine]:
        try:
            yield from self._read_item(item, ctx)
        except MALFORMED as e:  # a header value that only fails when it is first used
            raise UnreadableInput(f"malformed DICOM header value ({type(e).__name__})") from None

    def _read_item(self, item: SourceItem, ctx: ReadContext) -> Iterator[Sample | Quarantine]:
        kind = item.info.get("kind", "series")
        if kind != "series" or len(item.files) == 1:
            with ctx.fs.open(item.files[0].path, "rb") as fh:
                first = _read(fh)
            _check_burned_in(first, ctx)
        stored = None
        if kind == "image2d" or (kind == "series" and len(item.files) == 1):
            yield self._image2d(item, first, ctx)  # a lone slice is an image, not a volume
            return
        if kind == "multiframe":
            frames = multiframe_frames(first)
        else:
            datasets, stored = yield from self._load_slices(item, ctx)
            first = datasets[0]
            slices = [self._slice(ds, st.pixels) for ds, st in zip(datasets, stored, strict=True)]
            frames = unique_instances(datasets, slices)
            if len(frames) == 1:  # copies of one instance
                yield self._image2d(item, first, ctx, stored[0])
                return
        _dtype_for_volume(frames)
        img = stack_frames(frames)
        raw_pid, pid, study, labels = identity(
            ctx, item, str(first.get("PatientID", "")), str(first.get("StudyInstanceUID", ""))
        )
        modality = ctx.source.modality or str(first.get("Modality", "OT")) or "OT"
        series_uid = str(first.get("SeriesInstanceUID", "")) or item.rel
        uid = series_uid if kind == "series" else str(first.get("SOPInstanceUID", item.rel))
        meta = {"dicom": self._meta(first, raw_pid, ctx, stored and stored[0]),
                "slices": len(frames)}  # fmt: skip
        if item.info.get("segmentation"):
            label, meta["segments"] = seg_label(ctx, item, img.sitk_image())
        elif item.info.get("rtstruct"):
            with ctx.fs.open(item.label.path, "rb") as fh:
                label, meta["segments"], skipped = rtstruct_label(
                    _read(fh), img.sitk_image(), ctx.spec.deid.keep_roi_names
                )
            if skipped:  # POINT/OPEN_PLANAR contours: markers, not areas
                meta["unrasterised_contours"] = skipped
        else:
            label = read_label(ctx, item)
        sample = volume_sample(
            ctx,
            img,
            label,
            key=ctx.sample_key("dicom", uid),
            modality=modality,
            patient_id=pid,
            study_id=study,
            series_id=ctx.uid(series_uid, "series")[:20],
            meta=meta,
        )
        sample.labels = labels
        yield sample

    def _load_slices(
        self, item: SourceItem, ctx: ReadContext
    ) -> Generator[Quarantine, None, tuple[list[Dataset], list[Stored]]]:
        """Read and decode every slice of a series. A slice that does not parse or decode is
        quarantined on its own and the rest go on: a stack missing it is then refused for the
        gap, while a spare copy of an instance is simply not needed."""
        kept, stored, failed = [], [], []
        for f in item.files:
            try:
                ds = _read_recorded(ctx, f)
                _check_burned_in(ds, ctx)
                stored.append(stored_pixels(ds, self.voi))
                kept.append(ds)
            except (UnreadableInput, PrivacyError) as e:
                failed.append((f, e))
        if not kept:
            raise failed[0][1]
        for f, e in failed:
            yield Quarantine(f.rel, str(e), error=type(e).__name__)
        return kept, stored

    def _slice(self, ds: Dataset, pixels: np.ndarray) -> Frame:
        if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
            raise GeometryError("slice without ImagePositionPatient/ImageOrientationPatient")
        return Frame(
            _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient"),
            _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),
            tuple(_floats(ds.get("PixelSpacing", [1, 1]), 2, "PixelSpacing")),
            pixels,
        )

    def _image2d(
        self, item: SourceItem, ds: Dataset, ctx: ReadContext, stored: Stored | None = None
    ) -> Sample:
        if item.label is not None:  # never drop a label map silently
            raise UnsupportedInput("label maps are supported for DICOM volumes only, not 2D")
        stored = stored or stored_pixels(ds, self.voi)
        arr = stored.pixels
        if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
            raise UnsupportedInput("multi-frame projection image (cine) is not converted")
        spec = ctx.spec.image2d
        arr = fit_2d(arr, spec.size, spec.mode)
        raw_pid, pid, study, labels = identity(
            ctx, item, str(ds.get("PatientID", "")), str(ds.get("StudyInstanceUID", ""))
        )
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        sop = str(ds.get("SOPInstanceUID", "")) or item.rel
        return Sample(
            key=ctx.sample_key("dicom", sop),
            kind="image2d",
            modality=ctx.source.modality or str(ds.get("Modality", "OT")) or "OT",
            dataset=ctx.source.name,
            patient_id=pid,
            split=ctx.split(pid),
            data=arr,
            study_id=study,
            series_id=ctx.uid(str(ds.get("SeriesInstanceUID", "")) or sop, "series")[:20],
            spacing=tuple(float(s) for s in spacing) if spacing and not spec.size else None,
            labels=labels,
            licence=ctx.source.licence,
            meta={"dicom": self._meta(ds, raw_pid, ctx, stored)},
        )

    @property
    def voi(self) -> bool:
        """Source option `voi_lut`: store the VOI transform's output (window or VOI LUT)
        instead of modality values. Off by default: CT keeps HU, the others their values."""
        return bool(self.options.get("voi_lut", False))

    def _meta(
        self, ds: Dataset, raw_pid: str, ctx: ReadContext, stored: Stored | None = None
    ) -> dict[str, Any]:
        clean = copy.deepcopy(ds)
        if "PixelData" in clean:
            del clean.PixelData
        deidentify(clean, ctx.keyring, raw_pid, ctx.spec.deid.keep_private_tags)
        meta = safe_meta(clean)
        meta["PatientIdentityRemoved"] = str(clean.PatientIdentityRemoved)
        if stored is None:
            stored = Stored(np.empty(0), meta.get("PhotometricInterpretation", ""), [])
        if stored.photometric != meta.get("PhotometricInterpretation"):  # what is stored
            meta["SourcePhotometricInterpretation"] = meta.get("PhotometricInterpretation", "")
            meta["PhotometricInterpretation"] = stored.photometric
        meta["PixelTransforms"] = stored.steps
        return meta

"""DICOM RT Structure Sets: contours rasterised into a label map on their series' voxel grid.

An RTSTRUCT holds no pixels, only closed planar polygons in patient coordinates (mm). Each
polygon is mapped into the referenced series' voxel indices (ImagePositionPatient/Orientation,
as the stacked volume holds them), must lie on one of its slices, and is filled there."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from skimage.draw import polygon, polygon_perimeter

from ..registry import LabelMismatch

RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
RTSTRUCT_REASON = (
    "DICOM RTSTRUCT holds contours, not an image: it becomes the label map of the one series "
    "it references, and that series is not among this source's stacks"
)
SLICE_TOL = 1e-2  # voxels: how far a contour may sit off its slice plane


def referenced_series(ds: Dataset) -> list[str]:
    """The SeriesInstanceUIDs the structure set was drawn on."""
    return [
        str(series.get("SeriesInstanceUID", ""))
        for frame in ds.get("ReferencedFrameOfReferenceSequence") or []
        for study in frame.get("RTReferencedStudySequence") or []
        for series in study.get("RTReferencedSeriesSequence") or []
    ]


def _fill(contours: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """One ROI's voxels on a (rows, cols) slice from its contours' (col, row) vertices: insides
    combined even-odd (a contour inside another is a hole), plus every voxel an outline crosses.
    Contours are written through the centres of a structure's boundary voxels (rt-utils, most
    planning systems), so those voxels belong to it; centre-inside alone loses them. This is
    OpenCV fillPoly's rule, which rt-utils reads with."""
    inside, outline = np.zeros(shape, bool), np.zeros(shape, bool)
    for ij in contours:
        rows, cols = ij[:, 1], ij[:, 0]
        one = np.zeros(shape, bool)
        one[polygon(rows, cols, shape)] = True
        inside ^= one
        outline[polygon_perimeter(np.round(rows), np.round(cols), shape)] = True
    return inside | outline


def roi_kinds(ds: Dataset) -> dict[int, str]:
    """ROINumber -> what the ROI is, from coded values only: the CodeMeaning of its
    RTROIIdentificationCodeSequence, else its RTROIInterpretedType (a defined term: ORGAN,
    PTV, GTV, EXTERNAL, ...). ROIName is free text a person typed, so it can hold anything."""
    out = {}
    for obs in ds.get("RTROIObservationsSequence") or []:
        codes = obs.get("RTROIIdentificationCodeSequence") or []
        kind = str(codes[0].get("CodeMeaning", "")) if codes else ""
        out[int(obs.get("ReferencedROINumber", -1))] = kind or str(
            obs.get("RTROIInterpretedType", "")
        )
    return out


def rtstruct_label(
    ds: Dataset, img: sitk.Image, keep_names: bool = False
) -> tuple[sitk.Image, dict[str, str], int]:
    """The structure set's ROIs on `img`'s grid: ROI n of StructureSetROISequence takes value n
    (a later ROI wins where they overlap); several contours of one ROI on a slice combine as
    `_fill` says. Returns the label image, the segments (value -> `roi_kinds`, or ROIName
    when `keep_names`: the deid.keep_roi_names opt-in) and the number of point/open contours,
    which outline no area."""
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    origin, spacing = np.asarray(img.GetOrigin()), np.asarray(img.GetSpacing())
    size = img.GetSize()
    values = {
        int(roi.ROINumber): n + 1 for n, roi in enumerate(ds.get("StructureSetROISequence") or [])
    }
    kinds = roi_kinds(ds)
    names = {
        str(n + 1): str(roi.get("ROIName", "")) if keep_names else kinds.get(int(roi.ROINumber), "")
        for n, roi in enumerate(ds.get("StructureSetROISequence") or [])
    }
    out = np.zeros((size[2], size[1], size[0]), np.uint16)
    skipped = 0
    for roi in sorted(ds.get("ROIContourSequence") or [], key=lambda r: values.get(
            int(r.ReferencedROINumber), 0)):  # fmt: skip
        value = values.get(int(roi.ReferencedROINumber))
        if value is None:
            raise LabelMismatch("RTSTRUCT contour of an ROI the structure set does not list")
        planes: dict[int, list[np.ndarray]] = {}
        for contour in roi.get("ContourSequence") or []:
            if str(contour.get("ContourGeometricType", "")) != "CLOSED_PLANAR":
                skipped += 1
                continue
            pts = np.asarray(contour.ContourData, np.float64).reshape(-1, 3)
            ijk = (pts - origin) @ d / spacing  # patient mm -> continuous voxel indices
            k = int(round(ijk[:, 2].mean()))
            if np.abs(ijk[:, 2] - k).max() > SLICE_TOL or not 0 <= k < size[2]:
                raise LabelMismatch("RTSTRUCT contour does not lie on a slice of its series")
            planes.setdefault(k, []).append(ijk[:, :2])
        for k, contours in planes.items():
            out[k][_fill(contours, (size[1], size[0]))] = value
    label = sitk.GetImageFromArray(out)
    label.CopyInformation(img)
    return label, names, skipped

"""PNG, JPEG and TIFF (8/16-bit, grey or RGB) through Pillow, decompression-bomb guard on:
an image over Image.MAX_IMAGE_PIXELS is rejected at open time, before any pixel is decoded."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from medfm.shards import Sample

from ..imaging import fit_2d
from ..registry import (
    LabelMismatch,
    Quarantine,
    ReadContext,
    Reader,
    SourceItem,
    UnreadableInput,
    UnsupportedInput,
    register_reader,
)
from ..sources import identity

MODES = {"L": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16,
         "RGB": np.uint8, "1": np.uint8, "I": np.int32, "F": np.float32}  # fmt: skip


def load_pixels(ctx: ReadContext, f, what: str = "image") -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; a warning is a rejection here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with ctx.fs.open(f.path, "rb") as fh, Image.open(fh) as im:
                if getattr(im, "n_frames", 1) > 1:
                    raise UnsupportedInput(f"multi-page {what} is not supported")
                im.load()
                if im.mode in ("RGBA", "P", "LA", "CMYK", "YCbCr"):
                    im = im.convert("RGB" if im.mode != "LA" else "L")
                if im.mode not in MODES:
                    raise UnsupportedInput(f"{what} pixel mode {im.mode} is not supported")
                arr = np.asarray(im)
                if im.mode == "1":
                    arr = arr.astype(np.uint8) * 255
                return arr.astype(MODES[im.mode], copy=False)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableInput(f"decompression bomb: {what} exceeds the pixel limit ({e})") from None
    except UnidentifiedImageError:
        raise UnreadableInput(f"not a readable {what} (unidentified image data)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableInput(f"cannot decode {what} (truncated or corrupt: {e})") from None


class PillowReader(Reader):
    """One file -> one image2d sample (optionally resized/padded, label map alongside)."""

    def read(self, item: SourceItem, ctx: ReadContext) -> Iterator[Sample | Quarantine]:
        arr = load_pixels(ctx, item.files[0])
        label = load_pixels(ctx, item.label, "label map") if item.label else None
        if label is not None and label.shape[:2] != arr.shape[:2]:
            raise LabelMismatch(f"label map shape {label.shape[:2]} != image shape {arr.shape[:2]}")
        spec = ctx.spec.image2d
        arr = fit_2d(arr, spec.size, spec.mode)
        if label is not None:
            label = fit_2d(label, spec.size, spec.mode, label=True)
        _, pid, study, labels = identity(ctx, item)
        yield Sample(
            key=ctx.sample_key(item.rel),
            kind="image2d",
            modality=ctx.source.modality or "OT",
            dataset=ctx.source.name,
            patient_id=pid,
            split=ctx.split(pid),
            data=arr,
            study_id=study,
            label_map=label,
            labels=labels,
            licence=ctx.source.licence,
        )


register_reader("png", extensions=(".png",))(PillowReader)
register_reader("jpeg", extensions=(".jpg", ".jpeg"))(PillowReader)
register_reader("tiff", extensions=(".tif", ".tiff"))(PillowReader)

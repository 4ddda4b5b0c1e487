"""Payload encodings: NumPy `.npy` (never with pickle) and lossless 8/16-bit PNG.

Decoding functions take the shard and member names only to put them in error messages.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from .errors import ShardFormatError

PNG_DTYPES = (np.dtype("uint8"), np.dtype("uint16"))


def png_encodable(arr: np.ndarray) -> bool:
    """PNG holds 8-bit gray/RGB/RGBA and 16-bit gray losslessly; everything else goes to .npy."""
    if arr.dtype not in PNG_DTYPES or arr.size == 0:
        return False
    if arr.ndim == 2:
        return True
    return arr.ndim == 3 and arr.dtype == np.uint8 and arr.shape[2] in (3, 4)


def encode_npy(arr: np.ndarray) -> bytes:
    if arr.dtype.hasobject:
        raise ValueError("object arrays cannot be stored (they would need pickle)")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise ShardFormatError(f"{where}: .npy payload needs pickle, refused") from e
        raise ShardFormatError(f"{where}: corrupt .npy payload ({e})") from e
    except (EOFError, OSError) as e:
        raise ShardFormatError(f"{where}: truncated .npy payload ({e})") from e


def encode_png(arr: np.ndarray) -> bytes:
    if not png_encodable(arr):
        raise ValueError(f"array of dtype {arr.dtype} and shape {arr.shape} is not PNG-encodable")
    a = np.ascontiguousarray(arr)
    img = Image.fromarray(a.astype("<u2") if a.dtype == np.uint16 else a)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes, where: str) -> np.ndarray:
    """Decode with Pillow's decompression-bomb guard left on (its warning becomes an error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["PNG"])
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ShardFormatError(f"{where}: PNG refused as a decompression bomb ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ShardFormatError(f"{where}: corrupt PNG payload ({e})") from e
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(img).astype(np.uint16)
    return np.asarray(img)


def decode(ext: str, data: bytes, where: str) -> np.ndarray:
    if ext.endswith("npy"):
        return decode_npy(data, where)
    if ext.endswith("png"):
        return decode_png(data, where)
    raise ShardFormatError(f"{where}: unknown payload encoding {ext!r}")

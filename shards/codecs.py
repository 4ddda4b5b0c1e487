"""Payload encodings: NumPy `.npy` (never with pickle) and lossless 8/16-bit PNG.

Decoding functions take the shard and member names only to put them in error messages. Every
decoder checks what the bytes declare (shape, dtype, image size) against the bytes it has and
against `limits()` before it allocates anything, and turns every failure into a
ShardFormatError: outside bytes never raise MemoryError or a decoder's own exception type.
"""

from __future__ import annotations

import ast
import functools
import io
import math
import os
import warnings
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from .errors import ShardFormatError


@dataclass(frozen=True)
class DecodeLimits:
    """Caps on what one shard input may make a reader allocate. Each can be raised or lowered
    with an environment variable (MEDFM_MAX_ARRAY_BYTES, ...), which DataLoader workers and Ray
    tasks inherit. The defaults sit far above anything medfm writes (64^3 chunks, shards of
    512 MiB) and far below what a crafted header can declare."""

    array_bytes: int = 4 << 30  # one decoded array: .npy, PNG, a region read from a volume
    chunk_bytes: int = 64 << 20  # one decoded Zarr chunk
    member_bytes: int = 2 << 30  # one tar member read into memory
    chunks_per_shard: int = 1 << 20  # entries of one Zarr shard index (16 bytes each)


def limits() -> DecodeLimits:
    """The current limits: the defaults, overridden by MEDFM_MAX_<FIELD> variables."""
    values = {}
    for f in fields(DecodeLimits):
        raw = os.environ.get(f"MEDFM_MAX_{f.name.upper()}")
        if raw is not None:
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise ValueError(f"MEDFM_MAX_{f.name.upper()}={raw!r} is not an integer") from None
    return DecodeLimits(**values)


PNG_DTYPES = (np.dtype("uint8"), np.dtype("uint16"))


def png_encodable(arr: np.ndarray) -> bool:
    """PNG holds 8-bit gray/RGB/RGBA and 16-bit gray losslessly; everything else goes to .npy."""
    if arr.dtype not in PNG_DTYPES or arr.size == 0:
        return False
    if arr.ndim == 2:
        return True
    return arr.ndim == 3 and arr.dtype == np.uint8 and arr.shape[2] in (3, 4)


def encode_npy(arr: np.ndarray) -> bytes:
    """np.save's bytes (format 1.0 header, then the C-order data), header built once per
    dtype and shape: np.save formats it anew for each array, most of a signal window's cost."""
    if arr.dtype.hasobject:
        raise ValueError("object arrays cannot be stored (they would need pickle)")
    arr = np.ascontiguousarray(arr)
    return _saved_header(arr.dtype.str, arr.shape) + arr.tobytes()


@functools.lru_cache(maxsize=256)
def _saved_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The header np.save writes for a C-order array: format 1.0, else 2.0 when too long."""
    fields = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": shape}  # fmt: skip
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, fields)
    except ValueError:  # a header over 64 KiB (a very long shape): np.save's next version
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, fields)
    return buf.getvalue()


NPY_MAGIC = b"\x93NUMPY"
NPY_MAX_HEADER = 10_000  # numpy's own default cap on the header dict


def decode_npy(data: bytes, where: str) -> np.ndarray:
    """A .npy payload, its header checked first: no pickle, a plain dtype, and a shape whose
    size is exactly the bytes that follow the header and within limits()."""
    dtype, shape, fortran, start = _npy_header(data, where)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    cap = limits().array_bytes
    if nbytes > cap:
        raise ShardFormatError(
            f"{where}: .npy header declares {dtype.str}{list(shape)} = {nbytes} bytes, over "
            f"the {cap}-byte array limit; refused"
        )
    if len(data) - start != nbytes:
        raise ShardFormatError(
            f"{where}: truncated or padded .npy payload: header declares {nbytes} bytes of "
            f"data, the member holds {len(data) - start}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape, order="F" if fortran else "C").copy(order="K")  # writable


def _npy_header(data: bytes, where: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran order, data offset) of .npy format 1.0, 2.0 or 3.0."""
    if len(data) < 10 or not data.startswith(NPY_MAGIC):
        raise ShardFormatError(f"{where}: corrupt .npy payload (no NumPy magic)")
    major = data[6]
    if major not in (1, 2, 3) or data[7] != 0:
        raise ShardFormatError(f"{where}: .npy format {major}.{data[7]} is not 1.0-3.0")
    size_len = 2 if major == 1 else 4
    hlen = int.from_bytes(data[8 : 8 + size_len], "little")
    start = 8 + size_len + hlen
    if hlen > NPY_MAX_HEADER or start > len(data):
        raise ShardFormatError(f"{where}: corrupt .npy payload (header of {hlen} bytes)")
    try:
        text = data[8 + size_len : start].decode("utf8" if major == 3 else "latin1")
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as e:
        raise ShardFormatError(f"{where}: corrupt .npy header ({type(e).__name__})") from e
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ShardFormatError(f"{where}: corrupt .npy header (keys)")
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ShardFormatError(f"{where}: corrupt .npy header (shape {str(shape)[:80]})")
    if not isinstance(fortran, bool) or len(shape) > 32:
        raise ShardFormatError(f"{where}: corrupt .npy header (fortran_order or ndim)")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except Exception as e:  # noqa: BLE001 - numpy's dtype-string parser raises many types
        # (bench/fuzz.py found SyntaxError for a descr of "<08")
        raise ShardFormatError(f"{where}: corrupt .npy header (dtype: {e})") from e
    if dtype.hasobject:
        raise ShardFormatError(f"{where}: .npy payload needs pickle, refused")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        raise ShardFormatError(f"{where}: .npy dtype {dtype} is not a plain array dtype; refused")
    return dtype, shape, fortran, start


def encode_png(arr: np.ndarray) -> bytes:
    if not png_encodable(arr):
        raise ValueError(f"array of dtype {arr.dtype} and shape {arr.shape} is not PNG-encodable")
    a = np.ascontiguousarray(arr)
    img = Image.fromarray(a.astype("<u2") if a.dtype == np.uint16 else a)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


PNG_MODES = {"L": 1, "RGB": 3, "RGBA": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4}


def decode_png(data: bytes, where: str) -> np.ndarray:
    """Decode with Pillow's decompression-bomb guard left on (its warning becomes an error), and
    the declared image size checked against limits() before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["PNG"])
            _check_png(img, where)
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(img).astype(np.uint16)
            return np.asarray(img)
    except ShardFormatError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ShardFormatError(f"{where}: PNG refused as a decompression bomb ({e})") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt bytes
        raise ShardFormatError(f"{where}: corrupt PNG payload ({type(e).__name__}: {e})") from e


def _check_png(img: Image.Image, where: str) -> None:
    if img.mode not in PNG_MODES:
        raise ShardFormatError(
            f"{where}: PNG mode {img.mode!r} is not 8-bit gray/RGB/RGBA or 16-bit gray; refused"
        )
    w, h = img.size
    nbytes, cap = w * h * PNG_MODES[img.mode], limits().array_bytes
    if nbytes > cap:
        raise ShardFormatError(
            f"{where}: PNG declares {w}x{h} {img.mode} = {nbytes} bytes, over the {cap}-byte "
            "array limit; refused"
        )


def decode(ext: str, data: bytes, where: str) -> np.ndarray:
    if ext.endswith("npy"):
        return decode_npy(data, where)
    if ext.endswith("png"):
        return decode_png(data, where)
    raise ShardFormatError(f"{where}: unknown payload encoding {ext!r}")

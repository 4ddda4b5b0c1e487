"""What may come out of a hub: hashes, pickle refusal and safe relative paths.

Model repos in the wild still carry pickled checkpoints (`pytorch_model.bin`, `*.ckpt`). Loading
one runs arbitrary code, so medfm refuses to download them at all, and checks every file's
content on push and on pull: a pickle of any protocol is refused whatever its name, and a
`.safetensors` (or `.json`) file must parse as one, so a torch checkpoint cannot pass as weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickletools
import re
import struct
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Any

from .errors import HubError, UnsafeFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
HASH_BLOCK = 1 << 22
# Opcodes with which unpickling calls code (GLOBAL and INST, which import what their argument
# names, are checked apart). PERSID only hands an id to the loader's own persistent_load.
CODE_OPCODES = {"STACK_GLOBAL", "REDUCE", "BUILD", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2",
                "EXT4"}  # fmt: skip
GLOBAL_ARG_RE = re.compile(r"^[A-Za-z_][\w.]* [A-Za-z_][\w.]*$")
SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors library's own limit
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
}  # fmt: skip


def refuse_pickles(names: list[str], where: str) -> None:
    """Raise before anything is downloaded if a repo holds pickle-format files."""
    bad = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if bad:
        raise UnsafeFileError(
            f"{where} contains pickle-format files {bad}: medfm only loads safetensors and "
            "JSON and never unpickles downloaded files. Convert them to safetensors "
            "(safetensors.torch.save_file) and push again."
        )


def sniff_pickle(path: str | Path, where: str) -> None:
    """Refuse a file whose bytes are a pickle (any protocol, 0 and 1 included) or a torch zip
    checkpoint, whatever its name. Nothing is unpickled: opcodes are only parsed."""
    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        bad = _is_pickle(f) or (magic == b"PK\x03\x04" and _zip_holds_pickle(path))
    if bad:
        raise UnsafeFileError(
            f"{where}: file content is a pickle (torch.save/pickle format); refused, never "
            "unpickled. Only safetensors and JSON are loaded."
        )


def _is_pickle(f: IO[bytes]) -> bool:
    """Protocols 2-5 open with PROTO. Protocols 0 and 1 have no header, and plain text often
    parses as a few of their opcodes (`..` opens reST), so the opcodes are followed as the
    unpickler would, stack and marks included: a pickle is content on which unpickling reaches
    an opcode that imports or calls something before it fails or stops."""
    head = f.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    f.seek(0)
    depth, marks = 0, []
    try:
        for op, arg, _pos in pickletools.genops(f):
            if op.name in ("GLOBAL", "INST"):  # imports the module its argument names
                return bool(GLOBAL_ARG_RE.match(str(arg)))
            before = [x for x in op.stack_before if x is not pickletools.stackslice]
            if pickletools.markobject in before:  # pops down to the last MARK
                if not marks:
                    return False
                depth = marks.pop()
                before.remove(pickletools.markobject)
            if len(before) > depth:
                return False  # the unpickler fails here, before anything runs
            if op.name in CODE_OPCODES:
                return True
            if op.name == "STOP":
                return False
            if pickletools.markobject in op.stack_after:
                marks.append(depth - len(before))
            else:
                depth += len(op.stack_after) - len(before)
    except Exception:  # an invalid opcode or argument, or the end of the file
        return False
    return False


def _zip_holds_pickle(path: str | Path) -> bool:
    """A zip (torch.save's format) with any member that is a pickle by name or by content."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.lower().endswith(PICKLE_SUFFIXES):
                    return True
                with z.open(info) as member:
                    if _is_pickle(member):
                        return True
    except (zipfile.BadZipFile, OSError, NotImplementedError):
        return True  # claims to be a zip but cannot be inspected: not proven safe
    return False


def check_safetensors(path: str | Path, where: str) -> None:
    """A safetensors file must parse: u64 header length, a JSON header of tensors whose dtype,
    shape and data_offsets agree, and offsets that tile the data section of this very file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 2 <= n <= min(size - 8, SAFETENSORS_MAX_HEADER):
            raise UnsafeFileError(f"{where}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnsafeFileError(f"{where}: not a safetensors file (header is not JSON)") from e
    data_size = size - 8 - n
    if not isinstance(header, dict):
        raise UnsafeFileError(f"{where}: not a safetensors file (header is not an object)")
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            if not isinstance(t, dict) or not all(isinstance(v, str) for v in t.values()):
                raise UnsafeFileError(f"{where}: safetensors __metadata__ is not str -> str")
            continue
        spans.append(_tensor_span(t, data_size, f"{where}: tensor {name!r}"))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise UnsafeFileError(f"{where}: safetensors tensors overlap or leave gaps")
        end = stop
    if end != data_size:
        raise UnsafeFileError(f"{where}: safetensors data section does not match its header")


def _tensor_span(t: Any, data_size: int, where: str) -> tuple[int, int]:
    ok = (
        isinstance(t, dict)
        and t.get("dtype") in SAFETENSORS_DTYPE_BITS
        and isinstance(t.get("shape"), list)
        and all(isinstance(d, int) and d >= 0 for d in t["shape"])
        and isinstance(t.get("data_offsets"), list)
        and len(t["data_offsets"]) == 2
        and all(isinstance(o, int) for o in t["data_offsets"])
    )
    if not ok:
        raise UnsafeFileError(f"{where}: malformed safetensors entry")
    begin, stop = t["data_offsets"]
    nbytes = math.prod(t["shape"]) * SAFETENSORS_DTYPE_BITS[t["dtype"]] // 8
    if not 0 <= begin <= stop <= data_size or stop - begin != nbytes:
        raise UnsafeFileError(f"{where}: safetensors offsets outside the file or wrong size")
    return begin, stop


def check_content(path: str | Path, rel: str, where: str) -> None:
    """What push and pull accept in a file: never a pickle; a `.safetensors` must parse as one
    and a `.json` as UTF-8 JSON, so a checkpoint cannot pass under an innocent name."""
    sniff_pickle(path, where)
    name = rel.lower()
    if name.endswith(".safetensors"):
        check_safetensors(path, where)
    elif name.endswith(".json"):
        try:
            json.loads(Path(path).read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnsafeFileError(f"{where}: not valid JSON ({e})") from e


def check_relpath(rel: str, where: str) -> str:
    """A repo file path must stay inside the destination folder."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in rel:
        raise HubError(f"{where}: unsafe file path {rel!r} in revision record")
    return rel


def git_blob_sha1(path: str | Path) -> str:
    """Git's object id of a file: how the HF Hub names small (non-LFS) files."""
    sha = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            sha.update(block)
    return sha.hexdigest()

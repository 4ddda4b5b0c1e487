"""Mutation fuzzing of every parser that reads outside bytes (security issue 18).

Each case starts from real seed files (a shard set written from pydicom's MR, nibabel's
anatomical.nii, pydicom's CT_small.dcm, the MIT-BIH record, pyedflib's EEG, a MIMIC-IV demo
table), mutates their bytes and hands the result to a public entry point. An input passes when
the entry point returns or raises the module's own error class with a message; anything else
(another exception, MemoryError, a signal, more than --input-seconds) is a finding, saved under
--findings with its traceback.

    python bench/fuzz.py                   # every case, 20 s each, random mutation
    python bench/fuzz.py --quick           # every case, under 60 s in all
    python bench/fuzz.py --case npy --seconds 120 --engine atheris   # coverage-guided

Each case runs in a child process under an address-space limit, so a bomb hits MemoryError
and a crash in a C decoder is recorded rather than ending the run. Output, one JSON line per
case: {"bench": "fuzz", "case": ..., "value": inputs tried, "unit": "inputs", "findings": N}.
tests/test_fuzz.py runs the same cases through Hypothesis for a few examples each.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = Path(os.environ.get("MEDFM_SAMPLE_DATA", REPO.parent / "shared" / "data"))
MEMORY_HEADROOM = 3 << 30  # address space a child may add to what its imports mapped


# --- mutation -----------------------------------------------------------------------------
INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80",
               b"-1", b"0", b"99999999999999999999", b"1e309", b"NaN", b"..", b"/", b"\n",
               b"\x00\x00\x00\x00\x00\x00\xf0\x7f", b'"', b"{", b"[", b"}"]  # fmt: skip
OPS = ("flip", "set", "interesting", "insert", "delete", "duplicate", "truncate", "number")


def mutate(seed: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    """Apply (op, position, value) mutations; positions wrap around the current length."""
    data = bytearray(seed)
    for op, pos, value in ops:
        n = len(data)
        at = pos % (n + 1)
        if op == "flip" and n:
            data[at % n] ^= 1 << (pos % 8)
        elif op == "set" and n and value:
            data[at % n] = value[0]
        elif op == "interesting":
            word = INTERESTING[pos % len(INTERESTING)]
            data[at : at + len(word)] = word
        elif op == "insert":
            data[at:at] = value or b"\x00"
        elif op == "delete":
            del data[at : at + 1 + pos % 64]
        elif op == "duplicate" and n:
            piece = data[at : at + 1 + pos % 512]
            data[at:at] = piece
        elif op == "truncate":
            del data[at:]
        elif op == "number":  # rewrite the next decimal number: sizes, shapes, offsets
            digits = bytes(data[at:])
            i = next((k for k, c in enumerate(digits) if 48 <= c <= 57), None)
            if i is not None:
                j = i
                while j < len(digits) and 48 <= digits[j] <= 57:
                    j += 1
                big = str([0, 1, 2**31, 2**32 + 1, 2**63, 10**12, 8192, 1 << 20][pos % 8])
                data[at + i : at + j] = big.encode()
    return bytes(data)


def random_ops(rng: random.Random) -> list[tuple[str, int, bytes]]:
    return [
        (rng.choice(OPS), rng.getrandbits(32), bytes([rng.getrandbits(8)]) * rng.randint(1, 4))
        for _ in range(rng.choice((1, 1, 2, 3, 5, 8)))
    ]


# --- cases --------------------------------------------------------------------------------
@dataclass
class Case:
    """Seeds (made once, in `work`), a runner of one input and the errors that count as OK."""

    name: str
    shard: bool  # a parser of medfm.shards (the rest belong to other modules)
    setup: Callable[[Path], list[bytes]]
    run: Callable[[Path, bytes], Any]
    allowed: Callable[[], tuple[type[BaseException], ...]]
    seeds: list[bytes] = field(default_factory=list)
    work: Path | None = None

    def prepare(self, work: Path) -> None:
        self.work = work / self.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.seeds = self.setup(self.work)

    def check(self, data: bytes) -> str | None:
        """None if the input was handled; otherwise a one-line finding."""
        try:
            self.run(self.work, data)
        except self.allowed() as e:
            if not str(e).strip():
                return f"{type(e).__name__} without a message"
        except Exception as e:  # noqa: BLE001 - this is what a fuzzer looks for
            tb = traceback.extract_tb(e.__traceback__)[-1]
            return f"{type(e).__name__}: {str(e)[:200]} at {tb.filename}:{tb.lineno}"
        return None


def _shard_errors() -> tuple[type[BaseException], ...]:
    from medfm.shards import ShardError

    return (ShardError,)


def _mr() -> np.ndarray:
    import pydicom
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.int16)


def _tar_set(root: Path) -> Path:
    from medfm.shards import Sample, ShardSetWriter

    if not (root / "manifest.json").exists():
        mr = _mr()
        with ShardSetWriter(str(root)) as w:
            w.write(Sample("s0", "image2d", "MR", "d", "p0", "train", mr))
            w.write(Sample("s1", "image2d", "MR", "d", "p1", "train", (mr // 16).astype(np.uint8)))
            w.write(Sample("e0", "ehr", "EHR", "d", "p2", "train", np.arange(50, dtype=np.int64),
                           extras={"times": np.linspace(0, 1, 50)}))  # fmt: skip
    return root


def _volume_set(root: Path) -> Path:
    import nibabel

    from medfm.shards import Geometry, Sample, ShardSetWriter

    if not (root / "manifest.json").exists():
        img = nibabel.load(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii")
        data = np.asarray(img.dataobj).astype(np.int16)
        with ShardSetWriter(str(root), chunks=(16, 16, 16)) as w:
            w.write(Sample("v", "volume3d", "MR", "d", "p", "train", data, label_map=data > 50,
                           geometry=Geometry.from_nifti_affine(img.affine)))  # fmt: skip
    return root


def _read_everything(root: Path) -> None:
    """Every reader over a set: open, verify (must not raise), each sample, each patch."""
    from medfm.shards import ShardSet, verify

    verify(str(root))
    s = ShardSet(str(root))
    for row in s.rows():
        s.read_sample(row)
        if row["storage"] == "zarr":
            from medfm.shards.patches import PatchSampler

            PatchSampler(str(root), patch_size=(16, 16, 16)).patch(row, 0, None)


def _fresh_copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _rehash_header(root: Path, rel: str | None = None) -> None:
    """After a mutation, make the header's hashes match again (as an attacker would), so the
    parsers behind the hash checks are reached."""
    from medfm.io import sha256_bytes

    header = json.loads((root / "manifest.json").read_text())
    if rel is None:
        data = (root / "manifest.parquet").read_bytes()
        header["manifest"].update(sha256=sha256_bytes(data), bytes=len(data))
    else:
        data = (root / rel).read_bytes()
        header["files"][rel] = {"sha256": sha256_bytes(data), "bytes": len(data)}
    (root / "manifest.json").write_text(json.dumps(header))


# tar members and names
def tar_setup(work: Path) -> list[bytes]:
    root = _tar_set(work / "seed")
    return [p.read_bytes() for p in sorted((root / "tars").glob("*.tar"))]


def tar_run(work: Path, data: bytes) -> None:
    from medfm.shards.tarshard import iter_samples

    for _ in iter_samples(io.BytesIO(data), "fuzz.tar"):
        pass


def tar_in_set_setup(work: Path) -> list[bytes]:
    return tar_setup(work)


def tar_in_set_run(work: Path, data: bytes) -> None:
    """The same mutated tar inside its set (hashes fixed): verify and the byte-range readers."""
    root = _fresh_copy(work / "seed", work / "case")
    rel = "tars/shard-000000.tar"
    (root / rel).write_bytes(data)
    _rehash_header(root, rel)
    _read_everything(root)


# .npy headers
def npy_setup(work: Path) -> list[bytes]:
    from medfm.shards.codecs import encode_npy

    mr = _mr()
    arrays = [mr, np.arange(50), np.asfortranarray(mr[:8, :5]), np.linspace(0, 1, 7, dtype="<f4"),
              np.zeros((0, 3))]  # fmt: skip
    return [encode_npy(a) for a in arrays]


def npy_run(work: Path, data: bytes) -> None:
    from medfm.shards.codecs import decode_npy

    decode_npy(data, "fuzz.npy")


# PNG
def png_setup(work: Path) -> list[bytes]:
    from medfm.shards.codecs import encode_png

    mr = _mr()
    u8 = (mr // 16).astype(np.uint8)
    return [encode_png(u8[:32, :32]), encode_png(mr[:24, :24].astype(np.uint16)),
            encode_png(np.stack([u8[:16, :16]] * 3, -1))]  # fmt: skip


def png_run(work: Path, data: bytes) -> None:
    from medfm.shards.codecs import decode_png

    decode_png(data, "fuzz.png")


# manifest.json
def header_setup(work: Path) -> list[bytes]:
    return [(_tar_set(work / "seed") / "manifest.json").read_bytes()]


def header_run(work: Path, data: bytes) -> None:
    root = _fresh_copy(work / "seed", work / "case")
    (root / "manifest.json").write_bytes(data)
    _read_everything(root)


# manifest.parquet (bytes) and its rows (values)
def parquet_setup(work: Path) -> list[bytes]:
    _volume_set(work / "vol")
    return [(_tar_set(work / "seed") / "manifest.parquet").read_bytes()]


def parquet_run(work: Path, data: bytes) -> None:
    root = _fresh_copy(work / "seed", work / "case")
    (root / "manifest.parquet").write_bytes(data)
    _rehash_header(root)
    _read_everything(root)


def rows_setup(work: Path) -> list[bytes]:
    import pyarrow.parquet as pq

    seeds = []
    for name, make in (("seed", _tar_set), ("vol", _volume_set)):
        rows = pq.read_table(make(work / name) / "manifest.parquet").to_pylist()
        seeds.append(json.dumps({"set": name, "rows": rows}).encode())
    return seeds


def rows_run(work: Path, data: bytes) -> None:
    """Mutated row values (shard paths, members records, shapes, keys) in a valid Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medfm.shards.schema import MANIFEST_SCHEMA

    try:
        doc = json.loads(data)
        table = pa.Table.from_pylist(doc["rows"], schema=MANIFEST_SCHEMA)
        root = _fresh_copy(work / doc["set"], work / "case")
    except Exception:  # noqa: BLE001 - not a row list any more: nothing reaches medfm
        return
    pq.write_table(table, root / "manifest.parquet")
    header = json.loads((root / "manifest.json").read_text())
    header["num_samples"] = table.num_rows
    (root / "manifest.json").write_text(json.dumps(header))
    _rehash_header(root)
    _read_everything(root)


# Zarr metadata and shard index
def zarr_meta_setup(work: Path) -> list[bytes]:
    root = _volume_set(work / "seed")
    return [(root / "volumes.zarr/v/image/zarr.json").read_bytes(),
            (root / "volumes.zarr/v/zarr.json").read_bytes()]  # fmt: skip


def zarr_meta_run(work: Path, data: bytes) -> None:
    root = _fresh_copy(work / "seed", work / "case")
    rel = "volumes.zarr/v/image/zarr.json" if b'"array"' in data else "volumes.zarr/v/zarr.json"
    (root / rel).write_bytes(data)
    _rehash_header(root, rel)
    _read_everything(root)


def zarr_shard_setup(work: Path) -> list[bytes]:
    root = _volume_set(work / "seed")
    return [(root / "volumes.zarr/v/image/c/0/0/0").read_bytes()]


def zarr_shard_run(work: Path, data: bytes) -> None:
    """A mutated shard file; the index checksum is fixed half the time so the entries and the
    chunk frames behind it are parsed too."""
    import google_crc32c

    root = _fresh_copy(work / "seed", work / "case")
    rel = "volumes.zarr/v/image/c/0/0/0"
    n = _index_bytes(work / "seed")
    if len(data) >= n and hashlib.sha256(data).digest()[0] & 1:
        data = data[:-4] + np.uint32(google_crc32c.value(data[-n:-4])).tobytes()
    (root / rel).write_bytes(data)
    _rehash_header(root, rel)
    _read_everything(root)


def _index_bytes(root: Path) -> int:
    meta = json.loads((root / "volumes.zarr/v/image/zarr.json").read_text())
    sharding = meta["codecs"][0]["configuration"]
    per = np.prod(np.array(meta["chunk_grid"]["configuration"]["chunk_shape"])
                  // np.array(sharding["chunk_shape"]))  # fmt: skip
    return 16 * int(per) + 4


# --- parsers of other modules: public entry points ------------------------------------------
def safetensors_setup(work: Path) -> list[bytes]:
    from medfm.models import build_encoder
    from medfm.models.export import export_encoder

    spec = {"name": "vit2d", "size": "tiny", "embed_dim": 32, "depth": 1, "num_heads": 2,
            "img_size": 32, "patch_size": 8}  # fmt: skip
    sidecar = export_encoder(build_encoder(spec), work / "seed", preprocessing={}, data={},
                             training={})  # fmt: skip
    return [sidecar.with_suffix(".safetensors").read_bytes()]


def safetensors_run(work: Path, data: bytes) -> None:
    from medfm.io import sha256_bytes
    from medfm.models.export import load_encoder

    root = _fresh_copy(work / "seed", work / "case")
    (root / "encoder.safetensors").write_bytes(data)
    sidecar = json.loads((root / "encoder.json").read_text())
    sidecar["weights"]["sha256"] = sha256_bytes(data)  # reach the parser behind the hash
    (root / "encoder.json").write_text(json.dumps(sidecar))
    load_encoder(root / "encoder.json")


def _export_errors() -> tuple[type[BaseException], ...]:
    from medfm.finetune.export import ExportError as FinetuneExportError
    from medfm.models.export import ExportError

    return (ExportError, FinetuneExportError)


def medfm_json_setup(work: Path) -> list[bytes]:
    """A medfm.json as finetune.export writes it, beside a real head.safetensors."""
    import torch
    from safetensors.torch import save_file

    from medfm.finetune.export import EXPORT_FORMAT
    from medfm.io import sha256_file

    root = work / "seed"
    root.mkdir(parents=True, exist_ok=True)
    save_file(
        {"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, str(root / "head.safetensors")
    )
    meta = {"format": EXPORT_FORMAT, "version": 1, "name": "fuzz", "mode": "probe",
            "task": {"type": "classification", "label_names": ["a", "b"]},
            "label_names": ["a", "b"], "base_encoder": {"uri": "enc", "sha256": "0" * 64},
            "preprocessing": {}, "metrics": {}, "threshold": None, "data": {},
            "files": {"head.safetensors": sha256_file(root / "head.safetensors")[0]}}  # fmt: skip
    return [json.dumps(meta, indent=1).encode()]


def medfm_json_run(work: Path, data: bytes) -> None:
    from medfm.finetune.export import read_export

    root = _fresh_copy(work / "seed", work / "case")
    (root / "medfm.json").write_bytes(data)
    read_export(root)


def _ingest_errors() -> tuple[type[BaseException], ...]:
    from medfm.ingest.registry import IngestError

    return (IngestError,)


def dicom_setup(work: Path) -> list[bytes]:
    from pydicom.data import get_testdata_file

    return [Path(get_testdata_file(n)).read_bytes() for n in ("CT_small.dcm", "MR_small.dcm")]


def dicom_run(work: Path, data: bytes) -> None:
    """One DICOM file through the ingest reader: scan, group, read (quarantines are results)."""
    from medfm.ingest.load import parse_spec
    from medfm.ingest.privacy import Keyring
    from medfm.ingest.registry import Quarantine, ReadContext, create_reader
    from medfm.ingest.sources import list_files

    folder = work / "case"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "x.dcm").write_bytes(data)
    spec = parse_spec({"sources": [{"name": "f", "root": str(folder), "format": "dicom"}]})
    src, kr = spec.sources[0], Keyring(hashlib.sha256(b"medfm-fuzz").digest())
    fs, files, _ = list_files(src)
    reader = create_reader(src.format)
    ctx = ReadContext(fs, src, spec, kr)
    scans = {f.rel: reader.scan(f, ctx) for f in files}
    for item in reader.group(files, scans, src):
        if not isinstance(item, Quarantine):
            list(reader.read(item, ReadContext(fs, src, spec, kr, {}, item)))


def wfdb_setup(work: Path) -> list[bytes]:
    src = SAMPLE_DATA / "wfdb"
    if not (src / "100.hea").exists():
        return []
    (work / "case").mkdir(exist_ok=True)
    for p in [*src.glob("100.*"), *src.glob("s0010_re.*")]:
        if p.suffix != ".hea":  # the signal files both headers name
            shutil.copy2(p, work / "case" / p.name)
    return [(src / "100.hea").read_bytes(), (src / "s0010_re.hea").read_bytes()]


def wfdb_run(work: Path, data: bytes) -> None:
    from medfm.ingest.signals.readers import ReaderOptions, read_wfdb

    (work / "case" / "100.hea").write_bytes(data)
    read_wfdb(str(work / "case" / "100.hea"), ReaderOptions())


def edf_setup(work: Path) -> list[bytes]:
    import pyedflib

    data = Path(pyedflib.__file__).parent / "tests" / "data"
    return [(data / n).read_bytes() for n in ("test_subsecond.edf", "test_utf8.edf")]


def edf_run(work: Path, data: bytes) -> None:
    """Mutations land in the header (the first 256 + 256 per signal bytes) most of the time."""
    from medfm.ingest.signals.readers import ReaderOptions, read_edf

    (work / "x.edf").write_bytes(data)
    read_edf(str(work / "x.edf"), ReaderOptions())


def csv_setup(work: Path) -> list[bytes]:
    table = SAMPLE_DATA / "mimic-iv-demo-2.2" / "hosp" / "admissions.csv.gz"
    if not table.exists():
        return []
    lines = gzip.decompress(table.read_bytes()).splitlines(keepends=True)
    return [b"".join(lines[:40])]


def csv_run(work: Path, data: bytes) -> None:
    import fsspec

    from medfm.ingest.ehr.tables import open_batches

    columns = ["subject_id", "hadm_id", "admittime", "dischtime"]
    path = work / ("x.csv.gz" if data[:1] == b"s" else "x.csv")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    for _ in open_batches(fsspec.filesystem("file"), str(path), columns, 16):
        pass


CASES = {c.name: c for c in [
    Case("tar", True, tar_setup, tar_run, _shard_errors),
    Case("tar_in_set", True, tar_in_set_setup, tar_in_set_run, _shard_errors),
    Case("npy", True, npy_setup, npy_run, _shard_errors),
    Case("png", True, png_setup, png_run, _shard_errors),
    Case("manifest_json", True, header_setup, header_run, _shard_errors),
    Case("manifest_parquet", True, parquet_setup, parquet_run, _shard_errors),
    Case("manifest_rows", True, rows_setup, rows_run, _shard_errors),
    Case("zarr_meta", True, zarr_meta_setup, zarr_meta_run, _shard_errors),
    Case("zarr_shard_index", True, zarr_shard_setup, zarr_shard_run, _shard_errors),
    Case("safetensors", False, safetensors_setup, safetensors_run, _export_errors),
    Case("medfm_json", False, medfm_json_setup, medfm_json_run, _export_errors),
    Case("dicom", False, dicom_setup, dicom_run, _ingest_errors),
    Case("wfdb", False, wfdb_setup, wfdb_run, _ingest_errors),
    Case("edf", False, edf_setup, edf_run, _ingest_errors),
    Case("csv", False, csv_setup, csv_run, _ingest_errors),
]}  # fmt: skip


# --- running ------------------------------------------------------------------------------
def limit_memory(headroom: int = MEMORY_HEADROOM) -> None:
    """Cap the address space at what is mapped now plus headroom: a bomb raises MemoryError."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom, resource.RLIM_INFINITY))


def prepare_child(names: list[str], work: Path) -> None:
    """Seeds for each case, each seed run once (so every lazy import happens now), then the
    address-space cap and low decode limits: the medfm caps, not the OS, should stop a bomb."""
    for name in names:
        CASES[name].prepare(work)
        for seed in CASES[name].seeds:
            CASES[name].check(seed)
    os.environ.setdefault("MEDFM_MAX_ARRAY_BYTES", str(256 << 20))
    os.environ.setdefault("MEDFM_MAX_MEMBER_BYTES", str(256 << 20))
    limit_memory()


def run_child(name: str, seconds: float, seed: int, findings: Path, input_seconds: float) -> dict:
    """Fuzz one prepared case for `seconds`; the input being run is saved first, so an input
    that kills the process is on disk."""
    case = CASES[name]
    out = {"bench": "fuzz", "case": name, "value": 0, "unit": "inputs", "findings": 0,
           "shard_parser": case.shard, "found": []}  # fmt: skip
    if not case.seeds:
        out["skipped"] = "no seed files (MEDFM_SAMPLE_DATA missing?)"
        return out
    rng, end, seen = random.Random(seed), time.monotonic() + seconds, set()
    findings.mkdir(parents=True, exist_ok=True)
    current = findings / f"{name}.current"
    while time.monotonic() < end:
        data = mutate(rng.choice(case.seeds), random_ops(rng))
        current.write_bytes(data)
        t0 = time.monotonic()
        problem = case.check(data)
        took = time.monotonic() - t0
        if problem is None and took > input_seconds:
            problem = f"slow: {took:.1f} s for one input"
        out["value"] += 1
        if problem is not None:
            kind = problem.split(":")[0] + problem.rsplit(" at ", 1)[-1]
            if kind not in seen:  # one saved input per kind of finding
                seen.add(kind)
                digest = hashlib.sha256(data).hexdigest()[:16]
                (findings / f"{name}-{digest}.bin").write_bytes(data)
                out["found"].append({"input": f"{name}-{digest}.bin", "problem": problem})
            out["findings"] += 1
    current.unlink(missing_ok=True)
    return out


def run_atheris(name: str, seconds: float, findings: Path) -> None:
    """Coverage-guided (libFuzzer via atheris) run of one case; exits when the time is up."""
    import atheris

    case = CASES[name]
    with atheris.instrument_imports(include=["medfm"]):  # coverage of medfm's own parsers
        prepare_child([name], Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-")))
    corpus = findings / f"{name}-corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(case.seeds):
        (corpus / f"seed{i}").write_bytes(s)

    def one(data: bytes) -> None:
        problem = case.check(data)
        if problem is not None:
            raise RuntimeError(problem)  # libFuzzer saves the input and stops

    atheris.Setup([sys.argv[0], f"-max_total_time={int(seconds)}", "-rss_limit_mb=4096",
                   f"-artifact_prefix={findings}/{name}-", str(corpus)], one)  # fmt: skip
    atheris.Fuzz()


def run_case(name: str, args: argparse.Namespace) -> list[dict]:
    """Cases (comma-separated) in a child process; a child killed by a signal is a finding."""
    cmd = [sys.executable, __file__, "--child", name, "--seconds", str(args.seconds),
           "--seed", str(args.seed), "--findings", str(args.findings),
           "--input-seconds", str(args.input_seconds), "--engine", args.engine]  # fmt: skip
    n = name.count(",") + 1
    args.findings.mkdir(parents=True, exist_ok=True)
    results = args.findings / "results.jsonl"
    results.unlink(missing_ok=True)
    cmd += ["--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=n * args.seconds * 3 + 180)
    lines = results.read_text().splitlines() if results.exists() else []
    if args.engine == "atheris":
        import re

        runs = re.findall(r"Done (\d+) runs", proc.stderr) or re.findall(r"#(\d+)\s", proc.stderr)
        crashed = "==ERROR" in proc.stderr or "Uncaught Python exception" in proc.stderr
        return [{"bench": "fuzz", "case": name, "value": int(runs[-1]) if runs else 0,
                 "unit": "inputs", "findings": int(crashed), "engine": "atheris",
                 "found": [proc.stderr[-600:]] if crashed else []}]  # fmt: skip
    out = [json.loads(ln) for ln in lines]
    if proc.returncode != 0:
        dead = name.split(",")[len(out)]
        current = args.findings / f"{dead}.current"
        out.append({"bench": "fuzz", "case": dead, "value": 0, "unit": "inputs", "findings": 1,
                    "found": [{"input": current.name if current.exists() else None,
                               "problem": f"child exited {proc.returncode}: "
                                          f"{proc.stderr[-400:]}"}]})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="default: all")
    ap.add_argument("--seconds", type=float, default=20.0, help="per case")
    ap.add_argument("--quick", action="store_true", help="3 s per case: under 60 s in all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input-seconds", type=float, default=5.0, help="slower inputs are findings")
    ap.add_argument("--findings", type=Path, default=Path(tempfile.gettempdir(), "medfm-fuzz"),
                    help="where inputs that caused findings are saved")  # fmt: skip
    ap.add_argument("--engine", choices=("random", "atheris"), default="random")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.engine == "atheris":
            run_atheris(args.child, args.seconds, args.findings)
            return
        names = args.child.split(",")
        with tempfile.TemporaryDirectory(prefix="medfm-fuzz-") as tmp:
            prepare_child(names, Path(tmp))
            for name in names:
                line = run_child(name, args.seconds, args.seed, args.findings, args.input_seconds)
                with open(args.results, "a") as f:  # not stdout: C decoders print there
                    f.write(json.dumps(line) + "\n")
        return
    names = args.case or list(CASES)
    if args.quick:  # one child for every case: process start-up dominates a short run
        args.seconds, args.engine = 1.5, "random"
        names = [",".join(names)]
    for name in names:
        for line in run_case(name, args):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

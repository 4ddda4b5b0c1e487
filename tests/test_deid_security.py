"""De-identification hardening (security issue 18): guessable keys are refused, nothing shipped is
a fast function of the key, no path, UID or date from folder and file names reaches any output
(quarantine reasons included), paths are hashed unless the spec opts in."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import random
import secrets
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ingest_helpers import KEY, NIBABEL_FILES, PYDICOM_FILES
from PIL import Image

from medfm.ingest.bookkeeping import JOB_FILE, Bookkeeper, ResumeError, scrub_reason
from medfm.ingest.job import _attributes, run_ingest
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import MIN_KEY_BITS, DeidKeyError, Keyring, key_strength
from medfm.shards import Manifest, verify

# ---------------------------------------------------------------- 1: key strength

GUESSABLE = [
    b"hospital-key-001",  # the key the issue recovered from 1,002 candidates
    b"hospital-key-001-hospital-key-001-hospital-key-001",  # long, but one phrase repeated
    b"correct horse battery staple",
    b"Secr3tPassw0rdForTheHospital2024",
    b"St.Mary's General Hospital research key 2024!",
    b"test-key-0123456789abcdef-not-secret",  # the old test key
    b"deadbeef" * 8,  # hex, but 5 distinct characters
    b"0123456789abcdef" * 4,  # hex, but a sequence repeated
    b"0" * 64,
    b"aB3$" * 10,
    bytes(range(100, 140)),  # "binary", but one sequence
]


@pytest.mark.parametrize("key", GUESSABLE, ids=lambda k: k[:20].decode("latin-1"))
def test_guessable_keys_are_refused_without_quoting_them(key, monkeypatch, tmp_path):
    assert key_strength(key).bits < MIN_KEY_BITS
    with pytest.raises(DeidKeyError) as e:
        Keyring(key)
    monkeypatch.delenv("MEDFM_DEID_KEY", raising=False)
    (tmp_path / "key").write_bytes(key + b"\n")
    with pytest.raises(DeidKeyError):
        Keyring.load(str(tmp_path / "key"))
    msg = str(e.value)
    assert "openssl rand -hex 32" in msg and str(MIN_KEY_BITS) in msg
    assert key.decode("latin-1") not in msg and key.decode("latin-1")[:8] not in msg


def test_csprng_keys_are_accepted():
    rng = random.Random(18)  # fixed: the same 600 keys every run
    forms = {
        "hex16": lambda b: b.hex().encode(),
        "hex32": lambda b: b.hex().encode(),
        "base64_16": base64.b64encode,
        "base64_32": base64.b64encode,
        "urlsafe32": lambda b: base64.urlsafe_b64encode(b).rstrip(b"="),
        "raw32": lambda b: b,
    }
    for name, encode in forms.items():
        size = 16 if name.endswith("16") else 32
        for _ in range(100):
            key = encode(rng.randbytes(size))
            assert not key_strength(key).problem, (name, key_strength(key))


def test_resume_check_is_a_salted_scrypt_in_private_bookkeeping(tmp_path):
    kr, other = Keyring(KEY), Keyring(secrets.token_hex(32).encode())
    a, b = Bookkeeper(str(tmp_path / "a")), Bookkeeper(str(tmp_path / "b"))
    assert a.start("spec", kr, resume=False) and b.start("spec", kr, resume=False)
    ja, jb = (json.loads((tmp_path / d / JOB_FILE).read_text()) for d in ("a", "b"))
    check = ja["key_check"]
    assert check["kdf"] == "scrypt" and check["n"] >= 2**14 and check["r"] >= 8
    assert check["salt"] != jb["key_check"]["salt"] and check["hash"] != jb["key_check"]["hash"]
    salt = bytes.fromhex(check["salt"])
    expect = hashlib.scrypt(KEY, salt=salt, n=check["n"], r=check["r"], p=check["p"],
                            maxmem=2**28, dklen=32).hex()  # fmt: skip
    assert check["hash"] == expect
    assert set(ja) == {"spec", "key_check"}  # no fast fingerprint beside it
    assert a.start("spec", kr, resume=True) is False  # the same key resumes
    with pytest.raises(ResumeError, match="de-identification key differs"):
        a.start("spec", other, resume=True)
    (tmp_path / "a" / JOB_FILE).write_text(json.dumps({"spec": "spec", "key_id": "0a1b2c3d4e5f"}))
    with pytest.raises(ResumeError, match="older medfm"):
        a.start("spec", kr, resume=True)


# ---------------------------------------------------------------- 3: paths hashed by default


def test_paths_are_hashed_unless_the_spec_opts_in():
    src = {"name": "s", "root": str(PYDICOM_FILES)}
    default = parse_spec({"sources": [src]})
    opted = parse_spec({"sources": [src], "deid": {"hash_paths": False}})
    assert default.deid.hash_paths is True
    assert _attributes(default)["deidentification"]["paths"] == "keyed-hash"
    assert _attributes(opted)["deidentification"]["paths"] == "relative"
    assert "key_id" not in _attributes(default)["deidentification"]


# ---------------------------------------------------------------- 2: reasons scrubbed


def test_scrub_keeps_reasons_and_drops_paths_names_uids_dates():
    keep = [
        "missing slice between 12.5 mm and 15.0 mm",
        "label map size (10, 10, 10) != image size (33, 41, 25)",
        "unexpected KeyError: 'PixelData'",
        "gantry tilt 2.5 degrees (> 0.5)",
        "not a DICOM file (e.g. no DICM preamble)",
    ]
    assert [scrub_reason(r) for r in keep] == keep
    for leaky in [
        "[Errno 2] No such file or directory: '/data/Smith John MRN4471/CT.1.3.12.2.1107.dcm'",
        "File cannot be read: /data/Smith_John_MRN4471/vol.raw for reading.",
        r"cannot open C:\PACS\Smith John MRN4471\x.dcm",
        "record p10000032_s50414267_2180-07-23.dcm failed",
        "series 1.3.12.2.1107.5.1.4.95642 on 21800723",
    ]:
        out = scrub_reason(leaky)
        for needle in ("Smith", "John", "MRN4471", "1.3.12", "2180", "p10000032"):
            assert needle not in out, (leaky, out)


PATIENT_DIR = "Smith_John_MRN4471"
NEEDLES = ["Smith", "John", "MRN4471", "1.3.12.2.1107", "2180-07-23", "21800723", "p10000032"]


def _patient_folder(root: Path) -> None:
    """A PACS-style export in a folder named after the patient: good and corrupt files named
    by SOP Instance UID, MIMIC-style names carrying a real date, a corrupt NIfTI, a MetaImage
    whose data file is missing, a dangling link, and a sub-folder with spaces."""
    uid = "CT.1.3.12.2.1107.5.1.4.95642.30000020010112345678900001"
    root.mkdir(parents=True)
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", root / f"{uid}.dcm")
    raw = (PYDICOM_FILES / "MR_small.dcm").read_bytes()
    (root / f"{uid[:-1]}2.dcm").write_bytes(raw[: len(raw) // 2])  # truncated DICOM
    mr = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm").pixel_array.astype(float)
    Image.fromarray((mr / mr.max() * 255).astype(np.uint8)).save(root / "p10000032_2180-07-23.png")
    sub = root / "Smith John ward 7"
    sub.mkdir()
    png = (root / "p10000032_2180-07-23.png").read_bytes()
    (sub / "p10000032_2180-07-23_cut.png").write_bytes(png[: len(png) // 3])
    gz = gzip.compress((NIBABEL_FILES / "anatomical.nii").read_bytes())
    (sub / "Smith_John_MRN4471_2180-07-23.nii.gz").write_bytes(gz[: len(gz) // 2])
    (sub / "p10000032.mha").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n"
        f"ElementDataFile = {root}/Smith_John_MRN4471_2180-07-23.raw\n"
    )
    (sub / "CT.1.3.12.2.1107.5.1.4.95642.9.dcm").symlink_to(root / "gone_21800723.dcm")


@pytest.fixture(scope="module")
def ray_rt():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _every_byte(dest: Path) -> list[tuple[str, bytes]]:
    out = []
    for p in sorted(dest.rglob("*")):
        out.append((f"name of {p}", str(p.relative_to(dest)).encode()))
        if p.is_file():
            data = p.read_bytes()
            out.append((str(p), data))
            if p.suffix == ".parquet":
                rows = list(Manifest.open(str(dest)).rows())
                out.append(("manifest rows", json.dumps(rows, default=str).encode()))
    return out


def test_patient_folder_names_uids_and_dates_reach_no_output(ray_rt, tmp_path):
    root = tmp_path / PATIENT_DIR
    _patient_folder(root)
    spec = {"sources": [{"name": "pacs", "root": str(root)}], "shards": {"task_items": 2}}
    dest = tmp_path / "out"
    kr = Keyring(KEY)
    summary = run_ingest(parse_spec(spec), str(dest), keyring=kr, progress=False)
    assert summary.written == 2 and verify(str(dest)).ok
    q = [json.loads(x) for x in (dest / "quarantine.jsonl").read_text().splitlines()]
    assert len(q) == 5, q  # every bad input is accounted for, none silently dropped
    assert any("truncated or corrupt" in r["reason"] for r in q)
    parts = list((dest / "_ingest" / "parts").glob("*.json"))
    assert parts and any(json.loads(p.read_text())["quarantine"] for p in parts)
    header = Manifest.open(str(dest)).header
    assert header["attributes"]["deidentification"]["paths"] == "keyed-hash"
    # Nothing shipped is a fast function of the key: not the key, its hashes, or the old key_id.
    fast = [KEY, KEY.hex().encode(), hashlib.sha256(KEY).hexdigest().encode(),
            kr.token("key-id")[:12].encode()]  # fmt: skip
    for where, blob in _every_byte(dest):
        for needle in NEEDLES + [str(tmp_path)]:
            at = blob.find(needle.encode())
            assert at < 0, f"{needle!r} leaked into {where}: {blob[max(at - 150, 0) : at + 50]}"
        if "_ingest" not in where:
            for f in fast:
                assert f not in blob, f"a fast function of the key is in {where}"


# ---------------------------------------------------------------- demo keys


def test_the_demo_makes_a_strong_private_key(tmp_path):
    from medfm.demo.job import prepare

    key = prepare(tmp_path, overwrite=False)
    assert not key_strength(key.read_bytes().strip()).problem
    assert os.stat(key).st_mode & 0o077 == 0

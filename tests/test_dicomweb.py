"""The dicomweb source against a real PACS: Orthanc with its DICOMweb plugin on a loopback port
(Debian's orthanc and orthanc-dicomweb, which .ci/run installs), holding pydicom's files and a
written CT series. Ingesting from it must give the manifest rows of the same files on disk."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from ingest_helpers import KEY, PYDICOM_FILES, small_ct, write_series
from s3_helpers import free_port

from medfm.ingest.job import run_ingest
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.ingest.registry import IngestError
from medfm.ingest.spec import SpecError
from medfm.shards import Manifest

pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (medfm[pacs])")

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
USER, PASSWORD = "medfm", "orthanc-test-pass"
MEDFM = str(Path(sys.executable).parent / "medfm")
ACCESSION = "ACC-0001"


def _plugin() -> str | None:
    """The DICOMweb plugin's shared library (what `dpkg -L orthanc-dicomweb` lists)."""
    for folder in PLUGIN_DIRS:
        found = sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []
        if found:
            return str(found[0])
    return None


@dataclass(frozen=True)
class Pacs:
    http: str  # Orthanc's REST root
    files: list[Path]  # what it holds, as uploaded

    @property
    def root(self) -> str:
        return f"dicomweb+{self.http}/dicom-web"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Pacs:
    if ORTHANC is None or _plugin() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc "
                    "orthanc-dicomweb; .ci/run does it as root)")  # fmt: skip
    tmp = tmp_path_factory.mktemp("orthanc")
    files = _inputs(tmp / "inputs")
    port = free_port()
    config = {
        "Name": "medfm-test", "HttpPort": port, "DicomServerEnabled": False,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
        "Plugins": [_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }  # fmt: skip
    (tmp / "orthanc.json").write_text(json.dumps(config))
    log = (tmp / "orthanc.log").open("wb")
    proc = subprocess.Popen([ORTHANC, str(tmp / "orthanc.json")], stdout=log, stderr=log)
    http = f"http://127.0.0.1:{port}"
    try:
        _wait_up(http, proc, tmp / "orthanc.log")
        for f in files:
            r = requests.post(f"{http}/instances", data=f.read_bytes(), auth=(USER, PASSWORD))
            r.raise_for_status()
        saved = {k: os.environ.get(k) for k in ("MEDFM_DICOMWEB_USER", "MEDFM_DICOMWEB_PASSWORD")}
        os.environ.update(MEDFM_DICOMWEB_USER=USER, MEDFM_DICOMWEB_PASSWORD=PASSWORD)
        yield Pacs(http, files)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _wait_up(http: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"Orthanc exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{http}/system", auth=(USER, PASSWORD), timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    pytest.fail("Orthanc did not answer /system within 30 s")


def _inputs(folder: Path) -> list[Path]:
    """A written CT series (one accession number) and pydicom's CT and MR images."""
    files = write_series(
        small_ct(),
        folder / "series",
        phi={"AccessionNumber": ACCESSION, "SeriesDescription": "THORAX AXIAL"},
    )
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(PYDICOM_FILES / name, folder / name)
        files.append(folder / name)
    return files


def _ingest(source: dict, dest: Path, **kw) -> list[dict]:
    spec = {"sources": [{"name": "pacs", **source}], "split": {"fractions": [1, 0]}}
    run_ingest(parse_spec(spec), str(dest), keyring=Keyring(KEY), progress=True, **kw)
    return sorted(Manifest.open(str(dest)).rows(), key=lambda r: r["key"])


def _disk_copy(files: list[Path], folder: Path) -> None:
    """The same files in the layout the fetch gives them (names are keyed hashes of the
    UIDs), so that sample keys, which hash relative paths, can be compared."""
    from medfm.ingest.dicomweb import instance_rel

    keyring = Keyring(KEY)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rel = instance_rel(keyring, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / rel)


def test_pacs_rows_equal_disk_rows_and_rerun_fetches_nothing(ray_local, pacs, tmp_path, capfd):
    rows = _ingest({"root": pacs.root}, tmp_path / "from_pacs")
    assert "3 studies (0 already fetched), 27 instances, 27 retrieved" in capfd.readouterr().err
    cache = tmp_path / "from_pacs" / "_ingest" / "dicomweb" / "pacs"
    names = [p.relative_to(cache).as_posix() for p in cache.rglob("*.dcm")]
    assert len(names) == len(pacs.files)
    assert all(set(n.replace("/", "").removesuffix(".dcm")) <= set("0123456789abcdef")
               for n in names)  # fmt: skip
    _disk_copy(pacs.files, tmp_path / "disk")
    from_disk = _ingest({"root": str(tmp_path / "disk")}, tmp_path / "from_disk")
    assert sorted(r["kind"] for r in rows) == ["image2d", "image2d", "volume3d"]
    for a, b in zip(rows, from_disk, strict=True):
        for field in ("key", "sha256", "shape", "modality", "patient_id", "study_id", "split"):
            assert a[field] == b[field], field
    assert rows == from_disk  # provenance too: the same input hashes under the same names

    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.dcm")}
    again = _ingest({"root": pacs.root}, tmp_path / "from_pacs", resume=True)
    assert "3 studies (3 already fetched), 0 instances, 0 retrieved" in capfd.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.dcm")} == before
    assert again == rows


def test_qido_filters_pick_matching_studies(ray_local, pacs, tmp_path):
    def kinds(dicomweb: dict, name: str) -> list[tuple[str, str]]:
        rows = _ingest({"root": pacs.root, "dicomweb": dicomweb}, tmp_path / name)
        return sorted((r["kind"], r["modality"]) for r in rows)

    assert kinds({"modality": ["MR"]}, "mr") == [("image2d", "MR")]
    table = tmp_path / "accessions.csv"
    table.write_text(f"accession\n{ACCESSION}\n")
    assert kinds({"accessions": str(table)}, "acc") == [("volume3d", "CT")]
    # pydicom's images are from 2004: the range and the modality together leave CT_small
    assert kinds({"study_date": "-20191231", "modality": ["CT"]}, "date") == [("image2d", "CT")]
    assert kinds({"series_description": "*AXIAL*"}, "desc") == [("volume3d", "CT")]


def _cli(spec: dict, tmp_path: Path, address: str | None = None) -> subprocess.CompletedProcess:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [MEDFM, "ingest", str(spec_path), "--out", str(tmp_path / "out"), "--quiet"]
    env = {**os.environ, "MEDFM_DEID_KEY": KEY.decode()}
    return subprocess.run(cmd + (["--address", address] if address else []),
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


def test_credentials_in_the_spec_are_refused(tmp_path):
    url = "dicomweb+http://127.0.0.1:9/dicom-web"
    for key in ("password", "token", "user", "headers"):
        src = {"name": "pacs", "root": url, "dicomweb": {key: "s3cret-value"}}
        with pytest.raises(SpecError) as e:
            parse_spec({"sources": [src]})
        assert str(e.value).startswith(f"sources[0].dicomweb.{key}: DICOMweb credentials never")
        assert "MEDFM_DICOMWEB_USER" in str(e.value) and "s3cret" not in str(e.value)
    with pytest.raises(SpecError, match=r"^sources\[0\]\.root: DICOMweb credentials") as e:
        parse_spec({"sources": [{"name": "pacs", "root": url.replace("//", "//al:s3cret@")}]})
    assert "s3cret" not in str(e.value)
    # The command line: exit 2 and the message, before anything starts.
    proc = _cli({"sources": [{"name": "pacs", "root": url, "dicomweb": {"password": "x"}}]},
                tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "medfm ingest: sources[0].dicomweb.password: DICOMweb credentials" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unreachable_server_is_one_clear_line(ray_local, tmp_path):
    port = free_port()  # nothing listens there
    src = {"name": "pacs", "root": f"dicomweb+http://127.0.0.1:{port}/dicom-web",
           "dicomweb": {"retries": 1, "backoff_s": 0.1}}  # fmt: skip
    address = ray_local.get_runtime_context().gcs_address
    proc = _cli({"sources": [src]}, tmp_path, address)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("medfm ingest:")]
    assert lines == [
        f"medfm ingest: source 'pacs': DICOMweb server 127.0.0.1:{port}: unreachable "
        "(ConnectionError) after 2 attempts"
    ], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "_ingest").exists()  # a failed start leaves nothing


def test_refused_credentials_are_one_line_naming_the_variables(ray_local, pacs, tmp_path,
                                                               monkeypatch):  # fmt: skip
    host = pacs.http.removeprefix("http://")
    monkeypatch.setenv("MEDFM_DICOMWEB_PASSWORD", "wrong-pass")
    with pytest.raises(IngestError) as e:
        _ingest({"root": pacs.root}, tmp_path / "wrong")
    assert str(e.value).startswith(f"source 'pacs': DICOMweb server {host}: HTTP 401")
    assert "MEDFM_DICOMWEB_USER" in str(e.value) and "wrong-pass" not in str(e.value)
    # A token file wins over the (now right) password: its bearer token is what Orthanc, which
    # knows only its users, refuses.
    monkeypatch.setenv("MEDFM_DICOMWEB_PASSWORD", PASSWORD)
    token = tmp_path / "token"
    token.write_text("not-a-token\n")
    monkeypatch.setenv("MEDFM_DICOMWEB_TOKEN_FILE", str(token))
    with pytest.raises(IngestError, match=f"DICOMweb server {host}: HTTP 401"):
        _ingest({"root": pacs.root}, tmp_path / "token_out")
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "token_out").exists()


class _Flaky(http.server.BaseHTTPRequestHandler):
    """A reverse proxy to Orthanc that answers 503 to the first `failures` requests: a real
    server under load, as the retries see it."""

    upstream = ""
    failures = 0
    seen: list[int] = []  # status of each request
    at: list[float] = []  # and when it came

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.at.append(time.monotonic())
        if len(self.seen) < self.failures:
            self.seen.append(503)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items() if k in ("Accept", "Authorization")}
        r = requests.get(self.upstream + self.path, headers=headers, timeout=30)
        self.seen.append(r.status_code)
        self.send_response(r.status_code)
        self.send_header("Content-Type", r.headers.get("Content-Type", ""))
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    def log_message(self, *args) -> None:
        pass


def test_5xx_answers_are_retried_with_backoff(ray_local, pacs, tmp_path):
    _Flaky.upstream, _Flaky.failures, _Flaky.seen, _Flaky.at = pacs.http, 3, [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"dicomweb+http://127.0.0.1:{server.server_port}/dicom-web"
    try:
        src = {"root": root, "dicomweb": {"modality": ["MR"], "retries": 3, "backoff_s": 0.2}}
        rows = _ingest(src, tmp_path / "flaky")
        assert _Flaky.seen[:4] == [503, 503, 503, 200] and [r["modality"] for r in rows] == ["MR"]
        waits = [b - a for a, b in zip(_Flaky.at[:3], _Flaky.at[1:4], strict=True)]
        assert all(w >= 0.95 * want for w, want in zip(waits, (0.2, 0.4, 0.8), strict=True)), waits
        _Flaky.failures, _Flaky.seen, _Flaky.at = 2, [], []
        src["dicomweb"]["retries"] = 1
        with pytest.raises(IngestError) as e:
            _ingest(src, tmp_path / "gives_up")
        host = f"127.0.0.1:{server.server_port}"
        assert str(e.value) == f"source 'pacs': DICOMweb server {host}: HTTP 503 after 2 attempts"
    finally:
        server.shutdown()

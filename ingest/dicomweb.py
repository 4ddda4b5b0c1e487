"""A PACS over DICOMweb as a source: `root: dicomweb+http(s)://host/dicom-web`.

The job fetches first, then ingests files: QIDO-RS finds the studies, series and instances the
source's `dicomweb:` filters select, WADO-RS retrieves each instance (at most `concurrency` at
once, retried with exponential backoff on 5xx, 429 and connection errors) into the job's work
folder, `_ingest/dicomweb/<source>/<study>/<series>/<instance>.dcm`, each name a keyed hash of
its UID (no PHI in a name), written under a temporary name and renamed. The source then reads
that folder with the DICOM reader like any other, so grouping, de-identification and
provenance are those of the same files on disk. A study whose instances all arrived gets a
`.complete` marker: a resumed job (or a rerun of it) does not fetch it again.

Credentials come from the environment only: MEDFM_DICOMWEB_USER and MEDFM_DICOMWEB_PASSWORD
(HTTP basic), or MEDFM_DICOMWEB_TOKEN_FILE, a file holding a bearer token.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from medfm.io import as_url, atomic_write_bytes

from .bookkeeping import WORK_DIR, Bookkeeper
from .privacy import Keyring
from .registry import IngestError
from .spec import DICOMWEB_SCHEME, DicomWebSpec, IngestSpec, SourceSpec

CACHE_DIR = f"{WORK_DIR}/dicomweb"
COMPLETE = ".complete"  # a dot-file: discovery never lists it
PAGE = 500  # QIDO results per request (servers cap a response; paging gets the rest)
ACCESSION_COLUMN = "accession"
STUDY, SERIES, SOP, DESC = "0020000D", "0020000E", "00080018", "0008103E"
ANY_SYNTAX = (("application/dicom", "*"),)  # the stored bytes, not a transcoded copy
T = TypeVar("T")


def is_dicomweb(root: str) -> bool:
    return root.startswith(DICOMWEB_SCHEME)


def study_rel(keyring: Keyring, study: str) -> str:
    return keyring.token("dicomweb", study)[:16]


def instance_rel(keyring: Keyring, study: str, series: str, sop: str) -> str:
    """Where an instance lands under the source's cache folder: keyed hashes of its UIDs (a
    plain hash of a known UID would link the file to it)."""
    series_name, sop_name = keyring.token("dicomweb", series)[:16], keyring.token("dicomweb", sop)
    return f"{study_rel(keyring, study)}/{series_name}/{sop_name[:24]}.dcm"


def fetch_sources(spec: IngestSpec, book: Bookkeeper, keyring: Keyring,
                  progress: bool = True) -> IngestSpec:  # fmt: skip
    """The spec with each DICOMweb source fetched into the job's `CACHE_DIR/<name>` and
    pointed there (`origin` keeps the URL, so the spec's fingerprint is unchanged)."""
    sources = []
    for src in spec.sources:
        if is_dicomweb(src.root):
            folder = book.path(f"{CACHE_DIR}/{src.name}")
            done = Fetcher(src, book.fs, folder, keyring, spec.base_dir).run()
            if progress:
                print(f"[dicomweb] {src.name}: {done}", file=sys.stderr, flush=True)
            src = dataclasses.replace(src, root=as_url(book.fs, folder), origin=src.root)
        sources.append(src)
    return dataclasses.replace(spec, sources=sources)


@dataclasses.dataclass
class FetchCounts:
    studies: int = 0
    studies_complete: int = 0  # already fetched by an earlier run: not queried further
    instances: int = 0
    fetched: int = 0
    bytes: int = 0

    def __str__(self) -> str:
        return (
            f"{self.studies} studies ({self.studies_complete} already fetched), "
            f"{self.instances} instances, {self.fetched} retrieved ({self.bytes / 1e6:.1f} MB)"
        )


class Fetcher:
    """One source's fetch: query, then retrieve what the work folder lacks."""

    def __init__(self, src: SourceSpec, fs: Any, folder: str, keyring: Keyring, base_dir: str):
        self.src, self.fs, self.folder, self.keyring = src, fs, folder, keyring
        self.cfg = src.dicomweb or DicomWebSpec()
        url = src.root[len(DICOMWEB_SCHEME) :]
        # Errors name the server (host and port), never a path, query or patient value.
        self.what = f"source {src.name!r}: DICOMweb server {urlsplit(url).netloc}"
        self.accessions = read_accessions(self.cfg.accessions, base_dir, src.name)
        self.client = _client(url, self.cfg.concurrency)
        self.counts = FetchCounts()

    def run(self) -> FetchCounts:
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            for study in sorted(self.studies()):
                self.counts.studies += 1
                self.fetch_study(study, pool)
        return self.counts

    def studies(self) -> set[str]:
        """StudyInstanceUIDs matching every filter (any of the modalities and accessions)."""
        base = {"StudyDate": self.cfg.study_date} if self.cfg.study_date else {}
        uids: set[str] = set()
        for modality in self.cfg.modality or [""]:
            for accession in self.accessions or [""]:
                filters = {**base, "ModalitiesInStudy": modality, "AccessionNumber": accession}
                found = self._paged(
                    self.client.search_for_studies, {k: v for k, v in filters.items() if v}
                )
                uids |= {_value(r, STUDY) for r in found}
        return uids - {""}

    def fetch_study(self, study: str, pool: ThreadPoolExecutor) -> None:
        folder = f"{self.folder}/{study_rel(self.keyring, study)}"
        if self.fs.exists(f"{folder}/{COMPLETE}"):
            self.counts.studies_complete += 1
            return
        todo = []
        for series in sorted(self.series(study)):
            for r in self._paged(self.client.search_for_instances, {}, study, series):
                sop = _value(r, SOP)
                path = f"{self.folder}/{instance_rel(self.keyring, study, series, sop)}"
                self.counts.instances += 1
                if sop and not self.fs.exists(path):
                    todo.append((study, series, sop, path))
        for size in pool.map(self._fetch_instance, todo):
            self.counts.fetched += 1
            self.counts.bytes += size
        self.fs.makedirs(folder, exist_ok=True)
        atomic_write_bytes(self.fs, f"{folder}/{COMPLETE}", b"{}")

    def series(self, study: str) -> set[str]:
        """The study's SeriesInstanceUIDs of the wanted modalities and description. The
        description is matched here, not by the server: DICOM's `*` and `?` reach some servers
        URL-encoded (%2A), and they then match nothing."""
        want = self.cfg.series_description.replace("[", "[[]")  # no [...] sets in DICOM
        uids: set[str] = set()
        for modality in self.cfg.modality or [""]:
            filters = {"Modality": modality} if modality else {}
            found = self._paged(self.client.search_for_series, filters, study, fields=[DESC])
            uids |= {_value(r, SERIES) for r in found
                     if not want or fnmatchcase(_value(r, DESC), want)}  # fmt: skip
        return uids - {""}

    def _fetch_instance(self, job: tuple[str, str, str, str]) -> int:
        import pydicom

        study, series, sop, path = job
        ds = self._retry(lambda: self.client.retrieve_instance(study, series, sop, ANY_SYNTAX))
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=False)  # as stored: same bytes, same hash
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        atomic_write_bytes(self.fs, path, buf.getvalue())
        return buf.tell()

    def _paged(self, search: Callable[..., list[dict]], filters: dict, *uids: str,
               **kw: Any) -> list[dict]:  # fmt: skip
        out: list[dict] = []
        while True:
            offset = len(out)
            page = self._retry(
                lambda: search(*uids, search_filters=filters, offset=offset, limit=PAGE, **kw)  # noqa: B023
            )
            if page and page[0] in out:  # a server that ignores offset: it sent everything
                return out
            out += page
            if len(page) < PAGE:
                return out

    def _retry(self, call: Callable[[], T]) -> T:
        import requests

        attempts = self.cfg.retries + 1
        for attempt in range(attempts):
            try:
                return call()
            except requests.HTTPError as e:
                code = e.response.status_code if e.response is not None else 0
                why = f"HTTP {code}"
                if code < 500 and code != 429:  # the request is wrong: retrying cannot help
                    raise IngestError(f"{self.what}: {why}{_hint(code)}") from None
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as e:  # fmt: skip
                why = f"unreachable ({type(e).__name__})"
            if attempt + 1 < attempts:
                time.sleep(self.cfg.backoff_s * 2**attempt)
        raise IngestError(f"{self.what}: {why} after {attempts} attempts")


def _hint(code: int) -> str:
    if code in (401, 403):
        return (" (credentials: set MEDFM_DICOMWEB_USER and MEDFM_DICOMWEB_PASSWORD, or "
                "MEDFM_DICOMWEB_TOKEN_FILE)")  # fmt: skip
    return ""


def _value(record: dict, tag: str) -> str:
    values = (record.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _client(url: str, connections: int) -> Any:
    """A dicomweb-client with the environment's credentials and a connection for each
    concurrent retrieval; its own retries are off (ours also cover connection errors)."""
    try:
        import requests
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise IngestError(
            "a dicomweb source needs dicomweb-client: pip install 'medfm[pacs]'"
        ) from None
    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, requests.adapters.HTTPAdapter(pool_maxsize=connections))
    token_file = os.environ.get("MEDFM_DICOMWEB_TOKEN_FILE")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise IngestError(
                f"MEDFM_DICOMWEB_TOKEN_FILE: cannot read it ({type(e).__name__})"
            ) from None
        session.headers["Authorization"] = f"Bearer {token}"
    elif os.environ.get("MEDFM_DICOMWEB_USER"):
        session.auth = (
            os.environ["MEDFM_DICOMWEB_USER"],
            os.environ.get("MEDFM_DICOMWEB_PASSWORD", ""),
        )
    client = DICOMwebClient(url, session=session)
    client.set_http_retry_params(retry=False)
    return client


def read_accessions(path: str, base_dir: str, source: str) -> list[str]:
    """Accession numbers from a CSV's `accession` column (relative paths: the spec's folder)."""
    if not path:
        return []
    p = Path(path).expanduser()
    p = p if p.is_absolute() or not base_dir else Path(base_dir, p)
    what = f"source {source!r}: dicomweb.accessions"
    try:
        rows = list(csv.DictReader(io.StringIO(p.read_text(encoding="utf-8-sig"))))
    except (OSError, UnicodeDecodeError) as e:
        raise IngestError(f"{what}: cannot read it ({type(e).__name__})") from None
    if rows and ACCESSION_COLUMN not in rows[0]:
        raise IngestError(f"{what}: needs an {ACCESSION_COLUMN!r} column")
    found = sorted({(r[ACCESSION_COLUMN] or "").strip() for r in rows} - {""})
    if not found:  # an empty list must not widen the query to every study
        raise IngestError(f"{what}: names no accession number")
    return found

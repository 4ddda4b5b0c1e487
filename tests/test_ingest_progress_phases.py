"""`medfm ingest` says what it is doing (issue 19): a line for Ray's start-up, discovery, the
DICOM header scan, the CT statistics pass and the conversion, with counts, rate and ETA;
quarantined items counted live and duplicates not counted as written; the same lines in
`<out>/_logs/ingest-*.log`, without input paths; an unexpected error ends in one stderr line
naming the file and the cause (exit 3) with its traceback in the log only.

Real `medfm ingest` subprocesses on pydicom's 5-slice CT series and nibabel's volumes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from ingest_helpers import KEY, NIBABEL_FILES, PYDICOM_FILES

from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.ingest.progress import redact

CANARY = "Zqx_Wilhelmina_Doe"  # a patient's name in a folder name: never in a log
RATE = r"\([\d.]+/s\)"
MBS = r"[\d.]+ MB/s"
ETA = r"\| ETA (\d\d:\d\d:\d\d)$"
OURS = ("[ingest]", "medfm ingest:", "{")  # the job's own lines (and the summary's JSON)


def _inputs(root: Path) -> Path:
    vols = root / CANARY / "vols"
    vols.mkdir(parents=True)
    data = (NIBABEL_FILES / "anatomical.nii").read_bytes()
    (vols / "Doe_John_1.nii").write_bytes(data)
    (vols / "Doe_John_2.nii").write_bytes(data)  # equal pixels: a duplicate, not written
    (vols / "Doe_John_3.nii").write_bytes(data[:400])  # truncated: quarantined when read
    (vols / "Doe_John_notes.txt").write_text("not an image\n")  # quarantined by discovery
    spec = {
        "sources": [
            {"name": "ct", "root": str(PYDICOM_FILES / "dicomdirtests"), "format": "dicom",
             "include": ["98892001/CT5N/**"]},
            {"name": "vols", "root": str(vols), "modality": "MR"},
        ],
        "intensity": {"ct": "zscore"},  # needs the CT statistics pass
        "shards": {"task_items": 1},
    }  # fmt: skip
    path = root / "spec.yaml"
    path.write_text(json.dumps(spec))
    return path


def _ingest(exe: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDFM_DEID_KEY": KEY.decode()}
    cmd = [exe, "ingest", *args] + ([] if "--workers" in args else ["--workers", "2"])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _logs(dest: Path) -> list[Path]:
    return sorted((dest / "_logs").glob("ingest-*.log"))


def _log_lines(log: Path) -> list[str]:
    """The log's lines without their leading UTC time stamp."""
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
    return [stamp.sub("", x) for x in log.read_text().splitlines() if stamp.match(x)]


@pytest.fixture(scope="module")
def job(medfm_exe, tmp_path_factory):
    """One real job on a local Ray runtime it starts itself."""
    root = tmp_path_factory.mktemp("phases")
    spec, dest = _inputs(root), root / "out"
    res = _ingest(medfm_exe, str(spec), "--out", str(dest))
    assert res.returncode == 0, res.stderr[-3000:]
    return root, spec, dest, res


def _last(lines: list[str], pattern: str) -> re.Match:
    found = [m for m in map(re.compile(pattern).match, lines) if m]
    assert found, (pattern, lines)
    return found[-1]


@pytest.mark.slow  # a real Ray job
def test_every_phase_prints_its_line_with_counts_rate_and_eta(job):
    _, _, dest, res = job
    lines, summary = res.stderr.splitlines(), json.loads(res.stdout.splitlines()[-1])
    _last(lines, r"\[ingest\] ray: starting a local runtime \(2 CPUs\)$")
    _last(lines, r"\[ingest\] ray: started in [\d.]+ s \(2 CPUs\)$")
    assert _last(lines, rf"\[ingest\] ct discovery: files 5/5 {RATE} {ETA}")[1] == "00:00:00"
    vols = _last(lines, rf"\[ingest\] vols discovery: files 4/4 {RATE} \| quarantined 1 {ETA}")
    assert vols[1] == "00:00:00"
    scan = _last(lines, rf"\[ingest\] ct header scan: files 5/5 {RATE} \| in {MBS} {ETA}")
    assert scan[1] == "00:00:00"
    n = summary["tasks_run"]
    stats = _last(lines, rf"\[ingest\] CT statistics: tasks {n}/{n} {RATE} \| in {MBS} {ETA}")
    assert stats[1] == "00:00:00"
    # Quarantined items counted as they come, the duplicate not counted as a written sample.
    conversion = _last(lines, rf"\[ingest\] tasks {n}/{n} \| samples (\d+) {RATE} \| "
                              rf"quarantined (\d+) \| duplicates (\d+) \| in {MBS} \| "
                              rf"out {MBS} {ETA}")  # fmt: skip
    assert summary["written"] == 2 and summary["duplicates"] == 1, summary
    assert summary["quarantined"] == 2, summary  # the unknown file and the truncated volume
    assert conversion.groups() == ("2", "2", "1", "00:00:00"), conversion[0]


@pytest.mark.slow  # a real Ray job
def test_the_log_holds_the_console_lines_and_no_input_path(job):
    root, _, dest, res = job
    (log,) = _logs(dest)
    logged = _log_lines(log)
    console = [x for x in res.stderr.splitlines() + res.stdout.splitlines() if x.startswith(OURS)]
    assert sorted(logged) == sorted(console) and len(logged) > 8, (logged, console)
    stderr_order = [x for x in res.stderr.splitlines() if x.startswith(OURS)]
    assert [x for x in logged if x in stderr_order] == stderr_order  # and in the same order
    text = log.read_text()
    assert CANARY not in text and "Doe_John" not in text and str(root) not in text
    assert str(PYDICOM_FILES) not in text
    # The log is beside the shard set, not in it.
    from medfm.shards import verify

    report = verify(str(dest))
    assert report.ok and not report.warnings, (report.errors, report.warnings)


def _failing_copy(job, tmp_path: Path) -> Path:
    _, _, dest, _ = job
    copy = tmp_path / "out"
    shutil.copytree(dest, copy)
    return copy


def _one_line_and_a_traceback(res, dest: Path) -> tuple[str, str]:
    assert res.returncode == 3, (res.returncode, res.stderr[-3000:])
    ours = [x for x in res.stderr.splitlines() if x.startswith(OURS)]
    assert len(ours) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    log = _logs(dest)[-1]  # this run's: the first job's log was copied along
    assert f"(traceback in {dest}/_logs/{log.name})" in ours[0], ours[0]
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and ours[0] in text
    assert CANARY not in text and "Doe_John" not in text
    return ours[0], text


@pytest.mark.slow  # a real Ray job
def test_an_odd_output_file_is_one_line_naming_it_and_the_traceback_in_the_log(
    job, ray_local, tmp_path, medfm_exe
):
    """A finished set whose quarantine.jsonl became a folder: the resumed job cannot write it."""
    dest = _failing_copy(job, tmp_path)
    (dest / "quarantine.jsonl").unlink()
    (dest / "quarantine.jsonl").mkdir()
    address = ray_local.get_runtime_context().gcs_address
    res = _ingest(medfm_exe, str(job[1]), "--out", str(dest), "--resume", "--quiet",
                  "--address", address)  # fmt: skip
    line, text = _one_line_and_a_traceback(res, dest)
    assert line.startswith(f"medfm ingest: {dest}/quarantine.jsonl: IsADirectoryError "), line
    assert "IsADirectoryError" in text.split("Traceback", 1)[1]


@pytest.mark.slow  # a real Ray job
def test_a_corrupted_part_file_is_one_line_naming_it(job, ray_local, tmp_path, medfm_exe):
    dest = _failing_copy(job, tmp_path)
    part = sorted((dest / "_ingest" / "parts").glob("*.json"))[0]
    part.write_text(part.read_text()[:50])  # cut short, as a crash mid-copy would
    address = ray_local.get_runtime_context().gcs_address
    res = _ingest(medfm_exe, str(job[1]), "--out", str(dest), "--resume", "--quiet",
                  "--address", address)  # fmt: skip
    line, _ = _one_line_and_a_traceback(res, dest)
    assert line.startswith(f"medfm ingest: {part}: JSONDecodeError: "), line


def test_an_unwritable_output_is_one_line_and_exit_2(tmp_path, medfm_exe):
    spec = _inputs(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    res = _ingest(medfm_exe, str(spec), "--out", str(blocker / "out"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.splitlines() == [
        f"medfm ingest: --out {blocker / 'out'}: cannot write there (Not a directory)"
    ], res.stderr[-3000:]


def test_redact_keys_paths_under_a_source_root(tmp_path):
    root = tmp_path / CANARY
    spec = parse_spec({"sources": [{"name": "vols", "root": str(root)}]})
    keyring = Keyring(KEY)
    text = f"No such file: '{root}/Doe_John/a.nii' (under {root})"
    token = keyring.token("path", "Doe_John/a.nii")[:24]
    assert redact(text, spec, keyring) == f"No such file: '<vols>/{token}' (under <vols root>)"
    assert redact(text, spec, None) == "No such file: '<vols>/<path>' (under <vols root>)"
    spec.deid.hash_paths = False  # the user's opt-in: relative paths shown
    assert "'<vols>/Doe_John/a.nii'" in redact(text, spec, keyring)


@pytest.mark.slow  # a real Ray job (its own local runtime: its workers must reach the S3 server)
def test_on_an_object_store_the_log_is_uploaded_when_the_run_ends(tmp_path, medfm_exe):
    from s3_helpers import moto_s3

    from medfm.io import get_fs

    spec = json.loads(_inputs(tmp_path).read_text())
    spec["sources"], spec["intensity"] = spec["sources"][1:], {}  # the volumes only
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    with moto_s3() as s3:
        url = s3.url("set")
        res = _ingest(medfm_exe, str(tmp_path / "spec.yaml"), "--out", url, "--workers", "1")
        assert res.returncode == 0, res.stderr[-3000:]
        fs, root = get_fs(url)
        (log,) = fs.glob(f"{root}/_logs/ingest-*.log")
        text = fs.cat_file(log).decode()
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
    logged = [stamp.sub("", x) for x in text.splitlines() if stamp.match(x)]
    console = [x for x in res.stderr.splitlines() + res.stdout.splitlines() if x.startswith(OURS)]
    assert sorted(logged) == sorted(console) and any("vols discovery" in x for x in logged)
    assert CANARY not in text and str(tmp_path) not in text

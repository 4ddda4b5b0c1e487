"""EHR ingest progress (issues 17 and 19): the job counts the bytes of every table file it reads
(a file serving two tables once), the conversion line has an ETA by those bytes, each prepare
pass (identifier scan, partition, clean, MEDS) shows its own line, and `progress=False` is
silent. Real Ray jobs on a Synthea-style export, whose patients.csv serves two tables."""

from __future__ import annotations

import io
import itertools
import re
import time
from pathlib import Path

import pytest
from ingest_helpers import KEY
from synthea_helpers import write_synthea

from medfm.ingest.job import run_ingest
from medfm.ingest.load import load_spec
from medfm.ingest.privacy import Keyring
from medfm.ingest.progress import Progress, gather

SPEC = Path(__file__).resolve().parents[1] / "ingest" / "specs" / "ehr_synthea.yaml"
PHASE = r"\[ingest\] synthea {phase}: {unit} (\d+)/(\d+) \([\d.]+/s\){rate} \| ETA "
ETA = r"(\d\d:\d\d:\d\d)$"


def ingest(tmp_path: Path, progress: bool, workers: int | None = None):
    data = write_synthea(tmp_path / "csv", patients=12)
    spec = load_spec(SPEC, [f"sources.0.root={data.root}", "sources.0.options.buckets=3",
                            "split.fractions=[0.6,0.2,0.2]"])  # fmt: skip
    out = tmp_path / "out"
    summary = run_ingest(spec, str(out), progress=progress, keyring=Keyring(KEY),
                         workers=workers)  # fmt: skip
    return data, summary


@pytest.mark.slow  # a real Ray job
def test_bytes_read_and_every_phase_with_an_eta(ray_local, tmp_path, capsys):
    data, summary = ingest(tmp_path, progress=True)
    tables = sorted(data.root.glob("*.csv"))
    assert summary.bytes_in == sum(p.stat().st_size for p in tables)  # patients.csv once
    assert f"{summary.bytes_in / 1e6:.1f} MB read" in summary.line()
    lines = capsys.readouterr().err.splitlines()
    mb = r" \| in [\d.]+ MB/s"  # by file sizes; the buckets' bytes are unknown: by count
    for phase, unit, total, rate in [("scan", "files", len(tables) + 1, mb),  # patients: 2 tables
                                     ("partition", "files", len(tables) + 1, mb),
                                     ("clean", "buckets", 3, ""),
                                     ("meds", "buckets", 3, "")]:  # fmt: skip
        pattern = PHASE.format(phase=phase, unit=unit, rate=rate) + ETA
        shown = [re.match(pattern, x) for x in lines]
        shown = [m for m in shown if m]
        assert shown, (phase, lines)
        assert shown[-1].groups() == (str(total), str(total), "00:00:00"), (phase, lines)
    conversion = [x for x in lines if x.startswith("[ingest] tasks ")]
    assert conversion and conversion[-1].startswith("[ingest] tasks 3/3 "), lines
    assert all(re.search(ETA, x) for x in conversion), conversion  # by bytes: never --:--:--


@pytest.mark.slow  # a real Ray job
def test_no_progress_prints_nothing(ray_local, tmp_path, capsys):
    ingest(tmp_path, progress=False)
    assert "[ingest]" not in capsys.readouterr().err


PREPARE_TASKS = ("scan_identifiers", "_partition_safe", "clean_bucket", "write_meds_bucket")


@pytest.mark.slow  # a real Ray job
def test_a_one_worker_job_runs_its_prepare_passes_one_task_at_a_time(ray_local, tmp_path):
    """`workers` caps the prepare passes' Ray tasks as it caps the conversion's: with 1, no
    two of them ever overlap (Ray's own task events), though the runtime has 2 CPUs."""
    since = time.time() * 1e6
    ingest(tmp_path, progress=False, workers=1)
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in ray_local.timeline()
                   if e.get("cat", "").removeprefix("task::") in PREPARE_TASKS
                   and e["ts"] >= since)  # fmt: skip
    assert len(spans) >= 4 * 3, spans  # every pass ran
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans)), spans


def test_a_phase_without_bytes_estimates_by_count():
    out = io.StringIO()
    prog = Progress(0, 4, every=0, stream=out, phase="mimic clean", unit="buckets")
    prog.start -= 10  # 10 s for the first bucket: 30 s to go
    prog.update(1, 0, 0, 0)
    assert re.fullmatch(r"\[ingest\] mimic clean: buckets 1/4 \(0\.1/s\) \| ETA 00:00:3\d\n",
                        out.getvalue()), out.getvalue()  # fmt: skip


def test_gather_starts_the_largest_input_first_and_returns_results_in_order(ray_local):
    submitted = []

    def task(i):
        def submit():
            submitted.append(i)
            return ray_local.put(i * 10)

        return submit

    prog = Progress(0, 4, enabled=False)
    out = gather(ray_local, [task(i) for i in range(4)], prog, nbytes=[5, 50, 1, 20], limit=1)
    assert out == [0, 10, 20, 30] and submitted == [1, 3, 0, 2]
    submitted.clear()
    assert gather(ray_local, [task(i) for i in range(3)], prog) == [0, 10, 20]
    assert submitted == [0, 1, 2]  # no sizes: as given

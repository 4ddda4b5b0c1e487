"""EHR ingest on real-world inputs: a Synthea-style CSV export ingested with the shipped spec
(ingest/specs/ehr_synthea.yaml, written from docs/ingest-signals-ehr.md only), the MIMIC-IV demo
for the identifier scan, and a canary grep over every output byte.

Issue 17: ISO-8601 times with Z, fractions and offsets (11); identifier columns refused by name
and by value (12); nothing outside the vocabulary stored (13); a file serving two tables is
read and reported once (14)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pytest
from ingest_helpers import KEY
from synthea_helpers import BAD_BIRTH, RARE_CODE, output_bytes, write_synthea
from typer.testing import CliRunner

from medfm.ingest.cli import app
from medfm.ingest.ehr.formats import EHRReader
from medfm.ingest.ehr.pipeline import scan_identifiers
from medfm.ingest.ehr.tables import identifier_reason, parse_times
from medfm.ingest.ehr.vocab import Vocabulary
from medfm.ingest.job import run_ingest
from medfm.ingest.load import load_spec
from medfm.ingest.privacy import Keyring
from medfm.ingest.registry import IngestError, SourceFile, create_reader
from medfm.ingest.spec import SpecError
from medfm.shards import ShardSet, verify

SPEC = Path(__file__).resolve().parents[1] / "ingest" / "specs" / "ehr_synthea.yaml"


def synthea_spec(root: Path, *overrides: str):
    return load_spec(SPEC, [f"sources.0.root={root}", "sources.0.options.buckets=2",
                            "split.fractions=[0.6,0.2,0.2]", *overrides])  # fmt: skip


@pytest.fixture(scope="module")
def synthea(ray_local, tmp_path_factory):
    """One Synthea export and its ingest output, shared by the tests below."""
    base = tmp_path_factory.mktemp("synthea")
    data = write_synthea(base / "csv")
    out = base / "out"
    spec = synthea_spec(data.root, "deid.hash_paths=false")  # opt-in: tests read table paths
    run_ingest(spec, str(out), progress=False, keyring=Keyring(KEY))
    return data, out


def quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]


def tokens_of(out: Path) -> tuple[Vocabulary, list[list[str]]]:
    ss = ShardSet(str(out))
    vocab = Vocabulary.from_json((out / "ehr" / "synthea" / "vocab.json").read_text())
    return vocab, [[vocab.tokens[i] for i in ss.read_sample(r).data] for r in ss.rows()]


# ---------------------------------------------------------------- 11: ISO-8601 times


def test_iso_8601_times_with_z_fractions_and_offsets():
    raw = ["2019-02-14T08:30:45Z", "2019-02-14T08:30:45.250Z", "2019-02-14T10:30:45+02:00",
           "2019-02-14T03:30:45-0500", "2019-02-14T09:30:45+01", "2019-02-14 08:30:45",
           "2019-02-14T08:30:45.123456789Z", "2019-02-14"]  # fmt: skip
    secs, missing, invalid = parse_times(pa.array([r.encode() for r in raw]), "")
    want = int(dt.datetime(2019, 2, 14, 8, 30, 45, tzinfo=dt.UTC).timestamp())
    assert list(secs[:-1]) == [want] * 7 and secs[-1] == want - (8 * 3600 + 30 * 60 + 45)
    assert not missing.any() and not invalid.any()
    bad, _, refused = parse_times(pa.array([b"2019-02-30T00:00:00Z", b"yesterday", b"ok"]), "")
    assert refused.all()  # an impossible date costs its row only


def test_epoch_numbers_when_the_spec_says_so():
    ms = pa.array([1550133045250, 0], pa.int64())  # epoch milliseconds (time_unit: ms)
    secs, _, invalid = parse_times(ms, "ms")
    assert list(secs) == [1550133045, 0] and not invalid.any()


@pytest.mark.slow  # a real Ray job
def test_synthea_z_timestamps_are_ingested(synthea):
    data, out = synthea
    assert verify(str(out)).ok
    reasons = [q["reason"] for q in quarantine(out)]
    assert not [r for r in reasons if "time" in r], reasons  # no table dropped as invalid time
    _, seqs = tokens_of(out)
    found = {p: sum(t.startswith(p) for s in seqs for t in s) for p in
             ("RXNORM//", "CVX//", "DEVICE//", "IMAGING//", "ENCOUNTER//", "LOINC//")}  # fmt: skip
    assert found == {"RXNORM//": data.rows["medications"], "CVX//": data.rows["immunizations"],
                     "DEVICE//": data.rows["devices"], "IMAGING//": data.rows["imaging_studies"],
                     "ENCOUNTER//": data.rows["encounters"],
                     "LOINC//": data.rows["observations"]}  # fmt: skip


# ---------------------------------------------------------------- 12: identifier columns


def test_identifier_columns_are_refused_by_name(tmp_path):
    spec = synthea_spec(tmp_path)
    opts = spec.sources[0].options
    for codes, column in ((["NAME//{FIRST}", "COUNTY//{COUNTY}"], "FIRST"),
                          (["COUNTY//{COUNTY}"], "COUNTY"), (["X//{SSN}"], "SSN"),
                          (["X//{DRIVERS}"], "DRIVERS"), (["X//{MAIDEN}"], "MAIDEN"),
                          (["X//{BIRTHPLACE}"], "BIRTHPLACE"), (["X//{ZIP}"], "ZIP"),
                          (["X//{LAT}"], "LAT"), (["X//{PASSPORT}"], "PASSPORT")):  # fmt: skip
        bad = {**opts, "patients": {**opts["patients"], "codes": codes}}
        with pytest.raises(SpecError, match=rf"options.patients: column '{column}'"):
            create_reader("event_tables", **bad)
    udi = [{**opts["tables"][6], "code": "DEVICE//{UDI}"}]
    with pytest.raises(SpecError, match=r"column 'UDI'"):
        create_reader("event_tables", **{**opts, "tables": udi})
    allowed = {**opts, "allow_columns": ["COUNTY"],
               "patients": {**opts["patients"], "codes": ["COUNTY//{COUNTY}"]}}  # fmt: skip
    create_reader("event_tables", **allowed)  # an explicit allowance is the only way in


def test_identifier_column_exits_2_from_the_cli(tmp_path, monkeypatch):
    data = write_synthea(tmp_path / "csv", patients=3)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.read_text().replace('"RACE//{RACE}"', '"NAME//{FIRST}"'))
    monkeypatch.setenv("MEDFM_DEID_KEY", KEY.decode())
    res = CliRunner().invoke(app, [str(spec), f"sources.0.root={data.root}", "--out",
                                   str(tmp_path / "out"), "--quiet"])  # fmt: skip
    assert res.exit_code == 2 and "column 'FIRST'" in res.output, res.output
    assert "Zqx" not in res.output


def _disguised(tmp_path: Path, patients: int) -> Path:
    """The Synthea patients table with its identifier columns under harmless names."""
    data = write_synthea(tmp_path / "csv", patients=patients)
    p = data.root / "patients.csv"
    header, rest = p.read_text().split("\n", 1)
    header = header.replace("SSN", "KEY_A").replace("FIRST", "GIVEN_1")
    p.write_text(header + "\n" + rest)
    return data.root


def _patient_jobs(root: Path, codes: list[str], allow: tuple[str, ...] = ()):
    opts = synthea_spec(root).sources[0].options
    reader = EHRReader(**{**opts, "allow_columns": list(allow),
                          "patients": {**opts["patients"], "codes": codes}})  # fmt: skip
    files = [SourceFile(str(p), p.name, p.stat().st_size) for p in sorted(root.glob("*.csv"))]
    return reader, [j for j in reader.partition_jobs(files) if j.rel == "patients.csv"]


def test_identifier_values_are_refused_whatever_the_column_is_called(tmp_path):
    root = _disguised(tmp_path, patients=120)
    reader, jobs = _patient_jobs(root, ["X//{KEY_A}", "Y//{GIVEN_1}", "GENDER//{GENDER}"])
    found = {k: v for j in jobs for k, v in scan_identifiers(j, reader.ehr, str(root)).items()}
    assert set(found) == {"KEY_A", "GIVEN_1"}, found
    assert "SSN" in found["KEY_A"] and "free text" in found["GIVEN_1"]
    assert not any("Zqx" in why or "999-" in why for why in found.values())  # no value quoted
    reader, jobs = _patient_jobs(root, ["X//{KEY_A}"], allow=("KEY_A",))
    assert all(scan_identifiers(j, reader.ehr, str(root)) == {} for j in jobs)
    phones = pa.array([f"(617) 555-{i:04d}" for i in range(50)] + ["x"] * 50)
    emails = pa.array([f"zqx{i}@example.org" for i in range(3)] + ["y"] * 97)
    assert "phone" in identifier_reason(phones) and "e-mail" in identifier_reason(emails)


def test_identifier_scan_passes_real_mimic_codes(sample_data):
    """No false alarm on the MIMIC-IV demo: ICD, LOINC-like item ids, drug names, units."""
    root = sample_data / "mimic-iv-demo-2.2"
    reader = create_reader("mimic_iv")
    files = [SourceFile(str(p), str(p.relative_to(root)), p.stat().st_size)
             for p in sorted(root.rglob("*.csv.gz"))]  # fmt: skip
    found = {j.rel: scan_identifiers(j, reader.ehr, str(root)) for j in
             reader.partition_jobs(files)}  # fmt: skip
    assert not any(found.values()), found


def test_identifier_scan_leaves_unreadable_files_to_the_quarantine(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "0.parquet").write_bytes(b"PAR1 not really parquet")
    reader = create_reader("meds")
    p = tmp_path / "data" / "0.parquet"
    (job,) = reader.partition_jobs([SourceFile(str(p), "data/0.parquet", p.stat().st_size)])
    assert scan_identifiers(job, reader.ehr, str(tmp_path)) == {}  # the partition pass says why


@pytest.mark.slow  # a real Ray job
def test_identifier_values_stop_the_job_before_anything_is_written(ray_local, tmp_path):
    root = _disguised(tmp_path, patients=120)
    spec = synthea_spec(root)
    spec.sources[0].options["patients"]["codes"] = ["GENDER//{GENDER}", "ID//{KEY_A}"]
    out = tmp_path / "out"
    with pytest.raises(IngestError, match=r"patients.csv: column 'KEY_A'.*SSN"):
        run_ingest(spec, str(out), progress=False, keyring=Keyring(KEY))
    assert not list(out.rglob("*.parquet")) and not (out / "manifest.json").exists()
    assert not any(b"999-" in blob for blob in output_bytes(out).values())


# ---------------------------------------------------------------- 13: the vocabulary bounds


@pytest.mark.slow  # a real Ray job
def test_nothing_outside_the_vocabulary_is_stored(synthea):
    data, out = synthea
    vocab, seqs = tokens_of(out)
    assert f"SNOMED//{RARE_CODE}" not in vocab.tokens  # seen once, min_count 5
    assert not (out / "_ingest" / "prepare" / "synthea").exists()  # the raw-code buckets went
    for rel, blob in output_bytes(out).items():
        assert RARE_CODE.encode() not in blob, rel


@pytest.mark.slow  # a real Ray job
def test_synthea_canaries_never_reach_any_output(synthea):
    data, out = synthea
    needles = [*data.canaries, *data.patients, *[b for b in data.birth_dates if b != BAD_BIRTH]]
    needles += ["Zqx", "999-5", "Zqxcanary", "Zqxshire"]
    blobs = output_bytes(out)
    assert any(rel.startswith("ehr/synthea/meds/") for rel in blobs)  # MEDS output grepped too
    for rel, blob in blobs.items():
        for needle in needles:
            assert needle.encode() not in blob, (rel, needle)


# ---------------------------------------------------------------- 14: a file of two tables


@pytest.mark.slow  # a real Ray job
def test_a_file_serving_two_tables_is_read_and_reported_once(synthea):
    data, out = synthea
    lines = [(q["path"], q["reason"]) for q in quarantine(out)]
    assert lines == [("patients.csv", "1 rows: invalid birth date (table patients)")], lines
    _, seqs = tokens_of(out)
    assert sum(t.startswith("GENDER//") for s in seqs for t in s) == len(data.patients)


def test_group_lists_each_file_once(tmp_path):
    data = write_synthea(tmp_path / "csv", patients=3)
    src = synthea_spec(data.root).sources[0]
    reader = create_reader("event_tables", **src.options)
    files = [SourceFile(str(p), p.name, p.stat().st_size) for p in sorted(data.root.glob("*"))]
    items = list(reader.group(files, {}, src))
    paths = [rel for _, rel, _ in items[0].info["tables"]]
    assert sorted(paths) == sorted(f.rel for f in files)  # patients.csv once, not twice
    jobs = reader.partition_jobs([SourceFile(*t) for t in items[0].info["tables"]])
    assert sorted((j.rel, j.table_name) for j in jobs if
                  j.rel == "patients.csv") == [("patients.csv", "deaths"),
                                               ("patients.csv", "patients")]  # fmt: skip


# ---------------------------------------------------------------- 15: one EHR sample schema


@pytest.mark.slow  # a real Ray job (the shared ingest)
def test_ingested_time_and_age_reach_the_model(synthea, tmp_path):
    """Pretraining reads the ingested per-token times and ages through the shards' EHR schema
    and takes vocab_size from the shard set: none of it is copied by hand."""
    import torch
    from pretrain_helpers import TINY, base_config

    from medfm.pretrain.config import load_config
    from medfm.pretrain.train import build
    from medfm.shards.schema import EHR_AGE, EHR_TIME, ehr_vocab_size

    _, out = synthea
    vocab, _ = tokens_of(out)
    assert ehr_vocab_size(ShardSet(str(out)).manifest.header) == len(vocab.tokens)
    model = {"name": "ehr_transformer", "max_tokens": 256, **TINY}  # no vocab_size given
    tree = base_config(tmp_path, out, model, [{"name": "mcm"}])
    tree["data"]["max_tokens"] = 256
    module, data = build(load_config(None, base=tree))
    assert module.encoder.config.vocab_size == len(vocab.tokens) + 1  # + the model's [MASK]
    ds, stored = data.datasets[0], ShardSet(str(out))
    items = [ds.load(u, 0) for u in range(4)]
    for item in items:
        s = stored.read_sample(next(r for r in stored.rows() if r["key"] == item["key"]))
        n = len(s.data)
        assert torch.equal(item["times"][:n], torch.as_tensor(s.extras[EHR_TIME]))
        assert torch.equal(item["age"][:n], torch.as_tensor(s.extras[EHR_AGE]))
        assert item["age"].shape == item["data"].shape  # per token, as the encoder takes it
    batch = torch.utils.data.default_collate(items)
    loss = module.objectives["mcm"].loss(batch)["loss"]
    assert torch.isfinite(loss)
    too_small = {**model, "vocab_size": len(vocab.tokens)}
    with pytest.raises(Exception, match="model.vocab_size: .* too small"):
        build(load_config(None, base=base_config(tmp_path, out, too_small, [{"name": "mcm"}])))


@pytest.mark.slow  # a real Ray job (the shared ingest) and two short training runs
def test_ehr_pretraining_with_the_shards_vocab_resumes(synthea, tmp_path):
    """The vocab_size taken from the shards is part of the run's config from the start, so a
    resumed run has the same fingerprint as the one that saved the checkpoint."""
    from pretrain_helpers import TINY, base_config

    from medfm.pretrain.config import load_config
    from medfm.pretrain.train import run

    _, out = synthea
    model = {"name": "ehr_transformer", "max_tokens": 64, **TINY}
    tree = base_config(tmp_path, out, model, [{"name": "mcm"}], max_steps=2, checkpoint_every=1)
    tree["data"].update(batch_size=4, max_tokens=64)
    run(load_config(None, base=tree))
    assert run(load_config(None, base=tree), resume=True)["steps"] == 2  # refused before

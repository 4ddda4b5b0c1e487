"""A Synthea-style CSV export, written with the columns and value formats of Synthea's CSV
exporter (v3.x: `patients.csv` with SSN, driver's licence, passport, names, maiden name,
birthplace, address, county, FIPS, ZIP, latitude/longitude; `encounters`, `conditions`,
`medications`, `immunizations`, `observations`, `devices`, `imaging_studies`), so that the
EHR ingest is tested on what a Synthea user feeds it.

Formats as Synthea writes them: patient ids are UUIDs; BIRTHDATE, DEATHDATE and condition
START/STOP are dates; encounter, medication, immunization, observation, device and imaging
times are ISO-8601 instants ending in `Z`. Observations carry numeric VALUEs (TYPE numeric) and
text ones (TYPE text). Beyond Synthea, some device times carry fractional seconds and some
imaging times a UTC offset (`+02:00`, `-0500`): the other ISO-8601 forms other exports use.

Every identifier is a distinctive canary (`Zqx...` names, 999-xx-xxxx SSNs, a `Zqxcanary`
street) so that a grep of the output finds any leak. One condition code (`RARE_CODE`) occurs
once: below any min_count, so it must never be stored. One patient's birth date is invalid.
"""

from __future__ import annotations

import csv
import gzip
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

RARE_CODE = "7771234509"
BAD_BIRTH = "1980-02-30"

CONDITIONS = [("44054006", "Diabetes mellitus type 2 (disorder)"),
              ("38341003", "Essential hypertension (disorder)"),
              ("195662009", "Acute viral pharyngitis (disorder)"),
              ("10509002", "Acute bronchitis (disorder)")]  # fmt: skip
MEDICATIONS = [("313782", "Acetaminophen 325 MG Oral Tablet"),
               ("860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"),
               ("314076", "lisinopril 10 MG Oral Tablet")]  # fmt: skip
VACCINES = [
    ("140", "Influenza  seasonal  injectable  preservative free"),
    ("08", "Hep B  adolescent or pediatric"),
    ("113", "Td (adult) preservative free"),
]
OBSERVATIONS = [("8302-2", "Body Height", "cm", 150, 190),
                ("29463-7", "Body Weight", "kg", 50, 110),
                ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 18, 35),
                ("8480-6", "Systolic Blood Pressure", "mm[Hg]", 100, 160)]  # fmt: skip
DEVICES = [("337414009", "Blood glucose meter (physical object)"),
           ("706180003", "Tongue depressor (physical object)")]  # fmt: skip
ENCOUNTER_CLASSES = [
    ("ambulatory", "185349003", "Encounter for check up (procedure)"),
    ("wellness", "410620009", "Well child visit (procedure)"),
    ("emergency", "50849002", "Emergency room admission (procedure)"),
]

HEADERS = {
    "patients": "Id,BIRTHDATE,DEATHDATE,SSN,DRIVERS,PASSPORT,PREFIX,FIRST,MIDDLE,LAST,SUFFIX,"
    "MAIDEN,MARITAL,RACE,ETHNICITY,GENDER,BIRTHPLACE,ADDRESS,CITY,STATE,COUNTY,FIPS,ZIP,LAT,LON,"
    "HEALTHCARE_EXPENSES,HEALTHCARE_COVERAGE,INCOME",
    "encounters": "Id,START,STOP,PATIENT,ORGANIZATION,PROVIDER,PAYER,ENCOUNTERCLASS,CODE,"
    "DESCRIPTION,BASE_ENCOUNTER_COST,TOTAL_CLAIM_COST,PAYER_COVERAGE,REASONCODE,REASONDESCRIPTION",
    "conditions": "START,STOP,PATIENT,ENCOUNTER,SYSTEM,CODE,DESCRIPTION",
    "medications": "START,STOP,PATIENT,PAYER,ENCOUNTER,CODE,DESCRIPTION,BASE_COST,"
    "PAYER_COVERAGE,DISPENSES,TOTALCOST,REASONCODE,REASONDESCRIPTION",
    "immunizations": "DATE,PATIENT,ENCOUNTER,CODE,DESCRIPTION,BASE_COST",
    "observations": "DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,DESCRIPTION,VALUE,UNITS,TYPE",
    "devices": "START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION,UDI",
    "imaging_studies": "Id,DATE,PATIENT,ENCOUNTER,SERIES_UID,BODYSITE_CODE,BODYSITE_DESCRIPTION,"
    "MODALITY_CODE,MODALITY_DESCRIPTION,INSTANCE_UID,SOP_CODE,SOP_DESCRIPTION,PROCEDURE_CODE",
}


@dataclass
class SyntheaSet:
    root: Path
    patients: list[str]  # raw Synthea patient ids (UUIDs)
    rows: dict[str, int] = field(default_factory=dict)  # data rows per table
    canaries: list[str] = field(default_factory=list)  # identifiers that must never be stored
    birth_dates: list[str] = field(default_factory=list)


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _instant(day: np.datetime64, seconds: int) -> str:
    return f"{np.datetime_as_string(day + np.timedelta64(seconds, 's'), unit='s')}Z"


def write_synthea(root: Path, patients: int = 30, seed: int = 0) -> SyntheaSet:
    """Write a Synthea-style CSV set under root; returns what the tests check against."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[list[str]]] = {name: [] for name in HEADERS}
    out = SyntheaSet(root, [])
    for i in range(patients):
        pid = _uuid(rng)
        out.patients.append(pid)
        born = np.datetime64("1940-01-01") + np.timedelta64(int(rng.integers(0, 60 * 365)), "D")
        birth = BAD_BIRTH if i == 3 else str(born)
        first, last, maiden = f"Zqxfirst{i:03d}", f"Zqxlast{i:03d}", f"Zqxmaiden{i:03d}"
        ssn, drivers, passport = f"999-{50 + i:02d}-{7000 + i:04d}", f"S999{i:05d}", f"X{i:07d}X"
        street = f"{100 + i} Zqxcanary Lane Unit {i}"
        out.canaries += [first, last, maiden, ssn, drivers, passport, street]
        out.birth_dates.append(birth)
        tables["patients"].append([
            pid, birth, "2019-03-04" if i == 5 else "", ssn, drivers, passport,
            "Mrs." if i % 2 else "Mr.", first,
            f"Zqxmiddle{i:03d}", last, "", maiden if i % 2 else "", "M", ["white", "black",
            "asian"][i % 3], "nonhispanic", "F" if i % 2 else "M",
            "Zqxtown  Massachusetts  US", street, "Zqxborough", "Massachusetts",
            "Zqxshire County", "25025", f"0{2100 + i}", f"{42.3 + i / 1000:.6f}",
            f"{-71.05 - i / 1000:.6f}", "12345.67", "2345.67", "55000",
        ])  # fmt: skip
        start = np.datetime64("2015-01-01") + np.timedelta64(int(rng.integers(0, 365)), "D")
        for e in range(int(rng.integers(3, 7))):
            _encounter(tables, rng, pid, start + np.timedelta64(e * 90, "D"), i, e)
    tables["conditions"].append(["2016-06-01", "", out.patients[0], tables["encounters"][0][0],
                                 "http://snomed.info/sct", RARE_CODE, "Rare disorder"])  # fmt: skip
    for name, rows in tables.items():
        with (root / f"{name}.csv").open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(HEADERS[name].split(","))
            w.writerows(rows)
        out.rows[name] = len(rows)
    return out


def _encounter(tables, rng, pid: str, day: np.datetime64, i: int, e: int) -> None:
    enc = _uuid(rng)
    cls, code, desc = ENCOUNTER_CLASSES[int(rng.integers(len(ENCOUNTER_CLASSES)))]
    t0 = int(rng.integers(8 * 3600, 17 * 3600))
    begin, end = _instant(day, t0), _instant(day, t0 + 1800)
    tables["encounters"].append([enc, begin, end, pid, _uuid(rng), _uuid(rng), _uuid(rng), cls,
                                 code, desc, "85.55", "142.58", "0.0", "", ""])  # fmt: skip
    c, cdesc = CONDITIONS[int(rng.integers(len(CONDITIONS)))]
    tables["conditions"].append([str(day), "", pid, enc, "http://snomed.info/sct", c, cdesc])
    for m, mdesc in [MEDICATIONS[int(k)] for k in rng.choice(len(MEDICATIONS), 2, False)]:
        tables["medications"].append([begin, end, pid, _uuid(rng), enc, m, mdesc, "4.56", "0.0",
                                      "1", "4.56", "", ""])  # fmt: skip
    v, vdesc = VACCINES[e % len(VACCINES)]
    tables["immunizations"].append([begin, pid, enc, v, vdesc, "140.52"])
    for code_, odesc, unit, lo, hi in OBSERVATIONS:
        value = f"{rng.uniform(lo, hi):.1f}"
        tables["observations"].append([begin, pid, enc, "vital-signs", code_, odesc, value, unit,
                                       "numeric"])  # fmt: skip
    tables["observations"].append([begin, pid, enc, "social-history", "72166-2",
                                   "Tobacco smoking status", "Never smoked tobacco (finding)",
                                   "", "text"])  # fmt: skip
    if e % 2 == 0:
        d, ddesc = DEVICES[i % len(DEVICES)]
        frac = f"{begin[:-1]}.{int(rng.integers(1000)):03d}Z"  # fractional seconds
        tables["devices"].append(
            [
                frac,
                "",
                pid,
                enc,
                d,
                ddesc,
                f"(01){i:014d}(11){e:06d}(17)990101(10)Zqxlot{i}(21)Zqx{e}",
            ]
        )
    if e == 0:  # an hour after the encounter began (UTC), written in local time with its offset
        hours, zone = (2, "+02:00") if i % 2 else (-5, "-0500")
        local = np.datetime_as_string(day + np.timedelta64(t0 + (1 + hours) * 3600, "s"), "s")
        tables["imaging_studies"].append([_uuid(rng), local + zone, pid, enc,
                                          f"1.2.840.99999.{i}.{e}",
                                          "51185008", "Thoracic structure (body structure)",
                                          "DX", "Digital Radiography", f"1.2.840.99999.{i}.{e}.1",
                                          "1.2.840.10008.5.1.4.1.1.1.1", "Digital X-Ray",
                                          "399208008"])  # fmt: skip


def output_bytes(root: Path) -> dict[str, bytes]:
    """Every file under an output folder as searchable bytes: Parquet decoded to its values
    (compressed pages would hide a leak from a byte grep), gzip inflated, the rest as stored."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix == ".parquet":
            table = pq.read_table(p)
            blob = json.dumps(table.to_pylist(), default=str).encode() + p.read_bytes()
        elif p.suffix == ".gz":
            blob = gzip.decompress(p.read_bytes())
        else:
            blob = p.read_bytes()
        out[str(p.relative_to(root))] = blob
    return out

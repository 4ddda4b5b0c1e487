"""The EHR mapping: which columns of which event tables are the patient, time, code and value.

A hospital's own extract is described in the spec (source `options:`); MIMIC-IV and MEDS are
presets of the same mapping (presets.py), not special code paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from medfm.config import suggest

from ..spec import SpecError, from_dict

TEMPLATE_FIELD = re.compile(r"\{([A-Za-z0-9_]+)\}")
# Column names that hold free text or direct identifiers (the HIPAA Safe Harbor list, and the
# columns of Synthea's and common EHR exports). A name is split into lower-case words at
# underscores, punctuation and camelCase ("DRIVERS", "BIRTHPLACE", "memberId"); a column with
# one of these words (or word pairs), or whose whole name is one of WHOLE_NAMES (words that are
# harmless inside other names, as MIMIC's first_careunit), is refused unless the spec lists it
# under `allow_columns`.
IDENTIFYING_WORDS = frozenset(
    "name names firstname lastname surname fullname maiden prefix suffix nickname alias "
    "ssn social_security nhs_number drivers driver licence license passport mrn "
    "medical_record member_id memberid account insurance_id address addr street city county "
    "zip zipcode postcode postal fips lat lon lng latitude longitude coordinates "
    "birthplace birth_place phone telephone mobile fax email e_mail url ip_address udi serial "
    "owner vehicle plate text note notes comment comments narrative report free_text event_txt "
    "signature photo".split()
)
WHOLE_NAMES = frozenset("first middle last given family".split())


def column_words(column: str) -> list[str]:
    """Lower-case words of a column name: "DRIVERS" -> [drivers], "memberId" -> [member, id]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", column)
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def identifying_column(column: str) -> bool:
    """Whether a column's name says it holds a direct identifier or free text."""
    words = column_words(column)
    pairs = [f"{a}_{b}" for a, b in zip(words, words[1:], strict=False)]
    return "_".join(words) in WHOLE_NAMES or any(w in IDENTIFYING_WORDS for w in words + pairs)


@dataclass
class TimeJoin:
    """Take an event's time from another table through a key (MIMIC diagnoses have no time:
    they take the admission's discharge time through `hadm_id`)."""

    path: str
    key: str
    time: str


@dataclass
class EventTable:
    """One event table (CSV, CSV.gz or Parquet; `path` is a glob under the source root).

    `code` is a template over columns: "LAB//{itemid}", "ICD{icd_version}//{icd_code}".
    `time` lists time columns, first non-empty wins: ISO-8601 text (offsets converted to UTC),
    Parquet timestamps or dates, or numbers since 1970 in `time_unit` (ms, s, m, h or d).
    """

    name: str
    path: str
    patient: str
    code: str
    time: list[str] = field(default_factory=list)
    value: str = ""
    admission: str = ""
    time_unit: Literal["", "ms", "s", "m", "h", "d"] = ""
    time_from: TimeJoin | None = None
    null_time: Literal["quarantine", "skip", "static"] = "quarantine"

    def code_columns(self) -> list[str]:
        """The columns whose text is stored (as codes): checked for identifiers."""
        return list(dict.fromkeys(TEMPLATE_FIELD.findall(self.code)))

    def columns(self) -> list[str]:
        cols = [self.patient, *self.time, *TEMPLATE_FIELD.findall(self.code)]
        cols += [c for c in (self.value, self.admission) if c]
        if self.time_from:
            cols.append(self.time_from.key)
        return list(dict.fromkeys(cols))


@dataclass
class PatientTable:
    """Birth (a date column, or an age at a reference year as MIMIC's anchor_age/anchor_year)
    and static codes ("GENDER//{gender}") per patient."""

    path: str
    patient: str
    birth: str = ""
    age: str = ""
    age_year: str = ""
    codes: list[str] = field(default_factory=list)

    def code_columns(self) -> list[str]:
        return list(dict.fromkeys(f for t in self.codes for f in TEMPLATE_FIELD.findall(t)))

    def columns(self) -> list[str]:
        cols = [self.patient] + [c for c in (self.birth, self.age, self.age_year) if c]
        cols += [f for t in self.codes for f in TEMPLATE_FIELD.findall(t)]
        return list(dict.fromkeys(cols))


@dataclass
class EHRSpec:
    """Source `options:` of an EHR source (formats `event_tables`, `mimic_iv`, `meds`)."""

    preset: str = ""
    tables: list[EventTable] = field(default_factory=list)
    patients: PatientTable | None = None
    birth_code: str = ""  # an event code that marks birth (MEDS: MEDS_BIRTH)
    sample_per: Literal["patient", "admission"] = "patient"
    min_count: int = 5  # codes seen fewer times in the train split become [UNK]
    bins: int = 10  # quantile bins per numeric code (edges fitted on train only)
    bin_sample: int = 20000  # values kept per code (uniform sample) to fit the edges
    min_values: int = 10  # codes with fewer train values get no bins
    buckets: int = 8  # hash partitions of patients; each must fit in one worker's memory
    batch_rows: int = 262144
    max_tokens: int = 0  # keep the most recent tokens of longer sequences; 0 = keep all
    time_tokens: bool = True  # CEHR-BERT style interval tokens between events a day+ apart
    age_cap: float = 90.0  # ages over 89 become 90 (HIPAA Safe Harbor)
    allow_columns: list[str] = field(default_factory=list)
    meds: bool = True  # also write the cleaned events as a MEDS dataset (ehr/<source>/meds/)

    def check(self, where: str) -> None:
        if not self.tables:
            raise SpecError(f"{where}.tables: an EHR source needs at least one event table")
        if self.bins < 2 or self.min_count < 1 or self.buckets < 1:
            raise SpecError(f"{where}: bins >= 2, min_count >= 1 and buckets >= 1 are required")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise SpecError(f"{where}.tables: table names must be unique")
        for i, t in enumerate(self.tables):
            if not t.time and not t.time_from and t.null_time != "static":
                raise SpecError(f"{where}.tables[{i}].time: give time columns or time_from")
            self._check_columns(f"{where}.tables[{i}]", [*TEMPLATE_FIELD.findall(t.code),
                                t.value, t.admission])  # fmt: skip
        if self.patients:
            p = self.patients
            if bool(p.age) != bool(p.age_year):
                raise SpecError(f"{where}.patients: age and age_year go together")
            fields = [f for t in p.codes for f in TEMPLATE_FIELD.findall(t)]
            self._check_columns(f"{where}.patients", fields)

    def _check_columns(self, where: str, cols: list[str]) -> None:
        for c in cols:
            if c and identifying_column(c) and c not in self.allow_columns:
                raise SpecError(
                    f"{where}: column {c!r} looks like free text or a direct identifier; "
                    "list it under allow_columns to use it anyway"
                )


def parse_ehr_options(options: dict, fmt: str) -> EHRSpec:
    """Validate a source's options, filling in the format's preset."""
    from .presets import PRESETS

    options = dict(options)
    preset = options.get("preset") or {"mimic_iv": "mimic_iv", "meds": "meds"}.get(fmt, "")
    if preset:
        if preset not in PRESETS:
            raise SpecError(
                f"options.preset: unknown preset {preset!r}{suggest(preset, PRESETS)}; "
                f"use {sorted(PRESETS)}"
            )
        options = {**PRESETS[preset], **options, "preset": preset}
    spec = from_dict(EHRSpec, options, "options")
    spec.check("options")
    return spec

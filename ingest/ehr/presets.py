"""Shipped EHR mappings. Each is plain data in the `EHRSpec` shape: a spec may override any key
(e.g. its own `tables` list), and a hospital extract needs no preset at all.

MIMIC-IV (v2.x `hosp/` and `icu/` tables): codes are namespaced by source. Identifiers,
free-text columns (comments, event_txt, provider ids) and demographic free fields (race,
language, insurance, marital status) are never read. Diagnoses and DRGs carry no time and take
their admission's discharge time, as MEDS-ETL does. Birth is estimated as 1 January of
anchor_year - anchor_age (MIMIC gives no birth date), so ages are exact to about a year.
"""

from __future__ import annotations

_ADM = {"path": "hosp/admissions.csv*", "key": "hadm_id", "time": "dischtime"}


def _t(name, path, code, time, value="", adm="hadm_id", **kw):
    return {"name": name, "path": path, "patient": "subject_id", "code": code, "time": time,
            "value": value, "admission": adm, **kw}  # fmt: skip


MIMIC_IV = {
    "allow_columns": ["result_name"],  # OMR measurement names ("Blood Pressure"), not people
    "patients": {
        "path": "hosp/patients.csv*",
        "patient": "subject_id",
        "age": "anchor_age",
        "age_year": "anchor_year",
        "codes": ["GENDER//{gender}"],
    },
    "tables": [
        _t("admissions", "hosp/admissions.csv*", "ADMISSION//{admission_type}", ["admittime"]),
        _t("discharges", "hosp/admissions.csv*", "DISCHARGE//{discharge_location}", ["dischtime"]),
        _t("deaths", "hosp/patients.csv*", "MEDS_DEATH", ["dod"], adm="", null_time="skip"),
        _t(
            "diagnoses",
            "hosp/diagnoses_icd.csv*",
            "ICD{icd_version}//{icd_code}",
            [],
            time_from=_ADM,
        ),
        _t("drg", "hosp/drgcodes.csv*", "DRG//{drg_type}//{drg_code}", [], time_from=_ADM),
        _t(
            "procedures",
            "hosp/procedures_icd.csv*",
            "PCS_ICD{icd_version}//{icd_code}",
            ["chartdate"],
        ),
        _t("hcpcs", "hosp/hcpcsevents.csv*", "HCPCS//{hcpcs_cd}", ["chartdate"]),
        _t("labs", "hosp/labevents.csv*", "LAB//{itemid}", ["charttime"], "valuenum"),
        _t(
            "micro",
            "hosp/microbiologyevents.csv*",
            "MICRO//{spec_itemid}",
            ["charttime", "chartdate"],
        ),
        _t("rx", "hosp/prescriptions.csv*", "RX//{drug}", ["starttime"]),
        _t("transfers", "hosp/transfers.csv*", "TRANSFER//{eventtype}", ["intime"]),
        _t("omr", "hosp/omr.csv*", "OMR//{result_name}", ["chartdate"], "result_value", adm=""),
        _t("icustays", "icu/icustays.csv*", "ICU//{first_careunit}", ["intime"]),
        _t("icu_inputs", "icu/inputevents.csv*", "INPUT//{itemid}", ["starttime"], "amount"),
        _t("icu_outputs", "icu/outputevents.csv*", "OUTPUT//{itemid}", ["charttime"], "value"),
        _t(
            "icu_procedures",
            "icu/procedureevents.csv*",
            "ICU_PROC//{itemid}",
            ["starttime"],
            "value",
        ),
        _t("icu_charts", "icu/chartevents.csv*", "CHART//{itemid}", ["charttime"], "valuenum"),
    ],
}

# MEDS: data/**/*.parquet with subject_id, time, code, numeric_value; codes come namespaced;
# null times are static measurements; birth is the MEDS_BIRTH code.
MEDS = {
    "tables": [
        {
            "name": "meds",
            "path": "**/*.parquet",
            "patient": "subject_id",
            "code": "{code}",
            "time": ["time"],
            "value": "numeric_value",
            "null_time": "static",
        },
    ],  # fmt: skip
    "birth_code": "MEDS_BIRTH",
}

PRESETS = {"mimic_iv": MIMIC_IV, "meds": MEDS}

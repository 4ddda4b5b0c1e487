"""Canonical channel vocabulary and physical units for ECG, EEG and companion signals.

Files name the same lead many ways ("ii", "Lead II", "MLII", "EEG Fp1-REF"); models need one
name per lead so that a channel embedding means the same thing across datasets.
"""

from __future__ import annotations

import re

ECG_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# Holter / monitoring leads (MIT-BIH style modified limb leads), Frank XYZ and a generic chest lead.
ECG_EXTRA = (
    "MLI",
    "MLII",
    "MLIII",
    "MV1",
    "MV2",
    "MV3",
    "MV4",
    "MV5",
    "MV6",
    "V",
    "VX",
    "VY",
    "VZ",
)
# International 10-20 system (with the 10-10 names older files use: T3/T4/T5/T6 = T7/T8/P7/P8).
EEG_1020 = (
    "Fp1", "Fp2", "Fpz", "F7", "F3", "Fz", "F4", "F8", "T7", "C3", "Cz", "C4", "T8", "P7", "P3",
    "Pz", "P4", "P8", "O1", "Oz", "O2", "A1", "A2", "M1", "M2", "T3", "T4", "T5", "T6", "AFz",
    "FCz", "CPz", "POz", "F9", "F10", "T9", "T10", "P9", "P10",
)  # fmt: skip
OTHER = ("ABP", "PAP", "CVP", "ART", "PLETH", "RESP", "SPO2", "EMG", "EOG", "HR", "TEMP")

GROUP = {
    **{n: "ecg" for n in ECG_LEADS + ECG_EXTRA},
    **{n: "eeg" for n in EEG_1020},
    **{n: "other" for n in OTHER},
}
# Target physical unit per group; "other" channels keep their own unit.
GROUP_UNIT = {"ecg": "mV", "eeg": "uV"}

_CANON = {n.lower(): n for n in GROUP}
_ALIASES = {
    "avr": "aVR", "avl": "aVL", "avf": "aVF", "lead i": "I", "lead ii": "II", "lead iii": "III",
    "ml2": "MLII", "ml ii": "MLII", "ml1": "MLI", "ml3": "MLIII", "x": "VX", "y": "VY", "z": "VZ",
    "vx": "VX", "vy": "VY", "vz": "VZ", "pleth": "PLETH", "resp": "RESP", "spo2": "SPO2",
}  # fmt: skip
# Decoration that files add around a lead name: modality prefixes, reference suffixes, the
# "(Einthoven)" of DICOM code meanings.
_PREFIX = re.compile(r"^(ecg|ekg|eeg|lead)[\s_:-]+", re.I)
_SUFFIX = re.compile(r"[\s_-]*(\(.*\)|-?ref|-?le|-?avg|-?a[12]|-?m[12])$", re.I)

UNIT_SCALE = {"v": 1.0, "mv": 1e-3, "uv": 1e-6, "µv": 1e-6, "μv": 1e-6, "nv": 1e-9}


def canonical_name(raw: str) -> str | None:
    """The vocabulary name of a channel label, or None if it is not in the vocabulary."""
    s = " ".join(str(raw).replace("\x00", "").split())
    for candidate in (s, _PREFIX.sub("", s), _SUFFIX.sub("", _PREFIX.sub("", s))):
        key = candidate.strip().lower()
        if key in _ALIASES:
            return _ALIASES[key]
        if key in _CANON:
            return _CANON[key]
    return None


def channel_group(name: str) -> str:
    return GROUP[name]


def unit_factor(unit: str, target: str) -> float | None:
    """Multiplier taking values in `unit` to `target` (both voltages), or None if not voltages."""
    src, dst = UNIT_SCALE.get(unit.strip().lower()), UNIT_SCALE.get(target.lower())
    if src is None or dst is None:
        return None
    return src / dst

"""Canonical channel vocabulary and physical units for ECG, EEG and companion signals.

Files name the same lead many ways ("ii", "Lead II", "MLII", "EEG Fp1-REF"); models need one
name per lead so that a channel embedding means the same thing across datasets. The names and
their aliases live in `channels.yaml` beside this module (one data file, shipped as package
data); this module adds the rules that no list can hold: stripping decoration and naming
bipolar EEG derivations.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

import yaml

# Target physical unit per group; "other" channels keep their own unit.
GROUP_UNIT = {"ecg": "mV", "eeg": "uV"}
# Decoration that files add around a lead name: modality prefixes, reference suffixes, the
# "(Einthoven)" of DICOM code meanings.
_PREFIX = re.compile(r"^(ecg|ekg|eeg|lead)[\s_:-]+", re.I)
_SUFFIX = re.compile(r"[\s_-]*(\(.*\)|-?ref|-?le|-?avg|-?a[12]|-?m[12])$", re.I)
# An electrode-to-electrode derivation, "Fp1-F7" (CHB-MIT), "Fpz-Cz" (Sleep-EDF).
_BIPOLAR = re.compile(r"^([a-z0-9]+)\s*-\s*([a-z0-9]+)$", re.I)

UNIT_SCALE = {"v": 1.0, "mv": 1e-3, "uv": 1e-6, "µv": 1e-6, "μv": 1e-6, "nv": 1e-9}


@cache
def vocabulary() -> tuple[dict[str, str], dict[str, str]]:
    """({canonical name: group}, {lower-case alias or name: canonical name}) from
    channels.yaml."""
    data = yaml.safe_load(files(__package__).joinpath("channels.yaml").read_text("utf-8"))
    group = {str(n): g for g, names in data["groups"].items() for n in names}
    aliases = {str(k).lower(): str(v) for k, v in data["aliases"].items()}
    unknown = sorted(v for v in aliases.values() if v not in group)
    if unknown:  # a typo in the data file must not silently map leads to nowhere
        raise ValueError(f"channels.yaml: aliases name unknown channels {unknown}")
    return group, {**{n.lower(): n for n in group}, **aliases}


def _lookup(key: str) -> str | None:
    return vocabulary()[1].get(key)


def _bipolar(key: str) -> str | None:
    """ "Fp1-F7" for a derivation between two EEG electrodes of the vocabulary."""
    m = _BIPOLAR.match(key)
    if not m:
        return None
    a, b = _lookup(m.group(1)), _lookup(m.group(2))
    if a and b and channel_group(a) == channel_group(b) == "eeg":
        return f"{a}-{b}"
    return None


def canonical_name(raw: str) -> str | None:
    """The vocabulary name of a channel label, or None if it is not in the vocabulary."""
    s = " ".join(str(raw).replace("\x00", "").split())
    bare = _PREFIX.sub("", s)
    for candidate in (s, bare, _SUFFIX.sub("", bare)):
        name = _lookup(candidate.strip().lower())
        if name:
            return name
    # Only now a derivation: "C3-A2" is C3 against an ear reference, not a bipolar pair.
    return _bipolar(bare.strip().lower())


def channel_group(name: str) -> str:
    """The group of a canonical name (a bipolar derivation is in its electrodes' group)."""
    group, _ = vocabulary()
    return group.get(name) or group[name.split("-", 1)[0]]


def unit_factor(unit: str, target: str) -> float | None:
    """Multiplier taking values in `unit` to `target` (both voltages), or None if not voltages."""
    src, dst = UNIT_SCALE.get(unit.strip().lower()), UNIT_SCALE.get(target.lower())
    if src is None or dst is None:
        return None
    return src / dst

"""Keyed pseudonyms, per-patient date shifts and patient-level splits, shared by every modality.

Everything derives from one secret key (HMAC-SHA256), read from the environment variable
MEDFM_DEID_KEY or from a key file named by MEDFM_DEID_KEY_FILE (or by the spec's
`deid.key_file`), never from the spec itself. Same key + same input = same pseudonyms, UIDs,
date shifts and splits, across files, datasets, modalities and re-runs; without the key they
cannot be reversed or recomputed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from collections.abc import Sequence
from pathlib import Path

KEY_ENV = "MEDFM_DEID_KEY"
KEY_FILE_ENV = "MEDFM_DEID_KEY_FILE"
MIN_KEY_BYTES = 16
# Dates move back by 1..3650 days per patient: intervals inside one patient are kept
# (DICOM PS3.15 "Retain Longitudinal Temporal Information with Modified Dates" option).
MAX_SHIFT_DAYS = 3650


class DeidKeyError(RuntimeError):
    """No usable de-identification key."""


class Keyring:
    """The secret key and every keyed derivation made from it."""

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise DeidKeyError(f"the de-identification key must be at least {MIN_KEY_BYTES} bytes")
        self._key = key

    @classmethod
    def load(cls, key_file: str | None = None) -> Keyring:
        """Key from MEDFM_DEID_KEY, else from the key file (spec `deid.key_file` or env)."""
        if os.environ.get(KEY_ENV):
            return cls(os.environ[KEY_ENV].encode())
        path = key_file or os.environ.get(KEY_FILE_ENV)
        if not path:
            raise DeidKeyError(
                f"no de-identification key: set {KEY_ENV}, or {KEY_FILE_ENV} / spec "
                "deid.key_file to a file holding a secret of at least 16 bytes "
                "(e.g. `openssl rand -hex 32 > key`)"
            )
        p = Path(path).expanduser()
        if not p.is_file():
            raise DeidKeyError(f"de-identification key file {p} does not exist")
        return cls(p.read_bytes().strip())

    def digest(self, *parts: str) -> bytes:
        msg = "\x1f".join(parts).encode("utf-8", "surrogateescape")
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def token(self, kind: str, *parts: str) -> str:
        """A hex pseudonym for (kind, parts): the `kind` keeps namespaces apart."""
        return self.digest(kind, *parts).hex()

    @property
    def key_id(self) -> str:
        """A public fingerprint: tells re-runs whether the same key is in use."""
        return self.token("key-id")[:12]

    def patient(self, raw_id: str, namespace: str = "") -> str:
        """Patient pseudonym: same raw id (in the same namespace) -> same pseudonym everywhere."""
        return "P" + self.token("patient", namespace, str(raw_id).strip())[:20]

    def dicom_uid(self, raw_uid: str) -> str:
        """A valid DICOM UID (2.25.<int>) derived from the original one."""
        return "2.25." + str(int.from_bytes(self.digest("uid", raw_uid)[:16], "big"))

    def shift_days(self, raw_patient_id: str) -> int:
        d = int.from_bytes(self.digest("date-shift", str(raw_patient_id).strip())[:4], "big")
        return -(1 + d % MAX_SHIFT_DAYS)

    def shift_date(self, raw_patient_id: str, value: str) -> str:
        """Shift a DICOM DA (YYYYMMDD) or DT (YYYYMMDD...) value; unparsable dates are dropped."""
        value = (value or "").strip()
        if len(value) < 8 or not value[:8].isdigit():
            return ""
        try:
            day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
        except ValueError:
            return ""
        shifted = day + dt.timedelta(days=self.shift_days(raw_patient_id))
        return shifted.strftime("%Y%m%d") + value[8:]

    def shift_datetime(self, raw_patient_id: str, when: dt.datetime) -> dt.datetime:
        return when + dt.timedelta(days=self.shift_days(raw_patient_id))

    def unit(self, *parts: str) -> float:
        """A keyed uniform number in [0, 1)."""
        return int.from_bytes(self.digest(*parts)[:8], "big") / 2.0**64


def split_for(
    keyring: Keyring, patient_pseudonym: str, fractions: Sequence[float], seed: int = 0
) -> str:
    """train/val/test from the keyed patient pseudonym (and seed): one patient, one split,
    in every dataset and modality that uses the same key, seed and fractions."""
    u = keyring.unit("split", str(seed), patient_pseudonym)
    names = ("train", "val", "test")
    acc = 0.0
    total = float(sum(fractions))
    for name, frac in zip(names, fractions, strict=True):
        acc += frac / total
        if u < acc:
            return name
    return names[len(fractions) - 1]

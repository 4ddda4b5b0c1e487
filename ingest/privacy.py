"""Keyed pseudonyms, per-patient date shifts and patient-level splits, shared by every modality.

Everything derives from one secret key (HMAC-SHA256), read from the environment variable
MEDFM_DEID_KEY or from a key file named by MEDFM_DEID_KEY_FILE (or by the spec's
`deid.key_file`), never from the spec itself. Same key + same input = same pseudonyms, UIDs,
date shifts and splits, across files, datasets, modalities and re-runs; without the key they
cannot be reversed or recomputed.

Pseudonyms of guessable inputs (patient ids are short numbers) are only as strong as the key:
anyone holding a shard set can test key guesses against them offline. So a key must carry at
least 128 bits of estimated entropy (`key_strength`), and nothing shipped with a shard set is a
fast function of the key alone; the one check a resumed job makes against the key is a salted
scrypt hash kept in the job's private bookkeeping (`Keyring.key_check`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KEY_ENV = "MEDFM_DEID_KEY"
KEY_FILE_ENV = "MEDFM_DEID_KEY_FILE"
MIN_KEY_BITS = 128
MIN_DISTINCT_CHARS = 10
MAKE_KEY = (
    "make one from a CSPRNG, e.g. `openssl rand -hex 32 > ~/.medfm/deid.key` or "
    "`python -c 'import secrets; print(secrets.token_hex(32))'`"
)
# Dates move back by 1..3650 days per patient: intervals inside one patient are kept
# (DICOM PS3.15 "Retain Longitudinal Temporal Information with Modified Dates" option).
MAX_SHIFT_DAYS = 3650
# scrypt for the resume check: 32 MiB and ~0.1 s per guess, where an HMAC costs ~1 us.
SCRYPT = {"n": 2**15, "r": 8, "p": 1}


class DeidKeyError(RuntimeError):
    """No usable de-identification key."""


# ---------------------------------------------------------------- key strength

# Words people build keys from. An attacker tries these first, so a word from this list costs
# what picking it from the list costs (about 9 bits), not what typing its letters at random would.
_WORDS = frozenset(
    """
    the and for you not are all any can her was one our out day get has him his how man new now
    old see two way who boy did its let put say she too use key pin pwd abc xyz dev prod qa ops
    test demo temp tmp default admin root user guest master secret secrets password passwd pass
    passphrase private public token salt hash code codes login access change letmein welcome
    hello world qwerty asdf zxcv iloveyou dragon monkey shadow sunshine princess football
    baseball soccer hockey summer winter spring autumn fall monday friday sunday january february
    march april june july august september october november december hospital clinic clinical
    medical medicine health healthcare care patient patients doctor nurse radiology imaging
    scan scans study studies series dicom pacs mimic data dataset datasets research project
    trial cohort ward general university institute center centre lab site local remote server
    backup copy final version release alpha beta gamma delta omega north south east west city
    saint mary john james smith london paris berlin boston pipeline model foundation shard shards
    ingest deid identify anonymous anonymize anonymise pseudonym medfm ehr note notes record
    records file files folder this that with from have they will your what when make like time
    just know take year years good some them than then into over also back after work first well
    even want because these give most very dead beef cafe face babe feed fade bead deaf
    """.split()
)
_WORD_BITS = math.log2(len(_WORDS)) + 1.0  # +1: the case of the first letter
_HEX = re.compile(r"[0-9a-fA-F]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_ANY_WORD_BITS = 17.0  # a word from a 65k-word dictionary, +1 for its case
_MAX_CHARS = 256  # a longer key is judged on its first 256 characters
_MAX_SPAN = 64  # longest pattern looked for (a longer repeat is several shorter ones)
# A CSPRNG's hex/base64 loses at most a few percent to chance patterns; a made-up key far more.
_STRUCTURE = 0.7


@dataclass(frozen=True)
class KeyStrength:
    bits: float
    problem: str  # "" when the key is strong enough


def _class_bits(c: str) -> float:
    """Brute-force cost of one character of a made-up key: the size of its class."""
    if c.isascii() and c.islower():
        return math.log2(26)
    if c.isascii() and c.isupper():
        return math.log2(26) + 1.0
    if c.isascii() and c.isdigit():
        return math.log2(10)
    if c.isascii() and c.isprintable():
        return math.log2(33)
    return 8.0


def _span_bits(t: str, i: int, j: int, char_bits, text_mode: bool) -> float | None:
    """Cost of t[i:j] as a pattern an attacker tries early, or None if it is none."""
    span, n = t[i:j], j - i
    if n >= 3 and span.isalpha() and span.lower() in _WORDS:
        return _WORD_BITS
    if text_mode and n >= 4 and span.isalpha() and (span[1:].islower() or span.isupper()):
        return _ANY_WORD_BITS  # any word of a made-up key: one of ~65k dictionary words
    steps = {ord(b) - ord(a) for a, b in zip(span, span[1:], strict=False)}
    if n >= 3 and steps == {0}:
        return char_bits(span[0]) + math.log2(n)  # aaaa
    if n >= 4 and len(steps) == 1 and abs(next(iter(steps))) <= 2:
        return char_bits(span[0]) + math.log2(n) + 2.0  # abcd, 9876, aceg
    if n >= 4 and span in t[:i]:
        return math.log2(i) + math.log2(n)  # a repeat: where the copy starts, how long
    if text_mode and n <= 2 and not span.isalnum() and 0 < i and j < len(t):
        if t[i - 1].isalnum() and t[j].isalnum():
            return 2.0  # a separator between words: '-', '_', ' ', '. '
    return None


def _pattern_bits(t: str, char_bits, text_mode: bool) -> float:
    """Cheapest way to write `t` as characters, dictionary words, runs, sequences and repeats."""
    best = [0.0] + [math.inf] * len(t)
    for i in range(len(t)):
        best[i + 1] = min(best[i + 1], best[i] + char_bits(t[i]))
        for j in range(i + 2, min(len(t), i + _MAX_SPAN) + 1):
            cost = _span_bits(t, i, j, char_bits, text_mode)
            if cost is not None:
                best[j] = min(best[j], best[i] + cost)
    return best[-1]


def key_strength(key: bytes) -> KeyStrength:
    """Estimated entropy of a key, in bits, and what makes it too weak (if anything).

    Hex and base64 (what `openssl rand` and `secrets` print) and raw random bytes count at
    4, 6 and 8 bits a character, as long as they hold no more structure (dictionary words,
    runs, sequences, repeats) than chance gives. Any other key counts as its cheapest
    decomposition into dictionary words, any words, separators, runs, sequences, repeats and
    single characters priced by their class (zxcvbn's idea, much simplified).
    """
    text = key.decode("latin-1")[:_MAX_CHARS]  # one character per byte, never fails
    chars = len(text)
    if not text.isascii() or not text.isprintable():
        per_char = 8.0
    elif _HEX.fullmatch(text):
        per_char = 4.0
    elif _BASE64.fullmatch(text) and not text.isalpha():
        per_char, chars = 6.0, len(text.rstrip("="))  # padding carries nothing
    else:
        per_char = 0.0
    if per_char:
        brute = chars * per_char
        pattern = _pattern_bits(text, lambda _c: per_char, text_mode=False)
        if pattern >= _STRUCTURE * brute:
            bits = brute
        else:  # made up, not drawn: judge it as a made-up key
            bits = min(pattern, _pattern_bits(text, _class_bits, text_mode=True))
    else:
        brute = len(text) * math.log2(95)  # at best: any printable character anywhere
        bits = _pattern_bits(text, _class_bits, text_mode=True)
    if len(set(text)) < MIN_DISTINCT_CHARS:
        return KeyStrength(bits, f"only {len(set(text))} distinct characters")
    if bits >= MIN_KEY_BITS:
        return KeyStrength(bits, "")
    if brute < MIN_KEY_BITS:
        return KeyStrength(bits, f"too short ({len(key)} bytes)")
    return KeyStrength(bits, "dictionary words, repeats or sequences")


def check_key(key: bytes) -> None:
    """Refuse a key with less than MIN_KEY_BITS of estimated entropy (the key is never quoted)."""
    strength = key_strength(key)
    if strength.problem:
        raise DeidKeyError(
            f"the de-identification key is too weak: {strength.problem}, about "
            f"{strength.bits:.0f} bits estimated where {MIN_KEY_BITS} are needed; {MAKE_KEY}"
        )


# ---------------------------------------------------------------- the keyring


class Keyring:
    """The secret key and every keyed derivation made from it."""

    def __init__(self, key: bytes):
        check_key(key)
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
                f"deid.key_file to a file holding a secret of at least {MIN_KEY_BITS} bits; "
                f"{MAKE_KEY}"
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

    def key_check(self, salt: bytes, n: int = SCRYPT["n"], r: int = SCRYPT["r"],
                  p: int = SCRYPT["p"]) -> str:  # fmt: skip
        """Salted scrypt of the key: tells a resumed job whether the key is the same one, while
        each offline guess against it costs scrypt's memory and time, not one HMAC."""
        return hashlib.scrypt(
            self._key, salt=salt, n=n, r=r, p=p, maxmem=256 * r * n, dklen=32
        ).hex()

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

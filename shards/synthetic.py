"""The audit gate: a synthetic shard set is trained on only with a passing audit, or by an explicit,
recorded choice.

A failed or missing audit used to go unnoticed: pretraining and fine-tuning mixed a pure-noise set
at ratio 0.3 without a word. Both stages now call `check_synthetic` before reading any sample, and
`check_training_set` on every set they train on directly (`data.shards`, `data.mix`): a synthetic
set named there instead of under `data.synthetic` would otherwise skip the gate.

A verdict counts only when it is bound to the set's exact contents, in one of two places:
- the header's `attributes.synthetic.audit` (written by `medfm synth generate --audit` in the same
  commit as the rows, so it cannot describe other rows);
- `audit/report.json` inside the set (written by `medfm synth audit`), whose
  `synthetic_manifest_sha256` must equal the header's rows hash and whose `generator` the set's
  generator: a set regenerated after its audit is unaudited again.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any

from medfm.config import ConfigError

from .manifest import Manifest

AUDIT_REPORT = "audit/report.json"  # relative to the synthetic set's root: never a user path
MAX_REPORT_BYTES = 64 << 20  # a report lists flagged keys; anything larger is not ours


@dataclass
class SyntheticConfig:
    """Synthetic shards mixed in so that they make up `ratio` of the samples drawn."""

    shards: str
    ratio: float = 0.3
    # Train on a set without a passing audit; the run records that it did (docs/synth.md).
    allow_unaudited: bool = False


def audit_verdict(m: Manifest) -> dict[str, Any]:
    """{"verdict": "pass" | "fail" | "none", "source": where it was found, "generator_sha256"}."""
    syn = m.header.get("attributes", {}).get("synthetic")
    if not isinstance(syn, dict):  # a set made elsewhere: synthetic if every row says so
        rows_synthetic = len(m) > 0 and all(m.table.column("synthetic").to_pylist())
        syn = {} if rows_synthetic else None
    if syn is None:
        return {"verdict": "none", "source": None, "generator_sha256": None, "synthetic": False}
    generator = syn.get("generator_sha256")
    found = {"source": None, "generator_sha256": generator, "synthetic": True}
    embedded = syn.get("audit")
    if isinstance(embedded, dict) and embedded.get("verdict") in ("pass", "fail"):
        return found | {"verdict": embedded["verdict"], "source": "header"}
    report = _report(m)
    bound = (
        report is not None
        and report.get("synthetic_manifest_sha256") == m.header["manifest"]["sha256"]
        and report.get("generator") == generator
        and report.get("verdict") in ("pass", "fail")
    )
    if bound:
        return found | {"verdict": report["verdict"], "source": AUDIT_REPORT}
    return found | {"verdict": "none"}


def _report(m: Manifest) -> dict[str, Any] | None:
    path = f"{m.path}/{AUDIT_REPORT}"
    try:
        if m.fs.size(path) > MAX_REPORT_BYTES:
            return None
        report = json.loads(m.fs.cat_file(path))
    except (OSError, ValueError, RecursionError):  # absent or unreadable: no audit on record
        return None
    return report if isinstance(report, dict) else None


def open_manifest(root: str, where: str) -> Manifest:
    try:
        return Manifest.open(root)
    except Exception as e:  # ShardFormatError, a missing folder: the config names a bad set
        raise ConfigError(f"{where}: {e}") from e


def check_synthetic(cfg: SyntheticConfig, where: str = "data.synthetic") -> dict[str, Any]:
    """Refuse (ConfigError) a set without a passing audit unless `allow_unaudited`; returns what
    the run records: {"audit": verdict, "audit_source", "generator_sha256", "allow_unaudited"}."""
    m = open_manifest(cfg.shards, f"{where}.shards")
    v = audit_verdict(m)
    if not v["synthetic"]:
        raise ConfigError(
            f"{where}.shards: {cfg.shards} is not a synthetic shard set (its header has no "
            "attributes.synthetic and its rows are not all synthetic); mix real sets through "
            "data.mix"
        )
    return gate(v, f"{where}.shards: {cfg.shards}", cfg.allow_unaudited, f"{where}.allow_unaudited")


def check_training_set(
    root: str, allow_unaudited: bool, where: str = "data.shards"
) -> dict[str, Any] | None:
    """The gate for a set trained on directly: one holding any synthetic row needs a passing
    audit, or `data.allow_unaudited`. Returns the record as `check_synthetic` does, with the
    synthetic row count; None for a set of real rows only."""
    import pyarrow.compute as pc

    m = open_manifest(root, where)
    n = int(pc.sum(m.table.column("synthetic")).as_py() or 0) if len(m) else 0
    if n == 0:
        return None
    # A set mixing real and synthetic rows has no set-level audit: nothing judged it as a whole.
    v = audit_verdict(m) | ({} if n == len(m) else {"verdict": "none", "source": None})
    what = f"{where}: {root} holds {n} synthetic samples and"
    return gate(v, what, allow_unaudited, "data.allow_unaudited") | {"synthetic_rows": n}


def gate(v: dict[str, Any], subject: str, allow_unaudited: bool, flag: str) -> dict[str, Any]:
    """Pass a verdict, refuse it, or warn about it under `flag`; returns the run's record."""
    record = {
        "audit": v["verdict"],
        "audit_source": v["source"],
        "generator_sha256": v["generator_sha256"],
        "allow_unaudited": allow_unaudited,
    }
    if v["verdict"] == "pass":
        return record
    what = "failed its audit" if v["verdict"] == "fail" else "has no audit of its current contents"
    if not allow_unaudited:
        raise ConfigError(
            f"{subject} {what}; run `medfm synth audit --synthetic SET --real TRAIN_SHARDS` (or "
            f"generate with --audit) and fix what it reports, or set {flag}: true to train on it "
            "anyway (recorded)"
        )
    warnings.warn(f"{subject} {what}; training on it ({flag}: true)", stacklevel=3)
    return record

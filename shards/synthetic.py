"""The audit gate: a synthetic shard set is trained on only with a passing audit, or by an explicit,
recorded choice.

A failed or missing audit used to go unnoticed: pretraining and fine-tuning mixed a pure-noise set
at ratio 0.3 without a word. Both stages now call `check_synthetic` before reading any sample.

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


def check_synthetic(cfg: SyntheticConfig, where: str = "data.synthetic") -> dict[str, Any]:
    """Refuse (ConfigError) a set without a passing audit unless `allow_unaudited`; returns what
    the run records: {"audit": verdict, "audit_source", "generator_sha256", "allow_unaudited"}."""
    try:
        m = Manifest.open(cfg.shards)
    except Exception as e:  # ShardFormatError, a missing folder: the config names a bad set
        raise ConfigError(f"{where}.shards: {e}") from e
    v = audit_verdict(m)
    if not v["synthetic"]:
        raise ConfigError(
            f"{where}.shards: {cfg.shards} is not a synthetic shard set (its header has no "
            "attributes.synthetic and its rows are not all synthetic); mix real sets through "
            "data.mix"
        )
    record = {
        "audit": v["verdict"],
        "audit_source": v["source"],
        "generator_sha256": v["generator_sha256"],
        "allow_unaudited": cfg.allow_unaudited,
    }
    if v["verdict"] == "pass":
        return record
    what = "failed its audit" if v["verdict"] == "fail" else "has no audit of its current contents"
    if not cfg.allow_unaudited:
        raise ConfigError(
            f"{where}.shards: {cfg.shards} {what}; run `medfm synth audit --synthetic "
            f"{cfg.shards} --real TRAIN_SHARDS` (or generate with --audit) and fix what it "
            f"reports, or set {where}.allow_unaudited: true to train on it anyway (recorded)"
        )
    warnings.warn(
        f"{where}: training on {cfg.shards}, which {what} (allow_unaudited: true)", stacklevel=2
    )
    return record
